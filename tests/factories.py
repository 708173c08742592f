"""Build PEFT-format LoRA adapters from tensors, without peft, and their dense reference deltas.

``write_lora_adapter`` writes exactly what ``peft``'s ``save_pretrained`` writes for a plain LoRA
(``adapter_config.json`` + ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
of shape (r, in) and ``.lora_B.weight`` of shape (out, r)). ``random_adapter`` fills one from a seeded
``torch.Generator``. ``dense_delta`` is the float64 reference: peft's ``get_delta_weight`` written out
plainly, independent of fedbip's own code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

Shapes = Mapping[str, tuple[int, int]]  # module -> (out_features, in_features)


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key (a regex) matching the name's tail wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_lora_adapter(
    directory: Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    fan_in_fan_out: bool = False,
    target_modules: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter directory.

    Args:
        directory: created if missing.
        factors: module name -> ``(A, B)`` with A (r, in) and B (out, r), unscaled as stored by peft.
        r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, fan_in_fan_out: the config fields.
        target_modules: defaults to the last name component of every module.
        dtype: cast every tensor to it (default: keep the tensors' dtype).
        task_type: peft's task type (None: a bare ``PeftModel`` over any ``nn.Module``).

    Returns:
        ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors}) if target_modules is None else list(target_modules)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": "tiny-base",
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        assert a.shape[0] == b.shape[1], f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on rank"
        tensors[f"{PREFIX}{module}.lora_A.weight"] = (a if dtype is None else a.to(dtype)).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (b if dtype is None else b.to(dtype)).contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def random_factors(
    shapes: Shapes,
    generator: torch.Generator,
    *,
    r: int = 2,
    rank_pattern: Mapping[str, int] | None = None,
    missing: Iterable[str] = (),
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian float64 ``(A, B)`` per module (ranks from ``rank_pattern`` as peft resolves it), minus ``missing``."""
    skip = set(missing)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (out_features, in_features) in shapes.items():
        if module in skip:
            continue
        rank = pattern_value(rank_pattern or {}, module, r)
        a = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
        b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
        factors[module] = (a, b)
    return factors


def random_adapter(
    directory: Path,
    shapes: Shapes,
    generator: torch.Generator,
    *,
    r: int = 2,
    lora_alpha: float = 4,
    rank_pattern: Mapping[str, int] | None = None,
    missing: Iterable[str] = (),
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """A random adapter over ``shapes`` (module -> (out, in)); ``config`` passes the other config fields."""
    factors = random_factors(shapes, generator, r=r, rank_pattern=rank_pattern, missing=missing)
    return write_lora_adapter(
        directory, factors, r=r, lora_alpha=lora_alpha, rank_pattern=rank_pattern, dtype=dtype, **config
    )


def base_model_files(shapes: Shapes, config: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """A base model's files (``config.json``, ``model.safetensors`` of zero weights) for a Hub cache or a directory.

    ``shapes`` maps module name -> (out, in); the weights are ``<module>.weight`` of that shape.
    """
    weights = {f"{module}.weight": torch.zeros(shape) for module, shape in shapes.items()}
    return {"config.json": json.dumps(dict(config or {})).encode(), "model.safetensors": save(weights)}


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and every tensor of an adapter directory (tensor names without the peft prefix)."""
    config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    return config, tensors


def lora_rank(directory: Path, module: str) -> int:
    """The rank of ``module``'s stored lora_A."""
    return int(read_adapter(directory)[1][f"{module}.lora_A.weight"].shape[0])


def dense_delta(directory: Path, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """ΔW of ``module`` in float64 and in the base weight's layout, as peft's ``get_delta_weight`` gives it.

    ``scale · B @ A`` with scale = alpha / r (alpha / sqrt(r) under rsLoRA), r and alpha taken from
    ``rank_pattern`` / ``alpha_pattern`` (first match wins) or the defaults, transposed to (in, out)
    when ``fan_in_fan_out``. ``shape`` is (out, in); a module the adapter does not target is zero.
    """
    config, tensors = read_adapter(directory)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    out_features, in_features = shape
    if f"{module}.lora_A.weight" not in tensors:
        zero = torch.zeros(out_features, in_features, dtype=torch.float64)
        return zero.T if fan_in_fan_out else zero
    a = tensors[f"{module}.lora_A.weight"].to(torch.float64)
    b = tensors[f"{module}.lora_B.weight"].to(torch.float64)
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    assert r == a.shape[0], f"{module}: config says r={r}, tensors have rank {a.shape[0]}"
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    delta = scale * (b @ a)
    assert delta.shape == (out_features, in_features)
    return delta.T if fan_in_fan_out else delta


def dense_deltas(directory: Path, shapes: Shapes) -> dict[str, torch.Tensor]:
    """``dense_delta`` of every module in ``shapes``."""
    return {module: dense_delta(directory, module, shape) for module, shape in shapes.items()}
