"""Dense parts of task vectors: every part that is not a product of stored LoRA factors.

A client's task vector is a set of parts, one per base tensor it changes (``adapters.part_name``):
low-rank LoRA parts (linear and embedding: ``s·B·A``), whose inner products come from factor Grams
(``similarity``), and the dense parts read here, each as ΔW in the base tensor's stored layout:

* ``saved`` (``modules_to_save``): W_saved − W_base; a module the base lacks (a task head the model
  class initialises afresh) is taken against zero;
* ``bias`` (``bias="lora_only"``/``"all"``): b_saved − b_base;
* ``lora-bias`` (``lora_bias``): s · lora_B.bias;
* ``dora``: m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row − W, peft's DoRA merge (the norm is taken per output
  row of the (out, in) weight);
* and a LoRA part in a run where another client has a dense part at the same tensor (mixed kinds):
  s·B·A itself, so that every client's delta there is compared and merged exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedbip_cli.adapters import (
    BIAS,
    DORA,
    LORA_BIAS,
    SAVED,
    Adapter,
    DensePart,
    FactorReader,
    LoraModule,
    base_keys,
    read_module,
)
from fedbip_cli.checkpoints import Checkpoint, load_checkpoint
from fedbip_cli.errors import AdapterError
from fedbip_cli.sources import FULL, ResolvedSource, resolve_model_dir

# The base files needed to read its tensors.
BASE_PATTERNS = ("*.json", "*.safetensors")


@dataclass
class BaseTensors:
    """The base model's tensors, read lazily by the names adapters give them (tails match).

    Parts are processed one at a time, so only the last tensor read is kept: every client's delta
    and the written output of a part share one read, and memory holds one base tensor, not the model.
    """

    checkpoint: Checkpoint
    _last: tuple[str, torch.Tensor | None] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, spec: str, *, revision: str | None, base_dir: Path) -> BaseTensors:
        """Resolve ``spec`` (a directory or ``hf://`` reference, at ``revision``) and read its headers."""
        directory, resolved = resolve_model_dir(
            spec, allow_patterns=BASE_PATTERNS, base_dir=base_dir, revision=revision
        )
        return cls(load_checkpoint(ResolvedSource("base", directory, spec, resolved, FULL), hashed=False))

    def find(self, tensor: str) -> str | None:
        """The base's name for an adapter's ``tensor``, or None when the base lacks it."""
        found = base_keys(tensor, self.checkpoint.tensors)
        return found[0] if found else None

    def read(self, tensor: str) -> torch.Tensor | None:
        """The base's ``tensor`` in float64 (stored layout), or None when the base lacks it."""
        if self._last is None or self._last[0] != tensor:
            key = self.find(tensor)
            self._last = (tensor, None if key is None else self.checkpoint.read(key).to(torch.float64))
        return self._last[1]


def lora_delta(spec: LoraModule, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """s·B·A in float64, in the stored layout of the weight it changes ((in, out) for Conv1D and embeddings)."""
    delta = spec.scale * (b.to(torch.float64) @ a.to(torch.float64))
    return delta.T if fan_in_fan_out or spec.embedding else delta


def dora_delta(weight: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA delta of an (out, in) weight: m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W, in float64.

    Args:
        weight: the base weight W (out, in).
        lora: s·B·A (out, in).
        magnitude: the learnt magnitude m (out,).
    """
    adapted = weight + lora
    norm = torch.linalg.vector_norm(adapted, dim=1)
    return (magnitude.to(torch.float64) / norm)[:, None] * adapted - weight


def dense_delta(
    adapter: Adapter, part: str, base: BaseTensors | None, reader: FactorReader | None = None
) -> torch.Tensor | None:
    """Client ``adapter``'s ΔW at ``part`` in float64 (the base tensor's stored layout), None where it has none.

    Raises AdapterError when a tensor holds NaN or Inf, or a part that needs the base finds none there.
    """
    if part in adapter.modules:
        spec = adapter.modules[part]
        ((b, a),) = read_module([adapter], part, reader or FactorReader())
        return lora_delta(spec, b, a, adapter.fan_in_fan_out)
    dense: DensePart | None = adapter.dense.get(part)
    if dense is None:
        return None
    stored = adapter.stored_tensor(dense.key).to(torch.float64)
    if dense.kind == LORA_BIAS:
        assert dense.lora is not None  # a LoRA bias always belongs to a LoRA module
        return dense.lora.scale * stored
    reference = None if base is None else base.read(dense.tensor)
    if dense.kind == SAVED:
        return stored if reference is None else stored - reference
    if reference is None:
        raise AdapterError(
            f"{dense.tensor} is not in the base model, but this adapter's {dense.kind} part is a change of it",
            where=adapter.where,
            hint="pass the --base the adapter was trained on",
        )
    if dense.kind == BIAS:
        return stored - reference
    assert dense.kind == DORA and dense.lora is not None
    b, a = adapter.stored_factors(part, dense.lora)
    lora = dense.lora.scale * (b.to(torch.float64) @ a.to(torch.float64))
    flipped = adapter.fan_in_fan_out  # peft normalises DoRA in the (out, in) layout
    delta = dora_delta(reference.T if flipped else reference, lora, stored)
    return delta.T if flipped else delta


def dense_deltas(
    adapters: Sequence[Adapter], part: str, base: BaseTensors | None, reader: FactorReader | None = None
) -> list[torch.Tensor | None]:
    """Every client's ΔW at ``part`` (None where a client has none), checked for one shape."""
    deltas = [dense_delta(a, part, base, reader) for a in adapters]
    shapes = {tuple(d.shape) for d in deltas if d is not None}
    if len(shapes) > 1:
        odd = next(a for a, d in zip(adapters, deltas) if d is not None and tuple(d.shape) != min(shapes))
        raise AdapterError(
            f"{part} has shapes {sorted(shapes)} across clients",
            where=odd.where,
            hint="all adapters must be trained on the same base model",
        )
    return deltas


def check_copies(adapters: Sequence[Adapter], base: BaseTensors) -> None:
    """The copies of base weights an adapter saved must be the base's own (a resized or changed
    embedding means the adapter was trained on another base).

    Raises AdapterError naming the first copy that differs.
    """
    for adapter in adapters:
        for tensor, key in adapter.base_copies.items():
            reference = base.read(tensor)
            copy = adapter.stored_tensor(key).to(torch.float64)
            if reference is None or reference.shape != copy.shape or not torch.equal(reference, copy):
                raise AdapterError(
                    f"{key} is a copy of the base's {tensor} that differs from --base's (resized or retrained)",
                    where=adapter.where,
                    hint="pass as --base the model the adapter was trained on (with its added tokens), "
                    "or re-save the adapter with save_embedding_layers=False if the embedding is unchanged",
                )
