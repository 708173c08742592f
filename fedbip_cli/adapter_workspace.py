"""LoRA adapters as a source of task-vector parts: load, compare and write back.

Low-rank parts (LoRA, embedding LoRA) take the exact factor-Gram engine and its cache; dense parts
(saved modules, DoRA, trained and LoRA biases) are materialised one at a time in float64, their
Grams computed exactly and not cached. Each merged adapter is streamed module by module into its
file, in an order (``ClientLayout``) known before any compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedbip_cli.adapters import (
    BIAS,
    DORA,
    KEY_PREFIX,
    NEEDS_BASE,
    SAVED,
    WEIGHTS_NAME,
    Adapter,
    DensePart,
    FactorReader,
    StreamingAdapterWriter,
    base_keys,
    check_against_base,
    declared_base,
    load_adapter,
    part_module,
    part_name,
    write_config,
)
from fedbip_cli.errors import AdapterError, FedbipError
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.merge import merge_module, output_rank, registered, weighted_sum
from fedbip_cli.options import OUTPUT_DTYPES, MergeOptions, Progress, start
from fedbip_cli.parts import BaseTensors, check_copies, dense_deltas
from fedbip_cli.similarity import SimilarityResult, dense_inner_products, module_inner_products
from fedbip_cli.sketch import SimilarityMethod, sketch_similarity
from fedbip_cli.sources import LORA, ModelShapes, ResolvedSource, model_reference, model_shapes, resolve_revision
from fedbip_cli.taskvec import all_modules, group_modules, module_factors, natural_key
from fedbip_cli.workspace import Workspace, Written
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

# How each kind of dense part is named in messages.
PART_KINDS = {
    DORA: "a DoRA module",
    SAVED: "a saved module (modules_to_save)",
    BIAS: "a trained bias (bias='lora_only' or 'all')",
}


@dataclass(kw_only=True)
class AdapterWorkspace(Workspace):
    """Validated LoRA adapters: every adapter checked, modules consistent across clients."""

    adapters: list[Adapter]
    modules: list[str]  # parts every client holds as LoRA factors (or lacks): the factor engine's
    dense_parts: list[str] = field(default_factory=list)  # parts some client holds densely
    base_tensors: BaseTensors | None = None  # the base's weights, when a dense part needs them
    heads: str | None = None  # what happens to saved modules (``HEADS``); None when no client saves one
    held: list[str] = field(default_factory=list)  # saved parts out of the similarity (--heads own, exclude)
    kind: ClassVar[str] = LORA

    @property
    def clients(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def parts(self) -> list[str]:
        return sorted([*self.modules, *self.dense_parts], key=natural_key)

    @staticmethod
    def module_of(part: str) -> str:
        return part_module(part)

    def coverage(self) -> dict[str, Any]:
        """Which parts the similarity covers: their count by kind, ``--heads``, and the saved modules left out."""
        kinds: dict[str, int] = {}
        for part in self.parts:
            holders = [a.dense[part].kind for a in self.adapters if part in a.dense]
            kind = holders[0] if holders else "lora"
            kinds[kind] = kinds.get(kind, 0) + 1
        left_out = sorted({part_module(p) for p in self.held}, key=natural_key)
        return {"parts": dict(sorted(kinds.items())), "heads": self.heads, "left_out": left_out}

    def inner_products(
        self, device: torch.device, cache: InnerProductCache | None, advance: Callable[[int], None]
    ) -> dict[str, torch.Tensor]:
        inner = module_inner_products(self.adapters, self.modules, device=device, cache=cache, progress=advance)
        reader = FactorReader()
        for part in self.dense_parts:  # dense parts: exact float64 Grams, not cached
            inner[part] = dense_inner_products(dense_deltas(self.adapters, part, self.base_tensors, reader))
            advance(1)
        return inner

    def sketched(
        self, granularity: str, method: SimilarityMethod, device: torch.device, progress: Progress | None
    ) -> SimilarityResult:
        """LoRA parts sketched; dense parts (saved modules, DoRA, biases) exact, added to the same Grams."""
        groups = group_modules(self.parts, granularity, module_of=self.module_of)
        advance = start(progress, "similarity", len(self.parts))
        reader = FactorReader()

        def dense(part: str) -> torch.Tensor:
            return dense_inner_products(dense_deltas(self.adapters, part, self.base_tensors, reader)).to(device)

        return sketch_similarity(
            self.adapters,
            granularity,
            groups,
            method,
            device=device,
            progress=advance,
            dense=dense,
            dense_parts=set(self.dense_parts),
        )

    def rank(self, options: MergeOptions) -> int:
        """``--rank`` or the largest input rank."""
        ranks = [m.rank for a in self.adapters for m in a.modules.values()]
        ranks += [d.lora.rank for a in self.adapters for d in a.dense.values() if d.lora is not None]
        return options.rank or max(ranks, default=1)

    def output_dtype(self, name: str = "auto") -> torch.dtype:
        """The dtype merged adapters are written in: ``name``, or under ``auto`` the inputs' dtype when
        every stored factor and dense tensor has the same one, else float32."""
        if name != "auto":
            return OUTPUT_DTYPES[name]
        dtypes = {m.dtype for a in self.adapters for m in a.modules.values()}
        dtypes |= {d.lora.dtype for a in self.adapters for d in a.dense.values() if d.lora is not None}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def plan_outputs(self, options: MergeOptions, groups: dict[str, list[str]]) -> dict[str, Any]:
        rank = self.rank(options)
        # Every client weighing every client: the largest each output can be.
        full = {name: torch.ones(len(self.adapters), len(self.adapters)) for name in groups}
        group_of = {part: name for name, members in groups.items() for part in members}
        layouts, _ = self._layouts(options, full, group_of, rank)
        dtype = self.output_dtype(options.dtype)
        per_client = max(sum(math.prod(shape) for shape in layout.entries.values()) for layout in layouts.values())
        return {
            "clients": [
                {
                    "name": a.name,
                    "source": a.source.origin,
                    "revision": a.source.revision,
                    "modules": len(a.parts),
                    "ranks": sorted({m.rank for m in a.modules.values()}),
                }
                for a in self.adapters
            ],
            "modules": len(self.parts),
            "dense_parts": len(self.dense_parts),
            "combine": options.combine,
            "rank": rank if registered(options.combine).uses_rank else None,
            "dtype": str(dtype).removeprefix("torch."),
            # An upper bound: cat only stacks clients with non-zero weight.
            "output_bytes": per_client * torch.empty(0, dtype=dtype).element_size() * len(self.adapters),
        }

    def write(
        self,
        tmp: Path,
        options: MergeOptions,
        weights: dict[str, torch.Tensor],
        group_of: dict[str, str],
        device: torch.device,
        progress: Progress | None,
    ) -> Written:
        """One merged adapter per client: the LoRA modules by the combine mode, then the dense parts."""
        rank = self.rank(options)
        dtype = self.output_dtype(options.dtype)
        clients = self.clients
        fan_in_fan_out = self.adapters[0].fan_in_fan_out
        layouts, dense = self._layouts(options, weights, group_of, rank)
        out_features = {name: m.out_features for a in self.adapters for name, m in a.modules.items()}
        out_features |= {n: d.lora_shape(fan_in_fan_out)[0] for n, d in dense.items() if d.how == AS_LORA}
        filled = {c: layouts[c].zero_biases(out_features) for c in clients}
        energy: dict[str, dict[str, float | None]] = {c: {} for c in clients}
        writers = {
            c: StreamingAdapterWriter(tmp / c / WEIGHTS_NAME, layouts[c].entries, dtype, layouts[c].dtypes)
            for c in clients
        }
        advance = start(progress, "merge", len(self.parts))
        reader = FactorReader()
        for module in self.modules:
            factors = module_factors(self.adapters, module, device=device, reader=reader)
            rows = weights[group_of[module]].to(device)
            for i, result in enumerate(merge_module(options.combine, factors, rows, rank)):
                if result is not None:
                    writers[clients[i]].write(module, result.b, result.a)
                    energy[clients[i]][module] = result.energy
            advance(1)
        for part, output in dense.items():
            self._write_dense(part, output, weights[group_of[part]], reader, layouts, writers, energy)
            advance(1)
        for client, adapter in zip(clients, self.adapters):
            for module in filled[client]:
                writers[client].write_tensor(f"{KEY_PREFIX}{module}.lora_B.bias", torch.zeros(out_features[module]))
            for part in self._own(adapter):  # --heads own: each client's saved tensors, as stored
                writers[client].write_tensor(f"{KEY_PREFIX}{part.tensor}", adapter.stored_tensor(part.key))
        bias_mode = "all" if any(a.config.get("bias") == "all" for a in self.adapters) else "lora_only"
        digests = {}
        for adapter in self.adapters:
            digests[adapter.name] = {WEIGHTS_NAME: writers[adapter.name].close()}
            write_config(tmp / adapter.name, layouts[adapter.name].config(adapter.config, bias_mode))
        uses_rank = registered(options.combine).uses_rank
        record = {
            "output": "lora",
            "combine": options.combine,
            "rank": rank if uses_rank else None,
            "parts": self._parts_record(dense),
        }
        declared = {a.name: a.config.get("base_model_name_or_path") for a in self.adapters}
        return Written(energy, rank, record, digests, declared)

    def _write_dense(
        self,
        part: str,
        output: DenseOutput,
        rows: torch.Tensor,
        reader: FactorReader,
        layouts: dict[str, ClientLayout],
        writers: dict[str, StreamingAdapterWriter],
        energy: dict[str, dict[str, float | None]],
    ) -> None:
        """Every client's Σ_j P_ij ΔW_j of one dense part, written back as ``output`` says."""
        deltas = dense_deltas(self.adapters, part, self.base_tensors, reader)
        present = [j for j, d in enumerate(deltas) if d is not None]
        merged = weighted_sum(torch.stack([deltas[j] for j in present]), rows[:, present].to(torch.float64))
        base = self.base_tensors.read(output.tensor) if self.base_tensors is not None else None
        fan_in_fan_out = self.adapters[0].fan_in_fan_out
        for i, client in enumerate(self.clients):
            layout, writer = layouts[client], writers[client]
            if output.how == AS_SAVED:
                writer.write_tensor(f"{KEY_PREFIX}{output.tensor}", merged[i] if base is None else base + merged[i])
            elif output.how == AS_LORA and part in layout.ranks:
                result = dense_lora(part, merged[i], layout.ranks[part], fan_in_fan_out)
                writer.write(part, result.b, result.a)
                energy[client][part] = result.energy
            elif output.how == AS_BIAS:
                assert base is not None  # a trained bias needs the base (checked at load)
                writer.write_tensor(layout.bias_key(output.module), base + merged[i])
            elif output.how == AS_LORA_BIAS and output.module in layout.lora_biases:
                writer.write_tensor(f"{KEY_PREFIX}{output.module}.lora_B.bias", merged[i])

    def _layouts(
        self, options: MergeOptions, weights: dict[str, torch.Tensor], group_of: dict[str, str], rank: int
    ) -> tuple[dict[str, ClientLayout], dict[str, DenseOutput]]:
        """Every output's tensors and ranks, known before any compute, in the order the merge writes them:
        the LoRA modules, then the dense parts (the files are streamed module by module)."""
        adapters, clients = self.adapters, self.clients
        layouts = {c: ClientLayout() for c in clients}
        for module in self.modules:
            spec = next(a.modules[module] for a in adapters if module in a.modules)
            inputs = [a.modules[module].rank if module in a.modules else None for a in adapters]
            rows = weights[group_of[module]]
            shape = (spec.out_features, spec.in_features)
            for i, client in enumerate(clients):
                r = output_rank(options.combine, inputs, rows[i], rank, shape)
                if r > 0:  # no contributing client targets this module: ΔW = 0, leave it out
                    layouts[client].add_lora(module, r, shape, embedding=spec.embedding)
        dense = dense_outputs(adapters, self.dense_parts)
        for part, output in dense.items():
            holders = torch.tensor([part in a.dense or part in a.modules for a in adapters])
            rows = weights[group_of[part]]
            for i, client in enumerate(clients):
                contributes = bool(((rows[i] != 0) & holders).any())
                layouts[client].add_dense(output, options.combine, rank, contributes, adapters[0].fan_in_fan_out)
        for adapter in adapters:
            for part in self._own(adapter):
                layouts[adapter.name].add_own(part)
        return layouts, dense

    def _own(self, adapter: Adapter) -> list[DensePart]:
        """The saved tensors ``adapter`` keeps as its own (``--heads own``), in natural order."""
        if self.heads != "own":
            return []
        return [adapter.dense[p] for p in self.held if p in adapter.dense]

    def _parts_record(self, dense: dict[str, DenseOutput]) -> dict[str, Any]:
        """The manifest's account of the task vectors' parts: each client's kinds, and how dense parts were
        written back (and which had no base tensor, so that their delta was taken against zero)."""
        kinds = {}
        for a in self.adapters:
            kind = {m: "embedding-lora" if s.embedding else "lora" for m, s in a.modules.items()}
            kind |= {p: d.kind for p, d in a.dense.items()}
            kinds[a.name] = dict(sorted(kind.items(), key=lambda item: natural_key(item[0])))
        base = self.base_tensors
        return {
            "kinds": kinds,
            "written_as": {p: o.how for p, o in dense.items()},
            "against_zero": [
                o.tensor for o in dense.values() if o.how == AS_SAVED and (base is None or base.find(o.tensor) is None)
            ],
            "heads": self.heads,
        }

    def inputs_record(self) -> list[dict[str, Any]]:
        return [
            {
                "name": a.name,
                "source": a.source.origin,
                "revision": a.source.revision,
                "sha256": a.sha256,
                "modules": len(a.modules),
                "ranks": sorted({m.rank for m in a.modules.values()}),
            }
            for a in self.adapters
        ]


def load_adapters(
    specs: list[str],
    sources: list[ResolvedSource],
    base: str | None,
    base_revision: str | None,
    directory: Path,
    resolved: list[tuple[str, list[ResolvedSource]]],
    *,
    weights: bool = True,
    heads: str | None = None,
) -> AdapterWorkspace:
    """Validate LoRA adapters: consistent with each other, and with ``base`` (at commit ``base_revision``
    when from the Hub) when given. The base's shapes come from its safetensors headers; its weights are
    fetched only when a part needs them (DoRA, saved modules, trained biases, embedding copies) and
    never for a dry run (``weights=False``). ``heads`` (``HEADS``) says what happens to saved modules;
    without it, saved modules that the base lacks are refused (``_check_heads``)."""
    adapters = [load_adapter(s) for s in sources]
    _check_consistent(adapters)
    saved = saved_parts(adapters)
    held = saved if heads in ("own", "exclude") else []
    dense = sorted({p for a in adapters for p in a.dense if p not in held}, key=natural_key)
    lora = [m for m in all_modules(adapters) if m not in {p for a in adapters for p in a.dense}]
    workspace = AdapterWorkspace(
        specs=specs,
        sources=sources,
        adapters=adapters,
        modules=lora,
        base_dir=directory,
        resolved=resolved,
        dense_parts=dense,
        heads=(heads or "merge") if saved else None,
        held=held,
    )
    needs_base = _needing_base(adapters, dense, heads)
    shapes = None if base is None else model_shapes(base, revision=base_revision, base_dir=directory)
    if shapes is None:
        _check_same_base(adapters)
    else:
        check_against_base(adapters, shapes)
    _check_heads(adapters, saved, heads, shapes)
    if shapes is None:
        if needs_base:
            adapter, part = needs_base[0]
            raise AdapterError(
                f"{PART_KINDS[part.kind]} ({part.tensor}) is a change of a base tensor; "
                "its task vector needs the base model's weights",
                where=adapter.where,
                hint="pass --base MODEL, the model the adapters were trained on (a directory or hf:// reference)",
            )
        return workspace
    workspace.base, workspace.base_revision = base, shapes.revision
    if weights and (needs_base or any(a.base_copies for a in adapters)):  # read only when a part needs them
        workspace.base_tensors = BaseTensors.open(base, revision=shapes.revision, base_dir=directory)
        check_copies(adapters, workspace.base_tensors)
    return workspace


def default_base(sources: Sequence[ResolvedSource], directory: Path) -> str | None:
    """Without ``--base``: the base model every adapter names (``base_model_name_or_path``, read as
    ``model_reference`` reads it), when they all name one and it resolves (a local model directory, or a
    Hub model in the Hugging Face cache or in reach); else None."""
    names = {declared_base(s.path) for s in sources}
    if len(names) != 1 or None in names:
        return None
    spec = model_reference(str(names.pop()), directory)
    try:
        model_shapes(spec, revision=resolve_revision(spec), base_dir=directory)
    except FedbipError:
        return None
    return spec


def _needing_base(adapters: Sequence[Adapter], dense: list[str], heads: str | None) -> list[tuple[Adapter, DensePart]]:
    """The dense parts in the similarity whose delta needs the base's weights. Saved modules merged by
    choice (``--heads merge``) are taken against zero where there is no base."""
    against_zero_ok = (SAVED,) if heads == "merge" else ()
    return [
        (a, d)
        for a in adapters
        for d in a.dense.values()
        if d.kind in NEEDS_BASE and d.kind not in against_zero_ok and d.name in dense
    ]


def saved_parts(adapters: Sequence[Adapter]) -> list[str]:
    """The parts some client saves whole (``modules_to_save``), in natural order."""
    return sorted({p for a in adapters for p, d in a.dense.items() if d.kind == SAVED}, key=natural_key)


def _check_heads(adapters: Sequence[Adapter], saved: list[str], heads: str | None, shapes: ModelShapes | None) -> None:
    """Without ``--heads``, refuse saved modules that the base lacks (all of them without a base).

    Their task vector would be their whole value, measured against zero; heads trained from one random
    initialisation then look alike whatever their tasks, and merging mixes them across tasks.
    """
    if heads is not None or not saved:
        return
    tensors = sorted({a.dense[p].tensor for a in adapters for p in saved if p in a.dense}, key=natural_key)
    missing = [t for t in tensors if shapes is None or not base_keys(t, shapes.shapes)]
    if not missing:
        return
    modules = sorted({part_module(part_name(t)) for t in missing}, key=natural_key)
    where = "no --base given" if shapes is None else f"not in the base {shapes.where}"
    raise AdapterError(
        f"saved modules (modules_to_save) {', '.join(modules)}: {where}, so their task vectors would be "
        "their whole values, measured against zero; heads that share a random initialisation then look "
        "alike and are mixed across tasks",
        where=adapters[0].where,
        hint="pass a --base that holds the initial head (the model the adapters were trained from, head "
        "included); or --heads own to keep each client's head and merge the LoRA parts; or --heads merge "
        "to merge them against zero knowingly (--heads exclude leaves them out)",
    )


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
