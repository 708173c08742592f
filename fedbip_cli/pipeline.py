"""One call per command: sources → adapters → similarity → weights → merge → writers.

``load`` resolves and validates everything up front (so a bad input fails before any compute or
output), ``inspect`` computes similarities, ``merge`` writes one personalized adapter per client.
Full fine-tuned checkpoints are loaded into a ``fullmerge.CheckpointWorkspace``, to which
``inspect``, ``plan`` and ``merge`` hand over. Progress is reported through an optional callback;
nothing here prints.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedbip_cli import lockfile, manifest
from fedbip_cli.adapters import (
    BIAS,
    DORA,
    KEY_PREFIX,
    NEEDS_BASE,
    SAVED,
    WEIGHTS_NAME,
    Adapter,
    FactorReader,
    StreamingAdapterWriter,
    check_against_base,
    file_sha256,
    load_adapter,
    part_module,
    write_config,
)
from fedbip_cli.card import CARD_NAME, model_card
from fedbip_cli.errors import AdapterError, OutputError, SourceError, UsageError
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.merge import merge_module, output_rank, registered, weighted_sum
from fedbip_cli.parts import BaseTensors, check_copies, dense_deltas
from fedbip_cli.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from fedbip_cli.similarity import SimilarityResult, dense_inner_products, module_inner_products, similarity_from_inner
from fedbip_cli.sketch import SimilarityMethod, sketch_similarity
from fedbip_cli.sources import FULL, LORA, ResolvedSource, fetch_weights, model_shapes, resolve_revision, resolve_specs
from fedbip_cli.taskvec import GRANULARITIES, all_modules, group_modules, module_factors, natural_key
from fedbip_cli.weights import WeightOptions, personalized_weights
from fedbip_cli.writeback import (
    AS_BIAS,
    AS_LORA,
    AS_LORA_BIAS,
    AS_SAVED,
    ClientLayout,
    DenseOutput,
    dense_lora,
    dense_outputs,
)

if TYPE_CHECKING:
    from fedbip_cli.fullmerge import CheckpointWorkspace

# progress(stage, total) starts a stage and returns the function that advances it.
Progress = Callable[[str, int], Callable[[int], None]]
DEVICES = ("auto", "cpu", "cuda")


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a user error."""
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available", hint="use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class LockState:
    """A run's lock file: where it is, what this run resolved to, and whether the run was held to it."""

    path: Path
    record: dict[str, Any]
    locked: bool


@dataclass
class Workspace:
    """Validated inputs: every adapter checked, modules consistent across clients.

    ``specs`` are the SOURCES as given, relative paths taken from ``base_dir``; ``resolved`` says
    which clients each one expanded to.
    """

    specs: list[str]
    sources: list[ResolvedSource]
    adapters: list[Adapter]
    modules: list[str]  # parts every client holds as LoRA factors (or lacks): the factor engine's
    base: str | None = None
    base_revision: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    resolved: list[tuple[str, list[ResolvedSource]]] = field(default_factory=list)
    lock: LockState | None = None
    dense_parts: list[str] = field(default_factory=list)  # parts some client holds densely (``parts``)
    base_tensors: BaseTensors | None = None  # the base's weights, when a dense part needs them
    kind: ClassVar[str] = LORA

    @property
    def clients(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def parts(self) -> list[str]:
        """Every part of the clients' task vectors, in natural order."""
        return sorted([*self.modules, *self.dense_parts], key=natural_key)


@dataclass(frozen=True)
class MergeOptions:
    """Every option that changes a merge's result (recorded in the manifest)."""

    granularity: str = "model"
    weights: WeightOptions = field(default_factory=WeightOptions)
    combine: str = "svd"
    rank: int | None = None
    device: str = "auto"
    to_lora: int | None = None  # full checkpoints: write rank-R adapters instead of checkpoints
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE  # full checkpoints: the largest output shard
    similarity: str = "exact"  # or "sketch" (adapters only), with sketch_dim and sketch_seed
    sketch_dim: int | None = None
    sketch_seed: int | None = None
    dtype: str = "auto"  # adapters: the output dtype (auto: the inputs' when they agree, else float32)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        registered(self.combine)  # raises on an unknown name, listing the valid ones
        if self.dtype != "auto" and self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose one of auto, {', '.join(OUTPUT_DTYPES)}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"rank {self.rank} must be a positive integer")
        if self.to_lora is not None and self.to_lora < 1:
            raise UsageError(f"to-lora rank {self.to_lora} must be a positive integer")
        parse_size(self.max_shard_size)
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        SimilarityMethod(
            self.similarity, self.sketch_dim, self.sketch_seed
        )  # raises on a bad method, dimension or seed

    @property
    def method(self) -> SimilarityMethod:
        """How the similarity is computed (``exact``, or ``sketch`` with its dimension and seed)."""
        return SimilarityMethod(self.similarity, self.sketch_dim, self.sketch_seed)

    def check_kind(self, kind: str) -> None:
        """Refuse the options that do not apply to inputs of ``kind`` (``lora`` or ``full``)."""
        if kind == LORA and self.to_lora is not None:
            raise UsageError("--to-lora applies to full fine-tuned checkpoints", hint="merged adapters take --rank R")
        if kind == FULL and (self.rank is not None or self.combine != "svd"):
            option = "--rank" if self.rank is not None else f"--combine {self.combine}"
            raise UsageError(
                f"{option} applies to LoRA adapters",
                hint="full checkpoints are merged whole, or written as adapters with --to-lora R",
            )
        check_method_kind(self.method, kind)

    def as_dict(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "weighting": self.weights.weighting,
            "negative": self.weights.negative,
            "temperature": self.weights.temperature,
            "top_k": self.weights.top_k,
            "combine": self.combine,
            "rank": self.rank,
            "dtype": self.dtype,
            "similarity": self.method.as_dict(),
        }


def check_method_kind(method: SimilarityMethod, kind: str) -> None:
    """Refuse a sketched similarity of full checkpoints: their deltas are dense, the sketch works on LoRA factors."""
    if kind == FULL and method.name != "exact":
        raise UsageError(
            f"--similarity {method.name} applies to LoRA adapters",
            hint="full fine-tuned checkpoints are compared exactly; drop --similarity, or convert them with --to-lora first",
        )


@dataclass
class MergeResult:
    similarity: SimilarityResult
    weights: dict[str, torch.Tensor]  # per group, (K, K)
    rank: int
    energy: dict[str, dict[str, float | None]]  # client -> module -> energy kept
    out: Path
    manifest: dict[str, Any]
    lock_written: bool = False


def load(
    specs: Sequence[str],
    *,
    base: str | None = None,
    base_dir: Path | None = None,
    lock: Path | None = None,
    locked: bool = False,
    weights: bool = True,
) -> Workspace | CheckpointWorkspace:
    """Resolve and validate every source (and the base, when given).

    Adapters give a ``Workspace``; full fine-tuned checkpoints a ``fullmerge.CheckpointWorkspace``
    (they need ``base``), to which ``inspect``, ``plan`` and ``merge`` hand over.

    Args:
        specs: the SOURCES.
        base: a base model to check module names and shapes against (full checkpoints: the model
            their task vectors W - W_base are taken from).
        base_dir: the directory relative SOURCES and ``base`` are taken from (default: the working
            directory; a config file's directory for the sources it names).
        lock: a lock file. The record of what this run resolved to is kept in ``Workspace.lock``
            for ``merge`` to write.
        locked: refuse inputs that resolve differently from ``lock``: Hub commits (sources and base)
            as soon as they are resolved, before any weights are fetched; file hashes once fetched.
        weights: False for a dry run: full checkpoints are known from their safetensors headers
            alone (a Hub one's weights are not fetched, no file is hashed, a lock's commits are
            checked but not their weights' hashes); the workspace can be planned, not merged.

    Raises:
        FedbipError: a source or the base cannot be resolved or is invalid, or (``locked``) an input moved.
    """
    if locked and lock is None:
        raise UsageError("--locked needs --lock FILE", hint="name the lock file to check against with --lock")
    directory = Path.cwd() if base_dir is None else Path(base_dir)
    resolved = resolve_specs(list(specs), base_dir=directory, weights=False)  # Hub clients: configs only so far
    sources = [source for _, group in resolved for source in group]
    if len(sources) < 2:
        raise SourceError(
            f"found {len(sources)} adapter(s); merging needs at least 2 clients",
            where=", ".join(specs) or "SOURCES",
            hint="pass a directory of adapter directories, several adapter directories, or an @list file",
        )
    base_revision = None if base is None else resolve_revision(base)
    lock = None if lock is None else Path(lock)
    held = lockfile.read_lock(lock) if locked and lock is not None else None
    if held is not None and lock is not None:
        # Commits first: a branch that moved is refused before its weights are downloaded.
        lockfile.check_sources(held, lockfile.sources_record(resolved, hashes=False), lock)
        lockfile.check_base(held, lockfile.base_record(base, base_revision), lock)
    # A dry run fetches adapters (small) but not full checkpoints, which it knows from their headers.
    fetch_weights(sources if weights else [s for s in sources if s.kind != FULL])
    pinned = lockfile.sources_record(resolved, full_hashes=weights) if lock is not None else {}
    if held is not None and lock is not None:
        lockfile.check_sources(held, pinned, lock)
    workspace: Workspace | CheckpointWorkspace
    if any(s.kind == FULL for s in sources):
        # Imported here: fullmerge builds on this module (options, results, output directory).
        from fedbip_cli.fullmerge import load_checkpoints

        workspace = load_checkpoints(
            list(specs),
            sources,
            base,
            base_dir=directory,
            resolved=resolved,
            base_revision=base_revision,
            weights=weights,
        )
    else:
        workspace = _load_adapters(list(specs), sources, base, base_revision, directory, resolved, weights=weights)
    if lock is not None:
        base_pin = lockfile.base_record(base, workspace.base_revision)
        workspace.lock = LockState(lock, lockfile.lock_record(pinned, base_pin), locked)
    return workspace


def _load_adapters(
    specs: list[str],
    sources: list[ResolvedSource],
    base: str | None,
    base_revision: str | None,
    directory: Path,
    resolved: list[tuple[str, list[ResolvedSource]]],
    *,
    weights: bool = True,
) -> Workspace:
    """Validate LoRA adapters: consistent with each other, and with ``base`` (at commit ``base_revision``
    when from the Hub) when given. The base's shapes come from its safetensors headers; its weights are
    fetched only when a part needs them (DoRA, saved modules, trained biases, embedding copies) and
    never for a dry run (``weights=False``)."""
    adapters = [load_adapter(s) for s in sources]
    _check_consistent(adapters)
    dense = sorted({p for a in adapters for p in a.dense}, key=natural_key)
    factor_modules = [m for m in all_modules(adapters) if m not in set(dense)]
    workspace = Workspace(
        specs, sources, adapters, factor_modules, base_dir=directory, resolved=resolved, dense_parts=dense
    )
    needs_base = [(a, d) for a in adapters for d in a.dense.values() if d.kind in NEEDS_BASE]
    copies = any(a.base_copies for a in adapters)
    if base is None:
        _check_same_base(adapters)
        if needs_base:
            adapter, part = needs_base[0]
            raise AdapterError(
                f"{PART_KINDS[part.kind]} ({part.tensor}) is a change of a base tensor; "
                "its task vector needs the base model's weights",
                where=adapter.where,
                hint="pass --base MODEL, the model the adapters were trained on (a directory or hf:// reference)",
            )
        return workspace
    shapes = model_shapes(base, revision=base_revision, base_dir=directory)
    check_against_base(adapters, shapes)
    workspace.base, workspace.base_revision = base, shapes.revision
    if weights and (needs_base or copies):  # the base's weights are read only when a part needs them
        workspace.base_tensors = BaseTensors.open(base, revision=shapes.revision, base_dir=directory)
        check_copies(adapters, workspace.base_tensors)
    return workspace


# How each kind of dense part is named in messages.
PART_KINDS = {
    DORA: "a DoRA module",
    SAVED: "a saved module (modules_to_save)",
    BIAS: "a trained bias (bias='lora_only' or 'all')",
}


def _check_same_base(adapters: Sequence[Adapter]) -> None:
    """Without --base, the clients must name one base model in their configs."""
    bases: dict[str, list[str]] = {}
    for adapter in adapters:
        if adapter.base_model is not None:
            bases.setdefault(adapter.base_model, []).append(adapter.name)
    if len(bases) > 1:
        listed = "; ".join(f"{base}: {', '.join(names)}" for base, names in bases.items())
        raise AdapterError(
            f"the clients were trained on different base models ({listed})",
            where=adapters[0].where,
            hint="merge each base model's adapters separately, or pass --base MODEL to check every client "
            "against one base (their shapes must match it)",
        )


def _check_consistent(adapters: Sequence[Adapter]) -> None:
    """The same module must have the same shape in every client, and the layouts must agree."""
    seen: dict[str, tuple[str, int, int]] = {}
    for adapter in adapters:
        for name, spec in adapter.modules.items():
            first = seen.setdefault(name, (adapter.name, spec.out_features, spec.in_features))
            if first[1:] != (spec.out_features, spec.in_features):
                raise AdapterError(
                    f"module {name} is {spec.out_features}x{spec.in_features} here but "
                    f"{first[1]}x{first[2]} in client {first[0]}",
                    where=adapter.where,
                    hint="all adapters must be trained on the same base model",
                )
    layouts = {a.fan_in_fan_out for a in adapters}
    if len(layouts) > 1:
        odd = next(a for a in adapters if a.fan_in_fan_out != adapters[0].fan_in_fan_out)
        raise AdapterError(
            "fan_in_fan_out differs between clients",
            where=odd.where,
            hint="all adapters must be trained on the same base model architecture",
        )


def inspect(
    workspace: Workspace | CheckpointWorkspace,
    *,
    granularity: str = "model",
    device: str = "auto",
    progress: Progress | None = None,
    cache: InnerProductCache | None = None,
    similarity: str = "exact",
    sketch_dim: int | None = None,
    sketch_seed: int | None = None,
) -> SimilarityResult:
    """Similarity of the clients' task vectors at ``granularity``: exact, or sketched (``sketch.py``).

    ``cache`` supplies the inner products computed by earlier runs and records the new ones; the
    result is the same bits with or without it. Full checkpoints take their dense path, without it.
    ``similarity="sketch"`` (adapters only) sketches each module to ``sketch_dim``² numbers with
    projections seeded by ``sketch_seed``; it uses no cache.
    """
    method = SimilarityMethod(similarity, sketch_dim, sketch_seed)
    check_method_kind(method, workspace.kind)
    if method.name == "sketch":
        if workspace.kind == LORA and workspace.dense_parts:
            raise UsageError(
                f"--similarity {method.name} compares LoRA factors; these adapters also have dense parts "
                f"({', '.join(workspace.dense_parts[:3])}{', ...' if len(workspace.dense_parts) > 3 else ''})",
                hint="drop --similarity (the exact similarity handles every kind)",
            )
        groups = group_modules(workspace.modules, granularity)
        advance = (progress or _no_progress)("similarity", len(workspace.modules))
        return sketch_similarity(
            workspace.adapters, granularity, groups, method, device=resolve_device(device), progress=advance
        )
    if workspace.kind == FULL:
        return workspace.inspect(granularity=granularity, device=device, progress=progress)
    groups = group_modules(workspace.parts, granularity, module_of=part_module)
    advance = (progress or _no_progress)("similarity", len(workspace.parts))
    inner = module_inner_products(
        workspace.adapters, workspace.modules, device=resolve_device(device), cache=cache, progress=advance
    )
    reader = FactorReader()
    for part in workspace.dense_parts:  # dense parts: exact float64 Grams, not cached
        deltas = dense_deltas(workspace.adapters, part, workspace.base_tensors, reader)
        inner[part] = dense_inner_products(deltas)
        advance(1)
    return similarity_from_inner(workspace.clients, granularity, groups, inner)


def default_rank(workspace: Workspace, options: MergeOptions) -> int:
    """``--rank`` or the largest input rank."""
    ranks = [m.rank for a in workspace.adapters for m in a.modules.values()]
    ranks += [d.lora.rank for a in workspace.adapters for d in a.dense.values() if d.lora is not None]
    return options.rank or max(ranks, default=1)


def plan(
    workspace: Workspace | CheckpointWorkspace,
    options: MergeOptions,
    out: Path | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """What a merge would do, without computing: clients, ranks, modules, groups, output size.

    With ``out``, also refuse an output location that ``merge`` would refuse.
    """
    options.check_kind(workspace.kind)
    if out is not None:
        _check_out(Path(out).absolute(), workspace, overwrite)
    common = {
        "kind": workspace.kind,
        "out": None if out is None else str(Path(out).absolute()),
        "sources": [{"spec": spec, "clients": [s.name for s in group]} for spec, group in workspace.resolved],
        "base": {"source": workspace.base, "revision": workspace.base_revision} if workspace.base else None,
        "lock": None if workspace.lock is None else {"file": str(workspace.lock.path), "locked": workspace.lock.locked},
        "similarity": options.method.as_dict(),
    }
    if workspace.kind == FULL:
        return {**common, **workspace.plan(options)}
    groups = group_modules(workspace.parts, options.granularity, module_of=part_module)
    rank = default_rank(workspace, options)
    # Every client weighing every client: the largest each output can be.
    full = {name: torch.ones(len(workspace.adapters), len(workspace.adapters)) for name in groups}
    group_of = {part: name for name, members in groups.items() for part in members}
    layouts, _ = _layouts(workspace, options, full, group_of, rank)
    itemsize = torch.empty(0, dtype=output_dtype(workspace.adapters, options.dtype)).element_size()
    per_client = max(sum(math.prod(shape) for shape in layout.entries.values()) for layout in layouts.values())
    per_client *= itemsize
    return {
        **common,
        "clients": [
            {
                "name": a.name,
                "source": a.source.origin,
                "revision": a.source.revision,
                "modules": len(a.parts),
                "ranks": sorted({m.rank for m in a.modules.values()}),
            }
            for a in workspace.adapters
        ],
        "modules": len(workspace.parts),
        "dense_parts": len(workspace.dense_parts),
        "granularity": options.granularity,
        "groups": {name: len(members) for name, members in groups.items()},
        "combine": options.combine,
        "rank": rank if registered(options.combine).uses_rank else None,
        "dtype": str(output_dtype(workspace.adapters, options.dtype)).removeprefix("torch."),
        # An upper bound: cat only stacks clients with non-zero weight.
        "output_bytes": per_client * len(workspace.adapters),
    }


# --dtype: auto keeps the inputs' dtype when they all agree (float32 otherwise).
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def output_dtype(adapters: Sequence[Adapter], name: str = "auto") -> torch.dtype:
    """The dtype merged adapters are written in: ``name``, or under ``auto`` the inputs' dtype when
    every stored factor and dense tensor has the same one, else float32."""
    if name != "auto":
        return OUTPUT_DTYPES[name]
    dtypes = {m.dtype for a in adapters for m in a.modules.values()}
    dtypes |= {d.lora.dtype for a in adapters for d in a.dense.values() if d.lora is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge(
    workspace: Workspace | CheckpointWorkspace,
    options: MergeOptions,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    similarity: SimilarityResult | None = None,
    cache: InnerProductCache | None = None,
) -> MergeResult:
    """Write one personalized adapter (full checkpoints: checkpoint or adapter) and model card per
    client into ``out`` (atomically) and the manifest; then the lock file, if any and not ``locked``.

    ``cache`` serves the similarity step of adapters (see ``inspect``); it changes no output byte.
    """
    options.check_kind(workspace.kind)
    if similarity is None and options.similarity != "exact":
        similarity = inspect(
            workspace,
            granularity=options.granularity,
            device=options.device,
            progress=progress,
            similarity=options.similarity,
            sketch_dim=options.sketch_dim,
            sketch_seed=options.sketch_seed,
        )
    if workspace.kind == FULL:
        result = workspace.merge(options, out, overwrite=overwrite, progress=progress, similarity=similarity)
    else:
        result = _merge_adapters(
            workspace, options, out, overwrite=overwrite, progress=progress, similarity=similarity, cache=cache
        )
    lock = workspace.lock
    if lock is not None and not lock.locked:  # --locked holds the run to the lock file, never rewrites it
        lockfile.write_lock(lock.path, lock.record)
        result.lock_written = True
    return result


def _merge_adapters(
    workspace: Workspace,
    options: MergeOptions,
    out: Path,
    *,
    overwrite: bool,
    progress: Progress | None,
    similarity: SimilarityResult | None,
    cache: InnerProductCache | None,
) -> MergeResult:
    """``merge`` of LoRA adapters: one merged adapter and its card per client."""
    out = Path(out).absolute()
    _check_out(out, workspace, overwrite)
    device = resolve_device(options.device)
    start = progress or _no_progress
    similarity = similarity or inspect(
        workspace, granularity=options.granularity, device=options.device, progress=progress, cache=cache
    )
    weights = {name: personalized_weights(g.similarity, options.weights) for name, g in similarity.groups.items()}
    group_of = {m: name for name, g in similarity.groups.items() for m in g.modules}
    rank = default_rank(workspace, options)
    dtype = output_dtype(workspace.adapters, options.dtype)
    clients = workspace.clients
    fan_in_fan_out = workspace.adapters[0].fan_in_fan_out
    layouts, dense = _layouts(workspace, options, weights, group_of, rank)
    out_features = {name: m.out_features for a in workspace.adapters for name, m in a.modules.items()}
    out_features |= {n: d.lora_shape(fan_in_fan_out)[0] for n, d in dense.items() if d.how == AS_LORA}
    filled = {c: layouts[c].zero_biases(out_features) for c in clients}

    energy: dict[str, dict[str, float | None]] = {c: {} for c in clients}
    with atomic_output(out, workspace, overwrite=overwrite) as tmp:
        writers = {c: StreamingAdapterWriter(tmp / c / WEIGHTS_NAME, layouts[c].entries, dtype) for c in clients}
        advance = start("merge", len(workspace.parts))
        reader = FactorReader()
        for module in workspace.modules:
            factors = module_factors(workspace.adapters, module, device=device, reader=reader)
            rows = weights[group_of[module]].to(device)
            for i, result in enumerate(merge_module(options.combine, factors, rows, rank)):
                if result is not None:
                    writers[clients[i]].write(module, result.b, result.a)
                    energy[clients[i]][module] = result.energy
            advance(1)
        for part, output in dense.items():
            deltas = dense_deltas(workspace.adapters, part, workspace.base_tensors, reader)
            present = [j for j, d in enumerate(deltas) if d is not None]
            stacked = torch.stack([deltas[j] for j in present])
            merged = weighted_sum(stacked, weights[group_of[part]][:, present].to(torch.float64))
            base = workspace.base_tensors.read(output.tensor) if workspace.base_tensors is not None else None
            for i, client in enumerate(clients):
                layout = layouts[client]
                if output.how == AS_SAVED:
                    writers[client].write_tensor(
                        f"{KEY_PREFIX}{output.tensor}", merged[i] if base is None else base + merged[i]
                    )
                elif output.how == AS_LORA and part in layout.ranks:
                    result = dense_lora(part, merged[i], layout.ranks[part], fan_in_fan_out)
                    writers[client].write(part, result.b, result.a)
                    energy[client][part] = result.energy
                elif output.how == AS_BIAS:
                    assert base is not None  # a trained bias needs the base (checked at load)
                    writers[client].write_tensor(layout.bias_key(output.module), base + merged[i])
                elif output.how == AS_LORA_BIAS and output.module in layout.lora_biases:
                    writers[client].write_tensor(f"{KEY_PREFIX}{output.module}.lora_B.bias", merged[i])
            advance(1)
        for client in clients:
            for module in filled[client]:
                writers[client].write_tensor(f"{KEY_PREFIX}{module}.lora_B.bias", torch.zeros(out_features[module]))
        advance = start("write", len(clients))
        record = manifest.merge_record(workspace, options, similarity, weights, rank, energy, device)
        record["parts"] = _parts_record(workspace, dense)
        bias_mode = "all" if any(a.config.get("bias") == "all" for a in workspace.adapters) else "lora_only"
        for adapter in workspace.adapters:
            digest = writers[adapter.name].close()
            directory = tmp / adapter.name
            write_config(directory, layouts[adapter.name].config(adapter.config, bias_mode))
            card = model_card(record, adapter.name, adapter.config.get("base_model_name_or_path"))
            (directory / CARD_NAME).write_text(card, encoding="utf-8")
            record["outputs"][adapter.name] = {
                f"{adapter.name}/{f.name}": digest if f.name == WEIGHTS_NAME else file_sha256(f)
                for f in sorted(directory.iterdir())
            }
            advance(1)
        manifest.dump(record, tmp / manifest.MANIFEST_NAME)
    return MergeResult(similarity, weights, rank, energy, out, record)


def _layouts(
    workspace: Workspace,
    options: MergeOptions,
    weights: dict[str, torch.Tensor],
    group_of: dict[str, str],
    rank: int,
) -> tuple[dict[str, ClientLayout], dict[str, DenseOutput]]:
    """Every output's tensors and ranks, known before any compute, in the order the merge writes them:
    the LoRA modules, then the dense parts (the files are streamed module by module)."""
    adapters, clients = workspace.adapters, workspace.clients
    layouts = {c: ClientLayout() for c in clients}
    for module in workspace.modules:
        spec = next(a.modules[module] for a in adapters if module in a.modules)
        inputs = [a.modules[module].rank if module in a.modules else None for a in adapters]
        rows = weights[group_of[module]]
        for i, client in enumerate(clients):
            r = output_rank(options.combine, inputs, rows[i], rank, (spec.out_features, spec.in_features))
            if r > 0:  # no contributing client targets this module: ΔW = 0, leave it out
                layouts[client].add_lora(module, r, (spec.out_features, spec.in_features), embedding=spec.embedding)
    dense = dense_outputs(adapters, workspace.dense_parts)
    for part, output in dense.items():
        holders = torch.tensor([part in a.dense or part in a.modules for a in adapters])
        rows = weights[group_of[part]]
        for i, client in enumerate(clients):
            contributes = bool(((rows[i] != 0) & holders).any())
            layouts[client].add_dense(output, options.combine, rank, contributes, adapters[0].fan_in_fan_out)
    return layouts, dense


def _parts_record(workspace: Workspace, dense: dict[str, DenseOutput]) -> dict[str, Any]:
    """The manifest's account of the task vectors' parts: each client's kinds, and how dense parts were
    written back (and which had no base tensor, so that their delta was taken against zero)."""
    kinds = {
        a.name: dict(
            sorted(
                (
                    {
                        **{m: "embedding-lora" if s.embedding else "lora" for m, s in a.modules.items()},
                        **{p: d.kind for p, d in a.dense.items()},
                    }
                ).items(),
                key=lambda item: natural_key(item[0]),
            )
        )
        for a in workspace.adapters
    }
    base = workspace.base_tensors
    return {
        "kinds": kinds,
        "written_as": {p: o.how for p, o in dense.items()},
        "against_zero": [
            o.tensor for o in dense.values() if o.how == AS_SAVED and (base is None or base.find(o.tensor) is None)
        ],
    }


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_out(out: Path, workspace: Workspace | CheckpointWorkspace, overwrite: bool) -> None:
    real = out.resolve()
    inputs = [s.path.resolve() for s in workspace.sources]
    given = [*workspace.specs, *([workspace.base] if workspace.base else [])]  # the base is an input too
    paths = [(workspace.base_dir / Path(s).expanduser()).resolve() for s in given if not s.startswith(("hf://", "@"))]
    inputs += [path for path in paths if path.exists()]
    for path in inputs:
        if _inside(real, path):
            raise OutputError(
                f"output directory lies inside the source {path}",
                where=str(out),
                hint="choose an --out outside every source",
            )
        if _inside(path, real):
            raise OutputError(
                f"output directory contains the source {path}",
                where=str(out),
                hint="choose an --out that holds no input",
            )
    if real.exists() and not real.is_dir():
        raise OutputError("exists and is not a directory", where=str(out), hint="choose another --out")
    if real.is_dir() and any(real.iterdir()) and not overwrite:
        raise OutputError(
            "output directory exists and is not empty",
            where=str(out),
            hint="pass --overwrite to replace it, or choose another --out",
        )


@contextmanager
def atomic_output(out: Path, workspace: Any, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out`` that replaces it when the block succeeds.

    ``out`` is checked first (not inside or around a source of ``workspace``; empty unless
    ``overwrite``); on any failure the temporary directory is removed and ``out`` is left as it was.
    """
    _check_out(out, workspace, overwrite)
    tmp = out.parent / f".{out.name}.fedbip-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an old ``out`` is removed only after the move."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.fedbip-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
