"""Read one module of a PEFT LoRA adapter from disk, in float64, as the reference and peft path need it.

Independent of fedbip: ``safe_open`` for the two tensors and the config's scale (lora_alpha / r, or
/ √r under rsLoRA, with ``rank_pattern`` / ``alpha_pattern`` as peft resolves them).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from factories import CONFIG_NAME, PREFIX, WEIGHTS_NAME, pattern_value  # noqa: E402


def weights_file(directory: Path) -> Path:
    return directory / WEIGHTS_NAME


def scale(config: dict, module: str) -> float:
    """peft's scaling of ``module``: lora_alpha / r (/ √r under rsLoRA), patterns honoured."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def raw_factors(directory: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (A, B) of ``module``, in their stored dtype."""
    with safe_open(str(weights_file(directory)), framework="pt") as f:
        return f.get_tensor(f"{PREFIX}{module}.lora_A.weight"), f.get_tensor(f"{PREFIX}{module}.lora_B.weight")


def factors(directory: Path, module: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) of ``module`` in float64: ΔW = (s·B) @ A."""
    config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    a, b = raw_factors(directory, module)
    s = scale(config, module)
    return (s * b.to(device=device, dtype=torch.float64)), a.to(device=device, dtype=torch.float64)


def delta(directory: Path, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense float64 ΔW = s·B@A of ``module`` (the adapters here are not fan_in_fan_out)."""
    b, a = factors(directory, module, device)
    return b @ a
