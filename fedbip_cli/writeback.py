"""How each part of a merged task vector is written back into a PEFT adapter that peft loads as is.

Every output's tensors are known before any compute (``layout``), so each client's safetensors file
is written with its header first and its tensors streamed in as the merge produces them. A part is
written back by the kind of the clients' parts at its tensor:

* low-rank parts (linear or embedding LoRA) → LoRA factors of the combine mode (``merge``);
* a module any client saves whole (``modules_to_save``) → saved in every output: each of its tensors
  holds W_base + Σ_j P_ij ΔW_j (W_base = 0 where the base lacks it), exactly;
* a DoRA weight, or a weight where LoRA and DoRA clients meet → a plain LoRA of the dense merged
  delta by exact (or seeded randomized, ``to_lora``) SVD: rank R under ``svd``, full rank (exact)
  under ``cat``; the energy kept is reported;
* a bias that any client trained (``bias="lora_only"``/``"all"``) → that bias holding
  b_base + Σ_j P_ij Δb_j; else a LoRA bias (``lora_bias``) → ``lora_B.bias`` = Σ_j P_ij Δb_j (scale 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedbip_cli.adapters import (
    BIAS,
    KEY_PREFIX,
    SAVED,
    Adapter,
    DensePart,
    merged_config,
    part_module,
    weight_shape,
)
from fedbip_cli.merge import Combined, combine_rank
from fedbip_cli.to_lora import low_rank_factors, tensor_generator

# How a dense part is written back (see the module's docstring).
AS_SAVED, AS_LORA, AS_BIAS, AS_LORA_BIAS = "saved", "lora", "bias", "lora-bias"


@dataclass
class DenseOutput:
    """How one dense part is written back: ``how``, the base tensor it changes and its stored shape."""

    part: str
    how: str
    tensor: str
    shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return part_module(self.part)

    def lora_shape(self, fan_in_fan_out: bool) -> tuple[int, int]:
        """(out, in) of the LoRA factors of a weight written as LoRA."""
        return (self.shape[1], self.shape[0]) if fan_in_fan_out else (self.shape[0], self.shape[1])


def dense_outputs(adapters: Sequence[Adapter], parts: Sequence[str]) -> dict[str, DenseOutput]:
    """How each dense part of the run is written back, decided once from every client's kind there."""
    saved = {part_module(p) for a in adapters for p, d in a.dense.items() if d.kind == SAVED}
    outputs: dict[str, DenseOutput] = {}
    for part in parts:
        holders = [a for a in adapters if part in a.dense or part in a.modules]
        first = holders[0]
        if part in first.dense:
            tensor, shape = first.dense[part].tensor, first.dense[part].shape
        else:
            tensor, shape = f"{part}.weight", tuple(weight_shape(first.modules[part], first.fan_in_fan_out))
        if part_module(part) in saved:
            how = AS_SAVED
        elif part == part_module(part):
            how = AS_LORA
        elif any(part in a.dense and a.dense[part].kind == BIAS for a in holders):
            how = AS_BIAS
        else:
            how = AS_LORA_BIAS
        outputs[part] = DenseOutput(part, how, tensor, shape)
    return outputs


@dataclass
class ClientLayout:
    """One merged adapter's tensors in write order (name -> shape) and what its config must say."""

    entries: dict[str, list[int]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # LoRA modules -> rank
    embedding: set[str] = field(default_factory=set)
    lora_biases: set[str] = field(default_factory=set)  # modules with a lora_B.bias
    saved: set[str] = field(default_factory=set)  # modules_to_save
    trained_bias: bool = False  # a trained bias (bias="lora_only"/"all") is written
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # entries kept in their stored dtype

    def add_lora(self, module: str, rank: int, shape: tuple[int, int], *, embedding: bool = False) -> None:
        """Factors of ``module``: (out, in) = ``shape``, A (rank, in) then B (out, rank)."""
        out_dim, in_dim = shape
        self.ranks[module] = rank
        if embedding:
            self.embedding.add(module)
            self.entries[f"{KEY_PREFIX}{module}.lora_embedding_A"] = [rank, in_dim]
            self.entries[f"{KEY_PREFIX}{module}.lora_embedding_B"] = [out_dim, rank]
        else:
            self.entries[f"{KEY_PREFIX}{module}.lora_A.weight"] = [rank, in_dim]
            self.entries[f"{KEY_PREFIX}{module}.lora_B.weight"] = [out_dim, rank]

    def bias_key(self, module: str) -> str:
        """Where a trained bias of ``module`` is stored: inside peft's wrapper when the module is adapted."""
        return f"{KEY_PREFIX}{module}.base_layer.bias" if module in self.ranks else f"{KEY_PREFIX}{module}.bias"

    def add_dense(self, output: DenseOutput, mode: str, rank: int, contributes: bool, fan_in_fan_out: bool) -> None:
        """The entries of one dense part (``contributes``: a client with non-zero weight has it)."""
        if output.how == AS_SAVED:
            self.saved.add(output.module)
            self.entries[f"{KEY_PREFIX}{output.tensor}"] = list(output.shape)
        elif output.how == AS_LORA:
            if contributes:
                shape = output.lora_shape(fan_in_fan_out)
                self.add_lora(output.part, combine_rank(mode, rank, shape), shape)
        elif output.how == AS_BIAS:
            self.trained_bias = True
            self.entries[self.bias_key(output.module)] = list(output.shape)
        elif output.module in self.ranks:  # a LoRA bias lives on an adapted module's lora_B
            self.lora_biases.add(output.module)
            self.entries[f"{KEY_PREFIX}{output.module}.lora_B.bias"] = list(output.shape)

    def add_own(self, part: DensePart) -> None:
        """A client's own saved tensor (``--heads own``), written as stored: same name, shape and dtype."""
        self.saved.add(part_module(part.name))
        self.entries[f"{KEY_PREFIX}{part.tensor}"] = list(part.shape)
        self.dtypes[f"{KEY_PREFIX}{part.tensor}"] = part.dtype

    def zero_biases(self, out_features: dict[str, int]) -> list[str]:
        """With any LoRA bias, peft gives every adapted module one: the modules still without, now added."""
        if not self.lora_biases:
            return []
        missing = [m for m in self.ranks if m not in self.lora_biases]
        for module in missing:
            self.lora_biases.add(module)
            self.entries[f"{KEY_PREFIX}{module}.lora_B.bias"] = [out_features[module]]
        return missing

    def config(self, template: dict[str, Any], bias: str) -> dict[str, Any]:
        """The adapter_config.json (scale 1 everywhere; see ``adapters.merged_config``)."""
        config = merged_config(self.ranks, template)
        config["modules_to_save"] = sorted(self.saved) or None
        config["lora_bias"] = bool(self.lora_biases)
        # A saved module's bias is part of that module, not a trained bias: peft's "bias" stays "none" unless
        # a trained bias of a base layer is written (else loading with is_trainable=True trains every bias).
        config["bias"] = bias if self.trained_bias else "none"
        return config


def dense_lora(part: str, merged: torch.Tensor, keep: int, fan_in_fan_out: bool) -> Combined:
    """A dense merged weight delta (stored layout) as LoRA factors of rank ``keep`` (zero-padded)."""
    matrix = merged.T if fan_in_fan_out else merged
    result = low_rank_factors(matrix, keep, tensor_generator(part))
    got = result.a.shape[0]
    if got == keep:
        return result
    b = torch.cat([result.b, result.b.new_zeros(result.b.shape[0], keep - got)], dim=1)
    a = torch.cat([result.a, result.a.new_zeros(keep - got, result.a.shape[1])], dim=0)
    return Combined(b, a, result.energy)
