"""Full fine-tuned checkpoints end to end: load, inspect, plan and merge.

The task vector of a checkpoint is ΔW = W − W_base for every floating tensor (integer buffers are
skipped and copied from the base). Similarity and weights are the adapters' own; each client i gets

* a full checkpoint W_base + Σ_j P_ij ΔW_j in the base's dtype, streamed: a tensor is read and
  written a range of rows at a time (``chunk_elements``), so memory holds one range per client,
  never a model; the shards follow ``--max-shard-size``, and the base's config and tokenizer files
  are copied beside them;
* or, with ``--to-lora R``, a PEFT adapter of M_i = Σ_j P_ij ΔW_j on every linear layer
  (``to_lora``), with the energy kept per module and the share of the whole delta it carries.

A ``CheckpointWorkspace`` is the pipeline's source of parts for full checkpoints (one part per
floating tensor); the pipeline owns the output directory, the manifest and the cards. Their
similarity takes the dense path below, never the adapters' inner-product cache.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedbip_cli.adapters import write_adapter
from fedbip_cli.checkpoints import (
    Checkpoint,
    TensorSpec,
    check_against_base,
    header_checkpoint,
    load_checkpoint,
    row_ranges,
)
from fedbip_cli.errors import AdapterError, SourceError, UsageError
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.merge import weighted_sum
from fedbip_cli.options import MergeOptions, Progress, start
from fedbip_cli.shards import ShardedWriter, parse_size, plan_shards
from fedbip_cli.similarity import checkpoint_inner_products
from fedbip_cli.sources import FULL, HUB_PREFIX, ResolvedSource, model_shapes, resolve_model_dir
from fedbip_cli.taskvec import checkpoint_deltas, natural_key, tensor_module
from fedbip_cli.to_lora import (
    OVERSAMPLE,
    POWER_ITERATIONS,
    SEED,
    LoraTarget,
    lora_targets,
    low_rank_factors,
    tensor_generator,
)
from fedbip_cli.workspace import Workspace, Written

# What a merged checkpoint takes from the base besides its weights, when the base has it.
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
# The files of an hf:// base to fetch: weights, configs and tokenizer files.
BASE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
# Elements per range of rows: a few float64 copies per client (read, delta, merged) of 32 MiB each.
CHUNK_ELEMENTS = 1 << 22


def load_checkpoints(
    specs: Sequence[str],
    sources: Sequence[ResolvedSource],
    base: str | None,
    *,
    base_dir: Path | None = None,
    resolved: Sequence[tuple[str, list[ResolvedSource]]] = (),
    base_revision: str | None = None,
    weights: bool = True,
) -> CheckpointWorkspace:
    """Validate full checkpoints and their base: every tensor name and shape must match the base's.

    ``base_dir`` is the directory a relative ``base`` (and the SOURCES) are taken from; ``resolved``
    says which clients each SOURCE expanded to (``sources.resolve_specs``); ``base_revision`` is the
    commit to fetch a Hub base at (``sources.resolve_revision``; default: its reference's revision).
    With ``weights=False`` (a dry run) nothing but safetensors headers is read: Hub checkpoints and a
    Hub base by range requests of their headers (their weights are never fetched), and no file is
    hashed. Such a workspace can be planned, not merged.

    Raises:
        SourceError: the sources mix adapters and full checkpoints.
        UsageError: no ``base``.
        AdapterError: a checkpoint is unreadable or does not match the base.
    """
    adapters = [s.name for s in sources if s.kind != FULL]
    if adapters:
        full = [s.name for s in sources if s.kind == FULL]
        raise SourceError(
            f"LoRA adapters ({', '.join(adapters)}) and full fine-tuned checkpoints ({', '.join(full)}) cannot be merged together",
            where="SOURCES",
            hint="merge adapters and full checkpoints in separate runs (--to-lora R turns full checkpoints into adapters)",
        )
    if base is None:
        raise UsageError(
            f"full fine-tuned checkpoints ({', '.join(s.name for s in sources)}) need --base: their task vectors are W - W_base",
            hint="pass --base MODEL, the directory or hf:// reference of the model they were fine-tuned from",
        )
    directory = Path.cwd() if base_dir is None else Path(base_dir)
    if weights:
        model_dir, revision = resolve_model_dir(
            base, allow_patterns=BASE_PATTERNS, base_dir=directory, revision=base_revision
        )
        base_checkpoint = load_checkpoint(ResolvedSource("base", model_dir, base, revision, FULL))
        checkpoints = [load_checkpoint(s) for s in sources]
    else:
        if base.startswith(HUB_PREFIX):
            base_checkpoint = _hub_headers("base", base, base_revision, directory)
        else:
            base_checkpoint = load_checkpoint(
                ResolvedSource("base", resolve_model_dir(base, base_dir=directory)[0], base, None, FULL), hashed=False
            )
        revision = base_checkpoint.source.revision
        checkpoints = [
            _hub_headers(s.name, s.origin, s.revision, directory)
            if s.revision is not None
            else load_checkpoint(s, hashed=False)
            for s in sources
        ]
    check_against_base(checkpoints, base_checkpoint)
    return CheckpointWorkspace(
        specs=list(specs),
        sources=list(sources),
        checkpoints=checkpoints,
        base_checkpoint=base_checkpoint,
        base=base,
        base_revision=revision,
        base_dir=directory,
        resolved=list(resolved),
    )


def _hub_headers(name: str, spec: str, revision: str | None, base_dir: Path) -> Checkpoint:
    """A Hub checkpoint known from its JSON files and safetensors headers (range requests): for a dry
    run, which fetches none of its weights. Its tensors cannot be read."""
    shapes = model_shapes(spec, revision=revision, base_dir=base_dir)
    assert shapes.directory is not None  # a Hub model's snapshot folder
    return header_checkpoint(ResolvedSource(name, shapes.directory, spec, shapes.revision, FULL), shapes)


@dataclass(kw_only=True)
class CheckpointWorkspace(Workspace):
    """Validated full checkpoints of one base: every tensor checked against the base's."""

    checkpoints: list[Checkpoint]
    base_checkpoint: Checkpoint
    chunk_elements: int | None = CHUNK_ELEMENTS  # rows read at a time hold at most this many elements
    kind: ClassVar[str] = FULL

    @property
    def clients(self) -> list[str]:
        return [c.name for c in self.checkpoints]

    @property
    def tensors(self) -> list[str]:
        """The tensors that carry a task vector (the floating ones), in natural order."""
        return sorted((n for n, t in self.base_checkpoint.tensors.items() if t.floating), key=natural_key)

    @property
    def parts(self) -> list[str]:
        return self.tensors

    @staticmethod
    def module_of(part: str) -> str:
        return tensor_module(part)

    def inner_products(
        self, device: torch.device, cache: InnerProductCache | None, advance: Callable[[int], None]
    ) -> dict[str, torch.Tensor]:
        """Exact inner products of the checkpoints' task vectors, a range of rows at a time (no cache)."""
        return checkpoint_inner_products(
            self.checkpoints,
            self.base_checkpoint,
            self.tensors,
            device=device,
            max_elements=self.chunk_elements,
            progress=advance,
        )

    def plan_outputs(self, options: MergeOptions, groups: dict[str, list[str]]) -> dict[str, Any]:
        if options.to_lora is None:
            shards = plan_shards(self._output_order(), parse_size(options.max_shard_size)).shards
            per_client = sum(t.nbytes for _, tensors in shards for t in tensors)
        else:
            targets, _ = lora_targets(self.base_checkpoint.source.path, self.tensors)
            shards = []
            per_client = sum(_lora_bytes(self.base_checkpoint.tensors[t.tensor], options.to_lora) for t in targets)
        return {
            "clients": [
                {
                    "name": c.name,
                    "source": c.source.origin,
                    "revision": c.source.revision,
                    "tensors": len(c.tensors),
                    "files": len(c.files),
                }
                for c in self.checkpoints
            ],
            "tensors": len(self.base_checkpoint.tensors),
            "task_tensors": len(self.tensors),
            "output": "checkpoint" if options.to_lora is None else "lora",
            "shards": len(shards) or None,
            "lora_modules": None if options.to_lora is None else len(targets),
            "rank": options.to_lora,
            "output_bytes": per_client * len(self.checkpoints),
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
        """One personalized checkpoint per client, or with ``to_lora`` one rank-R adapter per client."""
        rows = {t: weights[group_of[t]] for t in self.tensors}
        if options.to_lora is None:
            energy: dict[str, dict[str, float | None]] = {c: {} for c in self.clients}
            lora_record = None
            self._write_checkpoints(rows, tmp, parse_size(options.max_shard_size), device, progress)
        else:
            energy, lora_record = self._write_adapters(rows, tmp, options.to_lora, device, progress)
        record = {
            "output": "checkpoint" if lora_record is None else "lora",
            "combine": "exact" if lora_record is None else "randomized-svd",
            "rank": options.to_lora,
            "to_lora": lora_record,
        }
        return Written(energy, options.to_lora or 0, record)

    def inputs_record(self) -> list[dict[str, Any]]:
        return [
            {
                "name": c.name,
                "source": c.source.origin,
                "revision": c.source.revision,
                "files": c.files,
                "tensors": len(c.tensors),
            }
            for c in self.checkpoints
        ]

    def base_record(self) -> dict[str, Any] | None:
        return {"source": self.base, "revision": self.base_revision, "files": self.base_checkpoint.files}

    def recorded_options(self, options: MergeOptions) -> dict[str, Any]:
        return {**options.as_dict(), "to_lora": options.to_lora, "max_shard_size": options.max_shard_size}

    def _output_order(self) -> list[TensorSpec]:
        """Every base tensor, in natural order: the order of the output shards."""
        return [self.base_checkpoint.tensors[n] for n in sorted(self.base_checkpoint.tensors, key=natural_key)]

    def _merged(
        self,
        specs: Sequence[TensorSpec],
        rows: dict[str, torch.Tensor],
        device: torch.device,
        advance: Callable[[int], None],
        *,
        whole: Collection[str] = (),
    ) -> Iterator[tuple[TensorSpec, torch.Tensor, torch.Tensor | None]]:
        """For each tensor and range of rows: the base rows and the (K, ...) personalized deltas Σ_j P_ij ΔW_j.

        The deltas are None for tensors without a task vector; tensors in ``whole`` come in one range.
        ``advance(1)`` is called after each tensor's last range.
        """
        for spec in specs:
            for part in row_ranges(spec.shape, None if spec.name in whole else self.chunk_elements):
                if not spec.floating:
                    yield spec, self.base_checkpoint.read(spec.name, part), None
                    continue
                base_rows, deltas = checkpoint_deltas(
                    self.checkpoints, self.base_checkpoint, spec.name, part, device=device
                )
                yield spec, base_rows, weighted_sum(deltas, rows[spec.name])
            advance(1)

    def _personalized(self, tensor: str, weights: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
        """Each client's M_i = Σ_j P_ij (W_j − W_base) of one whole tensor, in float64, one client at a time.

        The clients' tensors are held as stored (their file dtype) with one float64 copy of the base,
        the sum in progress and one term: K + 3 copies at most, not the 2K float64 copies of every
        client's delta and every client's sum at once.
        """
        base = self.base_checkpoint.read(tensor).to(device=device, dtype=torch.float64)
        stored = [c.read(tensor).to(device) for c in self.checkpoints]
        for row in weights.tolist():
            merged = torch.zeros_like(base)
            for w, weight in zip(row, stored):
                if w != 0.0:
                    merged.add_(
                        weight.to(torch.float64, copy=True).sub_(base), alpha=w
                    )  # never the stored tensor itself
            yield merged

    def _write_checkpoints(
        self, rows: dict[str, torch.Tensor], tmp: Path, max_bytes: int, device: torch.device, progress: Progress | None
    ) -> None:
        """Stream W_base + Σ_j P_ij ΔW_j into one sharded checkpoint per client, plus the base's config files."""
        order = self._output_order()
        plan = plan_shards(order, max_bytes)
        advance = start(progress, "write", len(order))
        with ExitStack() as stack:
            writers = [stack.enter_context(ShardedWriter(tmp / c, plan)) for c in self.clients]
            for spec, base_rows, merged in self._merged(order, rows, device, advance):
                chunks = [base_rows] * len(writers) if merged is None else list((base_rows + merged).to(spec.dtype))
                for writer, chunk in zip(writers, chunks):
                    writer.write(spec.name, chunk)
            for writer in writers:
                writer.close()
        for client in self.clients:
            for name in BASE_FILES:
                if (self.base_checkpoint.source.path / name).is_file():
                    shutil.copyfile(self.base_checkpoint.source.path / name, tmp / client / name)

    def _write_adapters(
        self, rows: dict[str, torch.Tensor], tmp: Path, rank: int, device: torch.device, progress: Progress | None
    ) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
        """Write M_i = Σ_j P_ij ΔW_j of every linear layer as a rank-``rank`` PEFT adapter per client.

        Returns the energy kept per client and module, and the manifest's ``to_lora`` record.
        """
        targets, skipped = lora_targets(self.base_checkpoint.source.path, self.tensors)
        target_of: dict[str, LoraTarget] = {t.tensor: t for t in targets}
        clients = self.clients
        factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {c: {} for c in clients}
        energy: dict[str, dict[str, float | None]] = {c: {} for c in clients}
        total = torch.zeros(len(clients), dtype=torch.float64)  # ‖M_i‖² over every task tensor
        kept = torch.zeros(len(clients), dtype=torch.float64)  # Σ kept σ² over the written modules
        others = [self.base_checkpoint.tensors[n] for n in self.tensors if n not in target_of]
        advance = start(progress, "to-lora", len(self.tensors))
        # Tensors that stay out of the adapter only count towards the whole delta's energy.
        for _, _, merged in self._merged(others, rows, device, advance):
            assert merged is not None  # only task tensors are asked for
            total += (merged * merged).reshape(len(clients), -1).sum(dim=1).cpu()
        for target in targets:
            for i, merged in enumerate(self._personalized(target.tensor, rows[target.tensor], device)):
                square = float((merged * merged).sum())
                total[i] += square
                if square == 0:  # no delta here: leave the module out
                    continue
                delta = merged.T if target.transposed else merged  # peft's B @ A is (out, in)
                result = low_rank_factors(delta, rank, tensor_generator(target.tensor))
                factors[clients[i]][target.module] = (result.b.cpu(), result.a.cpu())
                energy[clients[i]][target.module] = result.energy
                kept[i] += result.energy * square
            advance(1)
        empty = [c for c in clients if not factors[c]]
        if empty:
            raise AdapterError(
                f"the personalized delta of {', '.join(empty)} has nothing on a linear layer: the adapter would be empty",
                where=str(self.base_checkpoint.source.path),
                hint="merge into full checkpoints (without --to-lora)",
            )
        config = {
            "base_model_name_or_path": self.base,
            "revision": self.base_revision,
            "fan_in_fan_out": any(t.transposed for t in targets),
        }
        dtype = self.base_checkpoint.tensors[targets[0].tensor].dtype
        for client in clients:
            write_adapter(tmp / client, factors[client], config, dtype)
        record = {
            "rank": rank,
            "seed": SEED,
            "oversample": OVERSAMPLE,
            "power_iterations": POWER_ITERATIONS,
            "modules": [t.module for t in targets],
            "skipped": skipped,
            "delta_energy_kept": {c: float(kept[i] / total[i]) if total[i] > 0 else 1.0 for i, c in enumerate(clients)},
        }
        return energy, record


def _lora_bytes(spec: TensorSpec, rank: int) -> int:
    """Bytes of a rank-``rank`` factor pair for a 2-D weight (rank capped by its smaller side)."""
    rows, cols = spec.shape
    return min(rank, rows, cols) * (rows + cols) * torch.empty(0, dtype=spec.dtype).element_size()
