"""Tiny real base models and real PEFT LoRA adapters, built on the fly (CPU, offline, seeded).

``tiny_bert(directory)`` and ``tiny_gpt2(directory)`` save a 2-layer base with ``save_pretrained``
(safetensors) and one PEFT adapter per client with ``get_peft_model(...).save_pretrained``, and return
a ``TinySet``: pass ``str(tiny.adapters)`` as SOURCES and ``str(tiny.base)`` as ``--base``.

The BERT clients cover what the LoRA maths must honour: ranks 2 and 4, rsLoRA, ``rank_pattern`` /
``alpha_pattern``, and different target module sets (so each client lacks modules others have).
The GPT-2 clients adapt ``Conv1D`` layers with ``fan_in_fan_out=True``.

``full_bert(directory)`` and ``full_gpt2(directory)`` save fully fine-tuned copies of the base instead
(``save_pretrained`` of the base with seeded changes to its weights), as a ``FullSet``.

peft initialises lora_B to zero (a delta of 0), so every factor is overwritten with seeded values:
a component shared by all clients for each module (so that clients are similar, and one is
anti-similar, giving non-trivial FedBip weights) plus client-specific noise.

Use in a test module::

    @pytest.fixture(scope="module")
    def bert(tmp_path_factory):
        return tiny_bert(tmp_path_factory.mktemp("bert"))
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModel, BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedModel

PEFT_PREFIX = "base_model.model."
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}
GPT2 = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "vocab_size": 100,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
SHARED_SEED = 1234
FACTOR_STD = 0.2
NOISE = 0.5
SHARED_RANK = 4  # the shared component has the largest rank any client uses


@dataclass(frozen=True)
class ClientSpec:
    """One client: its LoraConfig arguments, the seed of its own noise, and the sign of the shared part."""

    name: str
    lora: dict[str, Any]
    seed: int
    sign: float = 1.0


@dataclass(frozen=True)
class TinySet:
    """A saved base model and a directory holding one adapter directory per client."""

    base: Path
    adapters: Path
    clients: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False

    def adapter(self, client: str) -> Path:
        return self.adapters / client


BERT_CLIENTS = (
    ClientSpec("alpha", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}, seed=1),
    ClientSpec("beta", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": ["query", "value"]}, seed=2),
    ClientSpec(
        "gamma",
        {
            "r": 2,
            "lora_alpha": 16,
            "target_modules": ["query", "key", "dense"],
            "rank_pattern": {"key": 4},
            "alpha_pattern": {"layer.1.attention.self.query": 3},
        },
        seed=3,
        # Anti-similar to the others on the modules it shares with them: negative S, clipped to weight 0.
        sign=-1.0,
    ),
    ClientSpec("delta", {"r": 2, "lora_alpha": 8, "target_modules": ["query", "key", "dense"]}, seed=4),
)
# Equal ranks everywhere: the clients that --combine linear accepts.
BERT_EQUAL_RANK = ("alpha", "delta")

GPT2_CLIENTS = (
    ClientSpec("g_one", {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}, seed=11),
    ClientSpec("g_two", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": ["c_attn", "c_proj"]}, seed=12),
    ClientSpec("g_three", {"r": 2, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}, seed=13),
)


def save_bert_base(directory: Path, *, seed: int = 0, hidden_size: int = BERT["hidden_size"]) -> Path:
    """Save a seeded tiny ``BertModel`` (pooler included) to ``directory``."""
    return _save_base(BertModel, BertConfig(**{**BERT, "hidden_size": hidden_size}), directory, seed)


def save_gpt2_base(directory: Path, *, seed: int = 0) -> Path:
    """Save a seeded tiny ``GPT2Model`` (its attention and MLP layers are ``Conv1D``) to ``directory``."""
    return _save_base(GPT2Model, GPT2Config(**GPT2), directory, seed)


def _save_base(cls: type[PreTrainedModel], config: Any, directory: Path, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a peft model, by module name without peft's ``base_model.model.`` prefix."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def save_adapters(
    base_dir: Path, out_dir: Path, clients: Sequence[ClientSpec], *, fan_in_fan_out: bool = False
) -> Path:
    """Save one PEFT adapter per client under ``out_dir/<name>`` with seeded, non-zero factors."""
    for spec in clients:
        config = LoraConfig(**spec.lora, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
        model = get_peft_model(AutoModel.from_pretrained(base_dir), config)
        noise = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, layer in sorted(lora_layers(model).items()):
                a = layer.lora_A["default"].weight  # (r, in)
                b = layer.lora_B["default"].weight  # (out, r)
                shared = torch.Generator().manual_seed(SHARED_SEED + zlib.crc32(name.encode()))
                shared_b = torch.randn(b.shape[0], SHARED_RANK, generator=shared, dtype=torch.float64)[:, : b.shape[1]]
                shared_a = torch.randn(SHARED_RANK, a.shape[1], generator=shared, dtype=torch.float64)[: a.shape[0]]
                b.copy_(
                    FACTOR_STD
                    * (spec.sign * shared_b + NOISE * torch.randn(b.shape, generator=noise, dtype=torch.float64))
                )
                a.copy_(FACTOR_STD * (shared_a + NOISE * torch.randn(a.shape, generator=noise, dtype=torch.float64)))
        model.save_pretrained(out_dir / spec.name, safe_serialization=True)
    return out_dir


@dataclass(frozen=True)
class FineTune:
    """One fully fine-tuned client: the seed of its own changes, the sign of the shared change, and
    the name prefixes of the tensors it leaves equal to the base's."""

    name: str
    seed: int
    sign: float = 1.0
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class FullSet:
    """A saved base model and a directory holding one fine-tuned model directory per client (clients sorted, as fedbip orders them)."""

    base: Path
    checkpoints: Path
    clients: list[str] = field(default_factory=list)


FULL_BERT_CLIENTS = (
    FineTune("ft_a", 1),
    FineTune("ft_b", 2, frozen=("embeddings.",)),
    FineTune("ft_c", 3, sign=-1.0, frozen=("pooler.",)),  # anti-similar: clipped to weight 0
    FineTune("ft_d", 4),
)
FULL_GPT2_CLIENTS = (FineTune("gf_one", 11), FineTune("gf_two", 12, frozen=("wpe.",)), FineTune("gf_three", 13))
DELTA_STD = 0.05
SHARED_DELTA_RANK = 2


def save_finetuned(base_dir: Path, out_dir: Path, clients: Sequence[FineTune], *, tail: float = 0.0) -> Path:
    """Save one fine-tuned copy of the base per client under ``out_dir/<name>`` (``save_pretrained``).

    A matrix changes by a low-rank ΔW: a rank-2 part shared by every client (times its sign) plus a
    rank-1 part of its own, plus ``tail`` times a dense Gaussian (a full-rank spectral tail); any
    other tensor by a shared and an own Gaussian. Tensors under ``frozen`` keep the base's values.
    """
    for spec in clients:
        model = AutoModel.from_pretrained(base_dir)
        own = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if spec.frozen and name.startswith(spec.frozen):
                    continue
                shared = torch.Generator().manual_seed(SHARED_SEED + zlib.crc32(name.encode()))
                if param.ndim == 2:
                    rows, cols = param.shape
                    common = torch.randn(rows, SHARED_DELTA_RANK, generator=shared) @ torch.randn(
                        SHARED_DELTA_RANK, cols, generator=shared
                    )
                    mine = torch.randn(rows, 1, generator=own) @ torch.randn(1, cols, generator=own)
                    delta = spec.sign * common + NOISE * mine + tail * torch.randn(rows, cols, generator=own)
                else:
                    delta = spec.sign * torch.randn(param.shape, generator=shared) + NOISE * torch.randn(
                        param.shape, generator=own
                    )
                param += DELTA_STD * delta
        model.save_pretrained(out_dir / spec.name, safe_serialization=True)
    return out_dir


def full_bert(directory: Path) -> FullSet:
    """A tiny BERT base in ``directory/base`` and the ``FULL_BERT_CLIENTS`` in ``directory/checkpoints``."""
    base = save_bert_base(directory / "base")
    return FullSet(
        base,
        save_finetuned(base, directory / "checkpoints", FULL_BERT_CLIENTS),
        sorted(c.name for c in FULL_BERT_CLIENTS),
    )


def full_gpt2(directory: Path, *, tail: float = 1.0) -> FullSet:
    """A tiny GPT-2 base and the ``FULL_GPT2_CLIENTS``, whose matrices have a dense spectral tail."""
    base = save_gpt2_base(directory / "base")
    checkpoints = save_finetuned(base, directory / "checkpoints", FULL_GPT2_CLIENTS, tail=tail)
    return FullSet(base, checkpoints, sorted(c.name for c in FULL_GPT2_CLIENTS))


def tiny_bert(directory: Path) -> TinySet:
    """A tiny BERT base in ``directory/base`` and the ``BERT_CLIENTS`` adapters in ``directory/adapters``."""
    base = save_bert_base(directory / "base")
    adapters = save_adapters(base, directory / "adapters", BERT_CLIENTS)
    return TinySet(base, adapters, [c.name for c in BERT_CLIENTS])


def tiny_gpt2(directory: Path) -> TinySet:
    """A tiny GPT-2 base in ``directory/base`` and the ``GPT2_CLIENTS`` (fan_in_fan_out) adapters."""
    base = save_gpt2_base(directory / "base")
    adapters = save_adapters(base, directory / "adapters", GPT2_CLIENTS, fan_in_fan_out=True)
    return TinySet(base, adapters, [c.name for c in GPT2_CLIENTS], fan_in_fan_out=True)
