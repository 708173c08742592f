"""``--to-lora R``: a dense personalized delta per linear layer, written as a rank-R LoRA factor pair.

M = Σ_j P_ij ΔW_j is factored by a seeded randomized SVD (Halko, Martinsson & Tropp 2011, algorithm
4.4: a Gaussian sketch of R + oversampling columns, a few power iterations re-orthonormalised by QR,
then the exact SVD of the small projected matrix). √σ is split between B and A, and the energy kept
Σ_kept σ² / ‖M‖_F² is reported with the exact denominator. When the sketch would cover the smaller
dimension the exact SVD is cheaper and is used instead.

Only the weights of linear layers become LoRA modules: peft's LoRA on ``nn.Linear`` and on
transformers' ``Conv1D`` (GPT-2, whose weight is stored (in, out)) has ΔW = B A. Which tensors are
such weights is read from the base architecture, instantiated on the meta device (no weights).
Everything else (biases, norms, embeddings) is skipped and listed with the reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedbip_cli.errors import AdapterError, UsageError
from fedbip_cli.merge import Combined

OVERSAMPLE = 8
POWER_ITERATIONS = 4
SEED = 0
# peft's LoRA layer types whose delta is B @ A, and whether the base stores the weight transposed (in, out).
LINEAR_TYPES = {"Linear": False, "Conv1D": True}
_SKIPPED = "only the weights of linear layers become LoRA modules"


@dataclass(frozen=True)
class LoraTarget:
    """A 2-D weight that becomes a LoRA module: ``module`` is its layer, ``transposed`` for Conv1D."""

    tensor: str
    module: str
    transposed: bool


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular triplets ``(U, σ, Vᵀ)`` of a 2-D ``matrix``.

    Args:
        matrix: (m, n), in the precision to compute in.
        rank: triplets wanted (at most min(m, n) are returned).
        generator: a CPU generator for the Gaussian sketch (seeded by the caller).
        oversample, power_iterations: extra sketch columns and subspace iterations.

    Returns:
        U (m, k), σ (k,) descending, Vᵀ (k, n) with k = min(rank, m, n).
    """
    rows, cols = matrix.shape
    sketch = min(rank + oversample, rows, cols)
    if sketch == min(rows, cols):
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        omega = torch.randn(cols, sketch, generator=generator, dtype=matrix.dtype).to(matrix.device)
        q = torch.linalg.qr(matrix @ omega).Q
        for _ in range(power_iterations):
            q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ q).Q).Q
        small_u, sigma, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
        u = q @ small_u
    keep = min(rank, sigma.shape[0])
    return u[:, :keep], sigma[:keep], vh[:keep]


def low_rank_factors(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> Combined:
    """Rank-``rank`` factors B (m, k) and A (k, n) with B A ≈ ``matrix``, and the energy they keep.

    The energy is Σ_kept σ² / ‖matrix‖_F² (1.0 for a zero matrix), computed in float64.
    """
    matrix = matrix.to(torch.float64)
    total = float((matrix * matrix).sum())
    u, sigma, vh = randomized_svd(matrix, rank, generator)
    root = sigma.sqrt()
    energy = float((sigma * sigma).sum()) / total if total > 0 else 1.0
    return Combined(u * root[None, :], root[:, None] * vh, energy)


def tensor_generator(tensor: str, seed: int = SEED) -> torch.Generator:
    """The sketch's generator for one tensor: seeded from ``seed`` and the name, so order does not matter."""
    return torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(tensor.encode("utf-8")))


def lora_targets(base_dir: Path, tensors: Iterable[str]) -> tuple[list[LoraTarget], dict[str, str]]:
    """Split floating tensors into LoRA targets (weights of linear layers) and the skipped ones.

    Args:
        base_dir: the base model directory (its ``config.json`` names the architecture).
        tensors: floating tensor names.

    Returns:
        The targets in the given order, and skipped tensor -> reason.
    """
    layers = _layer_types(base_dir)
    targets: list[LoraTarget] = []
    skipped: dict[str, str] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        kind = layers.get(module)
        if kind in LINEAR_TYPES and leaf == "weight":
            targets.append(LoraTarget(name, module, LINEAR_TYPES[kind]))
        elif kind is None:
            skipped[name] = f"no layer of the base architecture holds it; {_SKIPPED}"
        else:
            skipped[name] = f"{kind} {leaf}; {_SKIPPED}"
    return targets, skipped


def _layer_types(base_dir: Path) -> dict[str, str]:
    """Layer kind by module name (``Linear``, ``Conv1D`` or the class name), from the base built on the meta device."""
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "--to-lora needs transformers to tell linear layers from other tensors",
            hint="install it (pip install transformers, or fedbip[simulate])",
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        with torch.device("meta"):
            model = (
                architecture._from_config(config)
                if architecture is not None
                else transformers.AutoModel.from_config(config)
            )
    except Exception as exc:  # transformers raises many kinds of error for unknown or broken configs
        raise AdapterError(
            f"cannot build the base architecture from config.json to find its linear layers: {exc}",
            where=str(base_dir),
            hint="--to-lora needs a base whose architecture transformers knows",
        ) from None
    from transformers.pytorch_utils import Conv1D

    def kind(module: torch.nn.Module) -> str:
        if isinstance(module, torch.nn.Linear):  # subclasses too, as peft dispatches them
            return "Linear"
        return "Conv1D" if isinstance(module, Conv1D) else type(module).__name__

    return {name: kind(module) for name, module in model.named_modules() if name}
