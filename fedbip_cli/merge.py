"""Personalized merge of LoRA factors: M_i = Σ_j P_ij ΔW_j, written back as low-rank factors.

Every combine mode takes one module's per-client ``(scale · B, A)`` factors and one weight row and
returns new ``(B, A)`` with scale 1 (ΔW = B @ A) and the fraction of energy kept.
For LoRA, M_i = U V exactly with U = [P_i1 s_1 B_1, …, P_iK s_K B_K] and V = [A_1; …; A_K].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedbip_cli.errors import FedbipError, UsageError

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Combined:
    """A merged module: ΔW = b @ a. ``energy`` is Σ kept σ² / Σ σ² (1.0 when exact, None when unknown)."""

    b: torch.Tensor
    a: torch.Tensor
    energy: float | None


def stack_weighted(factors: Sequence[Factors | None], row: torch.Tensor) -> Factors | None:
    """U and V of the exact merge, over the clients with a non-zero weight and this module."""
    kept = [(f, w) for f, w in zip(factors, row.tolist()) if f is not None and w != 0.0]
    if not kept:
        return None
    u = torch.cat([w * b for (b, _), w in kept], dim=1)
    v = torch.cat([a for (_, a), _ in kept], dim=0)
    return u, v


def truncated_svd_factors(u: torch.Tensor, v: torch.Tensor, rank: int) -> Combined:
    """Best rank-``rank`` approximation of U V without forming it.

    U = Q_u R_u and Vᵀ = Q_v R_v, so U V = Q_u (R_u R_vᵀ) Q_vᵀ; the SVD of the small core gives the
    singular triplets of U V. √σ is split evenly between the new B and A.
    """
    q_u, r_u = torch.linalg.qr(u)
    q_v, r_v = torch.linalg.qr(v.T)
    x, sigma, y_t = torch.linalg.svd(r_u @ r_v.T, full_matrices=False)
    keep = min(rank, sigma.shape[0])
    total = float((sigma**2).sum())
    energy = float((sigma[:keep] ** 2).sum()) / total if total > 0 else 1.0
    root = sigma[:keep].sqrt()
    b = (q_u @ x[:, :keep]) * root[None, :]
    a = root[:, None] * (y_t[:keep] @ q_v.T)
    return Combined(b, a, energy)


def combine_svd(factors: Sequence[Factors | None], row: torch.Tensor, rank: int) -> Combined | None:
    """Exact merge truncated to ``rank`` by SVD (default)."""
    stacked = stack_weighted(factors, row)
    return None if stacked is None else truncated_svd_factors(*stacked, rank)


def combine_cat(factors: Sequence[Factors | None], row: torch.Tensor, rank: int) -> Combined | None:
    """Exact merge: the stacked factors themselves (rank Σ r over clients with non-zero weight)."""
    stacked = stack_weighted(factors, row)
    return None if stacked is None else Combined(stacked[0], stacked[1], 1.0)


def combine_linear(factors: Sequence[Factors | None], row: torch.Tensor, rank: int) -> Combined | None:
    """FedIT-style: B and A averaged separately, (Σ_j P_ij s_j B_j)(Σ_j P_ij A_j). Not Σ P ΔW: inexact.

    A client without this module contributes zero factors. All ranks must be equal.
    """
    present = [f for f in factors if f is not None]
    if not present:
        return None
    ranks = {a.shape[0] for _, a in present}
    if len(ranks) > 1:
        raise FedbipError(
            f"--combine linear needs equal ranks, found {sorted(ranks)}",
            hint="use --combine svd (exact, truncated) or cat (exact)",
        )
    weights = row.tolist()
    b = sum(w * f[0] for f, w in zip(factors, weights) if f is not None)
    a = sum(w * f[1] for f, w in zip(factors, weights) if f is not None)
    return Combined(b, a, None)


def energy_range(energy: dict[str, float | None]) -> tuple[float | None, float | None]:
    """(min, mean) of the energy kept over a client's modules, ignoring unknown (None) values.

    Returns (None, None) when no module's energy is known (``linear``).
    """
    known = [v for v in energy.values() if v is not None]
    if not known:
        return None, None
    return min(known), sum(known) / len(known)


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Exact personalized merge of dense deltas: out[i] = Σ_j weights[i, j] · deltas[j].

    Args:
        deltas: (K, ...) stacked per-client deltas.
        weights: (K_out, K) weight rows.

    Returns:
        (K_out, ...) tensor in the deltas' dtype (accumulated in float64).
    """
    flat = deltas.reshape(deltas.shape[0], -1).to(torch.float64)
    merged = weights.to(device=flat.device, dtype=torch.float64) @ flat
    return merged.reshape(weights.shape[0], *deltas.shape[1:]).to(deltas.dtype)


COMBINERS: dict[str, Callable[[Sequence[Factors | None], torch.Tensor, int], Combined | None]] = {
    "svd": combine_svd,
    "cat": combine_cat,
    "linear": combine_linear,
}


def combiner(name: str) -> Callable[[Sequence[Factors | None], torch.Tensor, int], Combined | None]:
    """The registered combine function called ``name``."""
    if name not in COMBINERS:
        raise UsageError(f"unknown combine mode {name!r}; choose one of {', '.join(COMBINERS)}")
    return COMBINERS[name]
