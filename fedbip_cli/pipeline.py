"""One call per command, for every kind of source: load → inspect → plan → merge → write.

``load`` resolves and validates everything up front (so a bad input fails before any compute or
output) into a ``Workspace``: LoRA adapters (``adapter_workspace``) or full fine-tuned checkpoints
(``checkpoint_workspace``), two sources of task-vector parts. ``inspect`` computes similarities,
``plan`` says what a merge would write, ``merge`` writes one personalized output and model card per
client and the manifest, atomically. Progress is reported through an optional callback; nothing
here prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedbip_cli import lockfile, manifest
from fedbip_cli.adapter_workspace import AdapterWorkspace, default_base, load_adapters
from fedbip_cli.adapters import file_sha256
from fedbip_cli.boundedio import read_json
from fedbip_cli.card import CARD_NAME, model_card
from fedbip_cli.checkpoint_workspace import CheckpointWorkspace, load_checkpoints
from fedbip_cli.defence import clipped_weights, outliers
from fedbip_cli.errors import OutputError, SourceError, UsageError
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.options import (
    DEVICES,
    OUTPUT_DTYPES,
    LockState,
    MergeOptions,
    MergeResult,
    Progress,
    check_heads,
    check_method_kind,
    resolve_device,
    start,
)
from fedbip_cli.outdir import Outputs, check_out
from fedbip_cli.similarity import SimilarityResult, similarity_from_inner
from fedbip_cli.sketch import SimilarityMethod
from fedbip_cli.sources import FULL, LORA, fetch_weights, model_reference, resolve_revision, resolve_specs
from fedbip_cli.taskvec import group_modules
from fedbip_cli.weights import personalized_weights
from fedbip_cli.workspace import Workspace

SWEEP_NAME = "fedbip-sweep.json"  # in a sweep's OUT: the sets and their options
UNLISTED = f"no {manifest.MANIFEST_NAME} in it lists them"  # why a merge refuses to replace entries of OUT
SWEEP_UNLISTED = f"no {SWEEP_NAME} in it names them as sets whose {manifest.MANIFEST_NAME} lists them"

__all__ = [
    "DEVICES",
    "OUTPUT_DTYPES",
    "AdapterWorkspace",
    "CheckpointWorkspace",
    "LockState",
    "MergeOptions",
    "MergeResult",
    "Progress",
    "Workspace",
    "inspect",
    "load",
    "merge",
    "merge_sweep",
    "plan",
    "resolve_device",
]


def load(
    specs: Sequence[str],
    *,
    base: str | None = None,
    base_dir: Path | None = None,
    lock: Path | None = None,
    locked: bool = False,
    weights: bool = True,
    heads: str | None = None,
) -> Workspace:
    """Resolve and validate every source (and the base, when given).

    Adapters give an ``AdapterWorkspace``; full fine-tuned checkpoints a ``CheckpointWorkspace``
    (they need ``base``).

    Args:
        specs: the SOURCES.
        base: a base model to check module names and shapes against (full checkpoints: the model
            their task vectors W - W_base are taken from): a directory, an ``hf://`` reference or an
            ``owner/name`` Hub id. Without it, adapters are checked against the base they all name in
            ``base_model_name_or_path`` when it resolves.
        base_dir: the directory relative SOURCES and ``base`` are taken from (default: the working
            directory; a config file's directory for the sources it names).
        lock: a lock file. The record of what this run resolved to is kept in ``Workspace.lock``
            for ``merge`` to write.
        locked: refuse inputs that resolve differently from ``lock``: Hub commits (sources and base)
            as soon as they are resolved, before any weights are fetched; file hashes once fetched.
        weights: False for a dry run: full checkpoints are known from their safetensors headers
            alone (a Hub one's weights are not fetched, no file is hashed, a lock's commits are
            checked but not their weights' hashes); the workspace can be planned, not merged.
        heads: what happens to adapters' saved modules (``--heads``: merge, own or exclude); None
            refuses saved modules that the base lacks.

    Raises:
        FedbipError: a source or the base cannot be resolved or is invalid, or (``locked``) an input moved.
    """
    check_heads(heads)
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
    if base is not None:
        base = model_reference(base, directory)  # a local directory, or an owner/name Hub id as peft reads it
    elif all(s.kind == LORA for s in sources):
        base = default_base(sources, directory)  # the base the adapters name, when it resolves
    base_revision = None if base is None else resolve_revision(base)
    lock = None if lock is None else Path(lock)
    if lock is not None and not locked:
        lockfile.check_replaceable(lock)  # before anything is read: a merge would end by replacing it
    held = lockfile.read_lock(lock) if locked and lock is not None else None
    if held is not None and lock is not None:
        # Commits first: a branch that moved is refused before its weights are downloaded.
        lockfile.check_sources(held, lockfile.sources_record(resolved, hashes=False), lock)
        lockfile.check_base(held, lockfile.base_record(base, base_revision), lock)
    # A dry run fetches adapters (small) but not full checkpoints, which it knows from their headers.
    fetch_weights(sources if weights else [s for s in sources if s.kind != FULL])
    workspace: Workspace
    if any(s.kind == FULL for s in sources):
        if heads is not None:
            raise UsageError(
                "--heads applies to adapters' saved modules", hint="full checkpoints are merged whole; drop --heads"
            )
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
        workspace = load_adapters(
            list(specs), sources, base, base_revision, directory, resolved, weights=weights, heads=heads
        )
    if lock is not None:
        # Hashed once the headers are checked: a shape mismatch they show costs no read of the weights.
        pinned = lockfile.sources_record(resolved, full_hashes=weights)
        if held is not None:
            lockfile.check_sources(held, pinned, lock)
        base_pin = lockfile.base_record(base, workspace.base_revision)
        workspace.lock = LockState(lock, lockfile.lock_record(pinned, base_pin), locked)
    return workspace


def inspect(
    workspace: Workspace,
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

    ``cache`` supplies the inner products of LoRA modules computed by earlier runs and records the
    new ones; the result is the same bits with or without it. Dense parts and full checkpoints take
    the exact dense path, without it. ``similarity="sketch"`` (adapters only) sketches each module to
    ``sketch_dim``² numbers with projections seeded by ``sketch_seed``; it uses no cache.
    """
    method = SimilarityMethod(similarity, sketch_dim, sketch_seed)
    check_method_kind(method, workspace.kind)
    if method.name == "sketch":
        result = workspace.sketched(granularity, method, resolve_device(device), progress)
    else:
        groups = group_modules(workspace.parts, granularity, module_of=workspace.module_of)
        advance = start(progress, "similarity", len(workspace.parts))
        inner = workspace.inner_products(resolve_device(device), cache, advance)
        result = similarity_from_inner(workspace.clients, granularity, groups, inner)
    result.covers = workspace.coverage()
    return result


def plan(
    workspace: Workspace, options: MergeOptions, out: Path | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """What a merge would do, without computing: clients, ranks, modules, groups, output size.

    With ``out``, also refuse an output location that ``merge`` would refuse.
    """
    options.check_kind(workspace.kind)
    if out is not None:
        check_out(Path(out).absolute(), workspace.input_paths(), overwrite, manifest.foreign_entries, UNLISTED)
    groups = group_modules(workspace.parts, options.granularity, module_of=workspace.module_of)
    outputs = workspace.plan_outputs(options, groups)
    return {
        "kind": workspace.kind,
        "out": None if out is None else str(Path(out).absolute()),
        "sources": [{"spec": spec, "clients": [s.name for s in group]} for spec, group in workspace.resolved],
        "base": {"source": workspace.base, "revision": workspace.base_revision} if workspace.base else None,
        "lock": None if workspace.lock is None else {"file": str(workspace.lock.path), "locked": workspace.lock.locked},
        "similarity": options.method.as_dict(),
        "clients": outputs.pop("clients"),
        "granularity": options.granularity,
        "groups": {name: len(members) for name, members in groups.items()},
        **outputs,
    }


def merge(
    workspace: Workspace,
    options: MergeOptions,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    similarity: SimilarityResult | None = None,
    cache: InnerProductCache | None = None,
) -> MergeResult:
    """Write one personalized output (an adapter; for full checkpoints a checkpoint, or an adapter with
    ``to_lora``) and model card per client, the manifest, and the lock file (if any and not ``locked``):
    all committed together, or none (``outdir.Outputs``).

    ``similarity`` skips the similarity step (it must be of this workspace at ``options.granularity``);
    ``cache`` serves the similarity step of adapters (see ``inspect``); it changes no output byte.
    """
    options.check_kind(workspace.kind)
    out = Path(out).absolute()
    inputs = workspace.input_paths()
    check_out(out, inputs, overwrite, manifest.foreign_entries, UNLISTED)
    device = resolve_device(options.device)
    similarity = similarity or _similarity(workspace, options, progress, cache)
    lock = _checked_lock(workspace, out)
    with Outputs() as outputs:
        tmp = outputs.directory(out, inputs, overwrite=overwrite, owner=manifest.foreign_entries, why=UNLISTED)
        result = _write_set(workspace, options, similarity, tmp, device, progress)
        _write_lock(outputs, lock)
    result.out = out
    result.lock_written = lock is not None and not lock.locked
    return result


def merge_sweep(
    workspace: Workspace,
    settings: Sequence[tuple[str, MergeOptions]],
    out: Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    cache: InnerProductCache | None = None,
) -> list[MergeResult]:
    """Write one merge output set per named setting into ``out/<name>/``, each exactly what ``merge`` with
    those options writes, from one similarity computation; and ``out/fedbip-sweep.json`` naming the
    sets. All are committed together, or none. The settings share the granularity and similarity method
    (the similarity depends on nothing else).
    """
    first = settings[0][1]
    for name, options in settings:
        options.check_kind(workspace.kind)
        if (options.granularity, options.method) != (first.granularity, first.method):
            raise UsageError(
                f"sweep setting {name} changes the granularity or the similarity method",
                hint="a sweep varies how similarities become weights and merges, not the similarity",
            )
    out = Path(out).absolute()
    inputs = workspace.input_paths()
    check_out(out, inputs, overwrite, sweep_foreign, SWEEP_UNLISTED)
    lock = _checked_lock(workspace, out)
    similarity = _similarity(workspace, first, progress, cache)
    results = []
    with Outputs() as outputs:
        tmp = outputs.directory(out, inputs, overwrite=overwrite, owner=sweep_foreign, why=SWEEP_UNLISTED)
        for name, options in settings:
            (tmp / name).mkdir()
            result = _write_set(workspace, options, similarity, tmp / name, resolve_device(options.device), progress)
            result.out = out / name
            results.append(result)
        record = {"fedbip_sweep": 1, "sets": {name: options.as_dict() for name, options in settings}}
        manifest.dump(record, tmp / SWEEP_NAME)
        _write_lock(outputs, lock)
    for result in results:
        result.lock_written = lock is not None and not lock.locked
    return results


def _similarity(
    workspace: Workspace, options: MergeOptions, progress: Progress | None, cache: InnerProductCache | None
) -> SimilarityResult:
    """The similarity a merge with ``options`` computes (``inspect`` with its granularity, device and method)."""
    return inspect(
        workspace,
        granularity=options.granularity,
        device=options.device,
        progress=progress,
        cache=cache,
        similarity=options.similarity,
        sketch_dim=options.sketch_dim,
        sketch_seed=options.sketch_seed,
    )


def sweep_foreign(out: Path) -> list[str]:
    """The entries of a sweep's ``out`` that fedbip cannot prove it wrote: anything but its
    ``fedbip-sweep.json`` and the sets that record names, each of which must hold nothing its own
    manifest does not list (``manifest.foreign_entries``)."""
    try:
        record = read_json(
            out / SWEEP_NAME, error=OutputError, limit=manifest.MAX_MANIFEST_BYTES, what="the sweep record"
        )
    except OutputError:
        record = None
    sets = record.get("sets") if isinstance(record, dict) and record.get("fedbip_sweep") == 1 else None
    sets = sets if isinstance(sets, dict) else {}
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == SWEEP_NAME and sets and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name in sets and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{name}" for name in manifest.foreign_entries(entry)]
            continue
        foreign.append(entry.name)
    return foreign


def _write_set(
    workspace: Workspace,
    options: MergeOptions,
    similarity: SimilarityResult,
    tmp: Path,
    device: torch.device,
    progress: Progress | None,
) -> MergeResult:
    """One output set in the staged directory ``tmp``: each client's output and card, and the manifest."""
    weights, defence = _weights(similarity, options)
    group_of = {part: name for name, g in similarity.groups.items() for part in g.modules}
    written = workspace.write(tmp, options, weights, group_of, device, progress)
    record = manifest.merge_record(workspace, options, similarity, weights, written, device)
    record["defence"] = defence
    advance = start(progress, "write", len(workspace.clients))
    for client in workspace.clients:
        directory = tmp / client
        card = model_card(record, client, written.declared_base.get(client))
        (directory / CARD_NAME).write_text(card, encoding="utf-8")
        known = written.digests.get(client, {})
        record["outputs"][client] = {
            f"{client}/{f.name}": known.get(f.name) or file_sha256(f) for f in sorted(directory.iterdir())
        }
        advance(1)
    manifest.dump(record, tmp / manifest.MANIFEST_NAME)
    return MergeResult(similarity, weights, written.rank, written.energy, tmp, record)


def _checked_lock(workspace: Workspace, out: Path) -> LockState | None:
    """The workspace's lock file, refused inside ``out`` (which the merge replaces)."""
    lock = workspace.lock
    if lock is not None and lock.path.absolute().resolve().is_relative_to(out.resolve()):
        raise OutputError("the lock file lies inside --out, which the merge replaces", where=str(lock.path))
    return lock


def _write_lock(outputs: Outputs, lock: LockState | None) -> None:
    """--locked holds the run to the lock file, never rewrites it; otherwise it is one more output."""
    if lock is not None and not lock.locked:
        outputs.file(lock.path, lockfile.check_replaceable).write_text(
            lockfile.lock_text(lock.record), encoding="utf-8"
        )


def _weights(similarity: SimilarityResult, options: MergeOptions) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Each group's weight rows (clipped by ``--clip-norm``), and the manifest's ``defence`` record: every
    group's task-vector norms, the clip's bound and the clients it scaled, and the outlier report."""
    weights: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"clip_norm": options.as_dict()["clip_norm"], "groups": {}}
    clients = similarity.clients
    for name, group in similarity.groups.items():
        rows, clip = clipped_weights(personalized_weights(group.similarity, options.weights), group.norms, options.clip)
        weights[name] = rows
        record["groups"][name] = {
            "norms": [float(n) for n in group.norms.tolist()],
            "clip": None
            if clip is None
            else {"bound": clip["bound"], "clipped": {clients[j]: scale for j, scale in clip["clipped"].items()}},
            "outliers": outliers(clients, group.similarity, group.norms),
        }
    return weights, record
