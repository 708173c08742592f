"""Tiny real models and real peft adapters of every kind users hold, with their dense float64 deltas.

Three model families, each saved as a base directory with ``save_pretrained`` (CPU, seeded, under a second):

- ``bert``: ``BertForSequenceClassification`` (its randomly initialised classifier included in the base);
- ``gpt2``: ``GPT2LMHeadModel``, whose attention and MLP layers are ``Conv1D`` (peft's ``fan_in_fan_out``);
- ``llama``: ``LlamaForCausalLM`` with one key/value head and untied ``embed_tokens`` / ``lm_head``.

``make_clients`` wraps a fresh copy of the base with ``get_peft_model`` for each client (one ``PeftConfig``
for all, or one per client for mixed kinds), overwrites every trainable parameter with seeded values and
saves the adapter with ``save_pretrained``. Every trainable tensor is perturbed: ``lora_A`` / ``lora_B``
(and their embedding forms), ``lora_B`` biases (``lora_bias=True``), ``lora_magnitude_vector`` (DoRA),
the base layers' biases (``bias="lora_only"``), ``modules_to_save`` copies, and the tensors of other peft
kinds (LoHa, IA³, prompt embeddings, ...). A tensor is a component shared by all clients (seeded by the
tensor's name) times the client's sign, plus client noise: clients with sign +1 are alike, the one with
sign -1 is anti-similar, so FedBip's weights are neither uniform nor the identity.

The reference, independent of fedbip: the peft model in float64 after ``merge_and_unload()``, minus the base's
state dict in float64, per parameter name, keeping the parameters that differ. The factors are copied into
float32 parameters before saving, so the reference is exact for what the float32 adapter files hold.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

PEFT_PREFIX = "base_model.model."
SHARED_SEED = 1234
SHARED_RANK = 8  # the shared component of a LoRA factor has the largest rank any client uses
FACTOR_STD = 0.1  # LoRA factors: ΔW = s·BA of the order of the base weights (std 0.02)
DENSE_STD = 0.05  # dense parts (heads, saved embeddings, biases): the same order as the LoRA deltas
MAGNITUDE_STD = 0.3  # DoRA magnitudes: relative change of the column norms
NOISE = 0.5  # client noise, relative to the shared component
VOCAB = 100
# LoRA factors whose rows (lora_A) or columns (lora_B) are the rank: the shared part is sliced to the rank.
_ROW_RANK = re.compile(r"lora_(?:embedding_)?A\b")
_COL_RANK = re.compile(r"lora_(?:embedding_)?B\b(?!.*\.bias$)")


@dataclass(frozen=True)
class Family:
    """A tiny model class and its config; ``save_base`` writes one, ``load`` reads it back fresh."""

    name: str
    cls: type[PreTrainedModel]
    config: Any

    def save_base(self, directory: Path, *, seed: int = 0) -> Path:
        """Save a seeded, freshly initialised model (safetensors) to ``directory``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.cls(self.config).eval()
        model.save_pretrained(directory, safe_serialization=True)
        return directory

    def load(self, base: Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """A fresh copy of the saved base, in eval mode (no dropout) and ``dtype``."""
        return self.cls.from_pretrained(base).to(dtype).eval()


FAMILIES = {
    "bert": Family(
        "bert",
        BertForSequenceClassification,
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            num_labels=3,
        ),
    ),
    "gpt2": Family(
        "gpt2",
        GPT2LMHeadModel,
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "llama": Family(
        "llama",
        LlamaForCausalLM,
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    ),
}


@dataclass(frozen=True)
class Client:
    """One saved adapter: its directory (the adapter files may sit in a named sub-directory of it), the
    modules peft wrapped in a LoRA layer, and the dense float64 delta per parameter (None if not computed)."""

    name: str
    path: Path
    lora_modules: frozenset[str]
    delta: dict[str, torch.Tensor] | None


def base_state(family: Family, base: Path) -> dict[str, torch.Tensor]:
    """The base's state dict in float64."""
    return {name: t.clone() for name, t in family.load(base, dtype=torch.float64).state_dict().items()}


def delta_from_base(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s state dict minus ``base`` in float64, for the parameters that differ."""
    delta = {}
    for name, tensor in model.state_dict().items():
        diff = tensor.detach().to(torch.float64) - base[name]
        if diff.any():
            delta[name] = diff
    return delta


def merged_delta(model: PeftModel, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's own merge: ``merge_and_unload()`` in float64, minus the base. Consumes ``model``."""
    return delta_from_base(model.double().merge_and_unload(), base)


def make_clients(
    family: Family,
    base: Path,
    configs: PeftConfig | Sequence[PeftConfig],
    out: Path,
    *,
    clients: int = 4,
    anti: int | None = -1,
    adapter_name: str = "default",
    reference: bool = True,
    seed: int = 0,
) -> list[Client]:
    """Save one peft adapter per client under ``out/c<i>`` and return them with their reference deltas.

    Args:
        family, base: the model family and its saved base directory.
        configs: one config for every client, or one per client (mixed kinds); ``clients`` is then ignored.
        out: created if missing.
        clients: how many clients share the single config.
        anti: the index of the anti-similar client (its shared component is negated); None: none.
        adapter_name: peft's adapter name; other than ``default``, ``save_pretrained`` writes the adapter
            files into ``out/c<i>/<adapter_name>/``.
        reference: compute each client's dense delta with ``merge_and_unload`` (kinds that peft cannot
            merge, such as prompt tuning, need False).
        seed: the base of the clients' noise seeds.

    Returns:
        The clients, in order.
    """
    per_client = [configs] * clients if isinstance(configs, PeftConfig) else list(configs)
    signs = [1.0] * len(per_client)
    if anti is not None:
        signs[anti] = -1.0
    state = base_state(family, base) if reference else {}
    made = []
    for i, (config, sign) in enumerate(zip(per_client, signs)):
        name = f"c{i}"
        model = get_peft_model(family.load(base), config, adapter_name=adapter_name)
        perturb(model, adapter_name, sign=sign, seed=seed * 1000 + i)
        model.save_pretrained(out / name, safe_serialization=True)
        modules = frozenset(n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if isinstance(m, LoraLayer))
        made.append(Client(name, out / name, modules, merged_delta(model, state) if reference else None))
    return made


def perturb(model: PeftModel, adapter_name: str, *, sign: float, seed: int) -> None:
    """Overwrite every trainable parameter with ``sign`` · shared + ``NOISE`` · own, seeded by its name.

    LoRA factors are replaced (peft starts ``lora_B`` at zero: no delta); ``sign`` goes on the B side,
    so it flips s·BA. Dense tensors move away from their initial value. DoRA magnitudes are set last, to
    the column norms of the perturbed W + s·BA scaled by (1 + ``MAGNITUDE_STD`` · (sign · shared + noise)),
    so that the DoRA delta is s·BA plus a signed change of scale rather than a shrink towards the base.
    """
    own_name = re.compile(rf"\.{re.escape(adapter_name)}(?=\.|$)")
    trainable = sorted(
        (own_name.sub("", n.removeprefix(PEFT_PREFIX)), n, p) for n, p in model.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        for key, _, param in trainable:
            if "lora_magnitude_vector" in key:
                continue
            own = NOISE * _normal(param.shape, f"own:{key}", seed)
            if _ROW_RANK.search(key) or _COL_RANK.search(key):
                param.copy_(FACTOR_STD * (_signed(key, sign) * _shared_factor(param.shape, key) + own))
            else:
                param.add_(DENSE_STD * (sign * _normal(param.shape, f"shared:{key}", SHARED_SEED) + own))
        for key, name, param in trainable:
            if "lora_magnitude_vector" in key:
                change = sign * _normal(param.shape, f"shared:{key}", SHARED_SEED) + NOISE * _normal(
                    param.shape, f"own:{key}", seed
                )
                layer = model.get_submodule(name.split(".lora_magnitude_vector")[0])
                param.copy_(_dora_norm(layer, adapter_name) * (1 + MAGNITUDE_STD * change))


def _normal(shape: torch.Size, label: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + zlib.crc32(label.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _signed(key: str, sign: float) -> float:
    """The sign goes on B only: it flips the product once."""
    return sign if _COL_RANK.search(key) else 1.0


def _shared_factor(shape: torch.Size, key: str) -> torch.Tensor:
    """The shared part of a LoRA factor: drawn at ``SHARED_RANK`` and sliced, so clients of other ranks share it."""
    if _ROW_RANK.search(key):
        return _normal(torch.Size((SHARED_RANK, shape[1])), f"shared:{key}", SHARED_SEED)[: shape[0]]
    return _normal(torch.Size((shape[0], SHARED_RANK)), f"shared:{key}", SHARED_SEED)[:, : shape[1]]


def _dora_norm(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """peft's DoRA column norm ‖W + s·BA‖ of a Linear (or Conv1D) LoRA layer, per output feature."""
    weight = layer.get_base_layer().weight
    weight = weight.T if layer.fan_in_fan_out else weight
    lora = layer.lora_B[adapter_name].weight @ layer.lora_A[adapter_name].weight
    return torch.linalg.norm(weight.double() + layer.scaling[adapter_name] * lora.double(), dim=1)


def tokens(batch: int = 2, length: int = 7, *, seed: int = 0) -> torch.Tensor:
    """A fixed batch of input ids."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``input_ids`` (classification or language-model head) and its last hidden
    state, flattened, in float64. The hidden state is O(1) after the last layer norm, where a tiny
    classifier's logits are O(0.01): a change in the encoder shows there."""
    with torch.no_grad():
        output = model(input_ids=input_ids, output_hidden_states=True)
    return torch.cat([output.logits.flatten(), output.hidden_states[-1].flatten()]).double()


def reference_logits(
    family: Family, base: Path, delta: dict[str, torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """The base in float64 with ``delta`` added to its parameters, on ``input_ids``."""
    model = family.load(base, dtype=torch.float64)
    state = model.state_dict()
    with torch.no_grad():
        for name, change in delta.items():
            state[name].add_(change)
    return logits(model, input_ids)
