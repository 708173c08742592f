"""Exact cosine similarity of task vectors, computed in LoRA factor space.

For one module, stacking every client's factors gives all K² Frobenius inner products
``<s_i B_i A_i, s_j B_j A_j> = sum((s_i B_iᵀ s_j B_j) ∘ (A_i A_jᵀ))`` from two (Σr × Σr) Grams,
at cost O((Σr)²(d + k)); no d × k matrix is ever formed. The result does not depend on how a LoRA
happens to be factored (B G, G⁻¹ A), unlike cosine on flattened factors. Full checkpoints have
dense deltas W − W_base: their inner products are summed over ranges of rows, read one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedbip_cli.adapters import Adapter
from fedbip_cli.checkpoints import Checkpoint, row_ranges
from fedbip_cli.errors import AdapterError
from fedbip_cli.taskvec import checkpoint_deltas, module_factors


@dataclass
class GroupSimilarity:
    """Cosine similarity of the clients' task vectors restricted to one group of modules."""

    name: str
    modules: list[str]
    similarity: torch.Tensor  # (K, K) float64, diagonal 1
    norms: torch.Tensor  # (K,) float64: ||τ_i^g||_F


@dataclass
class SimilarityResult:
    clients: list[str]
    granularity: str
    groups: dict[str, GroupSimilarity]


def factor_inner_products(factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """All pairwise Frobenius inner products ``<B_i A_i, B_j A_j>`` of one module, in float64.

    Args:
        factors: per client ``(B, A)`` with B (out, r_i) already scaled and A (r_i, in), or None
            for a client without this module (zero delta).

    Returns:
        (K, K) float64 tensor of inner products.
    """
    present = [i for i, f in enumerate(factors) if f is not None]
    k = len(factors)
    if not present:
        return torch.zeros(k, k, dtype=torch.float64)
    b = torch.cat([factors[i][0] for i in present], dim=1).to(torch.float64)
    a = torch.cat([factors[i][1] for i in present], dim=0).to(torch.float64)
    products = (b.T @ b) * (a @ a.T)  # (Σr, Σr): entry (p, q) = <b_p, b_q><a_p, a_q>
    # Sum each (i, j) block with a one-hot (Σr, K) matrix mapping factor rows to clients.
    owner = torch.zeros(b.shape[1], k, dtype=torch.float64, device=b.device)
    row = 0
    for i in present:
        r = factors[i][0].shape[1]
        owner[row : row + r, i] = 1.0
        row += r
    return (owner.T @ products @ owner).cpu()


def dense_inner_products(deltas: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """All pairwise inner products of dense deltas (any shape, flattened), in float64.

    Args:
        deltas: per client a tensor, or None for a zero delta.

    Returns:
        (K, K) float64 tensor.
    """
    k = len(deltas)
    present = [i for i, d in enumerate(deltas) if d is not None]
    inner = torch.zeros(k, k, dtype=torch.float64)
    if present:
        x = torch.stack([deltas[i].reshape(-1).to(torch.float64) for i in present])
        idx = torch.tensor(present)
        inner[idx[:, None], idx[None, :]] = (x @ x.T).cpu()
    return inner


def cosine_from_inner(inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix and norms from a Gram of inner products.

    A client whose task vector is zero in this group gets similarity 0 to every other client and 1
    to itself, so that its weight row keeps only itself.
    """
    norms = inner.diagonal().clamp(min=0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = inner / safe[:, None] / safe[None, :]
    cosine = cosine.clamp(-1.0, 1.0)
    zero = norms == 0
    cosine[zero, :] = 0.0
    cosine[:, zero] = 0.0
    cosine.fill_diagonal_(1.0)
    return cosine, norms


def module_inner_products(
    adapters: Sequence[Adapter],
    modules: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Inner-product Grams for every module, reading each module's factors once."""
    result: dict[str, torch.Tensor] = {}
    for module in modules:
        result[module] = factor_inner_products(module_factors(adapters, module, device=device))
        if progress is not None:
            progress(1)
    return result


def checkpoint_inner_products(
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint,
    tensors: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    max_elements: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Inner-product Grams of the checkpoints' deltas W − W_base for every tensor, in float64.

    Each tensor is read ``max_elements`` at a time (whole when None) and its Gram summed over the ranges.
    """
    result: dict[str, torch.Tensor] = {}
    for tensor in tensors:
        gram = torch.zeros(len(checkpoints), len(checkpoints), dtype=torch.float64)
        for rows in row_ranges(base.tensors[tensor].shape, max_elements):
            gram += dense_inner_products(list(checkpoint_deltas(checkpoints, base, tensor, rows, device=device)[1]))
        result[tensor] = gram
        if progress is not None:
            progress(1)
    return result


def similarity_from_inner(
    clients: Sequence[str], granularity: str, groups: dict[str, list[str]], inner: dict[str, torch.Tensor]
) -> SimilarityResult:
    """Sum module Grams within each group and normalise to cosine.

    Raises AdapterError when a client's whole task vector is zero: its similarity is undefined.
    """
    total = sum(inner.values())
    zero = [name for name, value in zip(clients, total.diagonal().tolist()) if value <= 0]
    if zero:
        raise AdapterError(
            f"task vector is zero (every lora_B or lora_A is 0, or every tensor equals the base): {', '.join(zero)}",
            where=zero[0],
            hint="an untrained adapter (peft initialises lora_B to zero) or a copy of the base carries no task; drop it or train it",
        )
    out: dict[str, GroupSimilarity] = {}
    for name, members in groups.items():
        gram = sum(inner[m] for m in members)
        cosine, norms = cosine_from_inner(gram)
        out[name] = GroupSimilarity(name, list(members), cosine, norms)
    return SimilarityResult(list(clients), granularity, out)
