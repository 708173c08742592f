"""Exact cosine similarity of task vectors, computed in LoRA factor space.

For one module, the Frobenius inner product of two clients' task vectors is
``<s_i B_i A_i, s_j B_j A_j> = sum((s_i B_iᵀ s_j B_j) ∘ (A_i A_jᵀ))``, at cost O(r_i r_j (d + k)); no
d × k matrix is ever formed. The result does not depend on how a LoRA happens to be factored
(B G, G⁻¹ A), unlike cosine on flattened factors.

All products of a module come from exact stacked Grams (``gram``), so a pair's value depends only
on its two clients' factors; every product goes through an ``InnerProductCache``. A value is thus
the same bits whether it was computed in this run or read from a cache filled by an earlier one,
whatever the other clients are; and adding one client to K cached ones computes K + 1 products per
module, not (K + 1)².

Full checkpoints have dense deltas W − W_base: their inner products are summed over ranges of rows,
read one at a time, with every client's Gram computed at once; they do not go through the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedbip_cli.adapters import Adapter, FactorReader
from fedbip_cli.checkpoints import Checkpoint, row_ranges
from fedbip_cli.errors import AdapterError
from fedbip_cli.gram import all_products, rows_products, stack_factors
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.taskvec import KeyedFactors, checkpoint_deltas, keyed_module_factors

# Names the inner-product formula in cache keys: change it when ``gram``'s products change.
ENGINE = "fedbip-exact-gram-v2"


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
    # How the similarities were computed: {"method": "exact"}, or a sketch's method, dim and seed.
    method: dict[str, Any] = field(default_factory=lambda: {"method": "exact"})
    # Which parts the similarity covers (``Workspace.coverage``): counts by kind, --heads, saved modules left out.
    covers: dict[str, Any] | None = None


def compute_pairs(factors: dict[bytes, KeyedFactors], keys: Sequence[bytes], missing: torch.Tensor) -> torch.Tensor:
    """The inner products of the ``missing`` pairs of ``keys``, from stacked exact Grams (``gram``).

    Args:
        factors: the keyed factors by key.
        keys: the distinct keys, in the order of ``missing``'s rows and columns.
        missing: (n, n) symmetric boolean mask of the pairs wanted.

    Returns:
        (n, n) float64 on the CPU, holding the wanted pairs (other entries are unspecified). Whole
        rows are computed, against every key, for a few keys that together touch every missing pair
        (after one client is added: its row alone); when that would be half the rows or more, the
        upper triangle tile by tile.
    """
    stacked = stack_factors(
        [(factors[k].b, factors[k].a) for k in keys], [factors[k].scale for k in keys], device=factors[keys[0]].b.device
    )
    rows = None if bool(missing.all()) else covering_rows(missing, limit=(len(keys) - 1) // 2)
    if rows is None:
        return all_products(stacked).cpu()
    values = torch.zeros(len(keys), len(keys), dtype=torch.float64)
    values[rows] = rows_products(stacked, rows).cpu()
    values[:, rows] = values[rows].T
    return values


def covering_rows(missing: torch.Tensor, limit: int | None = None) -> list[int] | None:
    """Rows whose products cover every missing pair of a symmetric mask, few of them (greedy: the
    row with the most missing pairs left first), in increasing order; None when more than ``limit``
    would be needed. O(n) per row chosen: each row's count of missing pairs is kept up to date."""
    remaining = missing.clone()
    counts = remaining.sum(dim=1)
    rows: list[int] = []
    while int(counts.max()) > 0:
        if limit is not None and len(rows) >= limit:
            return None
        u = int(counts.argmax())
        rows.append(u)
        counts -= remaining[:, u].to(counts.dtype)  # every row loses its pair with u ...
        counts[u] = 0  # ... and u's own are covered
        remaining[u, :] = False
        remaining[:, u] = False
    return sorted(rows)


def cached_inner_products(factors: Sequence[KeyedFactors | None], cache: InnerProductCache) -> torch.Tensor:
    """All pairwise inner products of one module, computing only the pairs the cache lacks.

    Clients with identical factors (the same key) are computed once. A pair's value depends only on
    the two clients' factors (see ``gram``), so it is the same bits whether it was computed in this
    run or read from a cache filled by an earlier one, whatever the other clients are.

    Args:
        factors: per client its keyed factors, or None for a client without this module (zero delta).
        cache: where known products are read and new ones recorded.

    Returns:
        (K, K) float64 tensor of inner products, on the CPU.
    """
    by_key = {f.key: f for f in factors if f is not None}
    keys = sorted(by_key)
    n = len(keys)
    position = {key: u for u, key in enumerate(keys)}
    # The (distinct keys)² matrix: what the cache knows, then the rest computed.
    distinct = torch.zeros(n, n, dtype=torch.float64)
    known = torch.zeros(n, n, dtype=torch.bool)
    found = cache.lookup(keys) if cache.persistent else {}
    if found:
        rows = torch.tensor([position[x] for x, _ in found])
        columns = torch.tensor([position[y] for _, y in found])
        values = torch.tensor(list(found.values()), dtype=torch.float64)
        distinct[rows, columns] = values
        distinct[columns, rows] = values
        known[rows, columns] = known[columns, rows] = True
    missing = ~known
    if n and bool(missing.any()):
        fresh = compute_pairs(by_key, keys, missing)
        distinct = torch.where(missing, fresh, distinct)
        upper = missing.triu().nonzero()
        if cache.persistent:
            xs, ys = upper.unbind(1)
            cache.store({(keys[x], keys[y]): v for x, y, v in zip(xs.tolist(), ys.tolist(), distinct[xs, ys].tolist())})
        else:
            cache.discard(upper.shape[0])
    # Spread the distinct keys' matrix over the clients.
    present = [i for i, f in enumerate(factors) if f is not None]
    inner = torch.zeros(len(factors), len(factors), dtype=torch.float64)
    if present:
        index = torch.tensor(present)
        of = torch.tensor([position[factors[i].key] for i in present])
        inner[index[:, None], index[None, :]] = distinct[of[:, None], of[None, :]]
    return inner


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


def cosine_from_inner(inner: torch.Tensor, *, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix and norms from a Gram of inner products; the cosine is exactly symmetric.

    The upper triangle is mirrored onto the lower one (a GEMM need not give ⟨i,j⟩ and ⟨j,i⟩ the same
    bits) and each entry is divided by the product n_i·n_j, which is the same bits both ways round.
    A client whose task vector is zero in this group gets similarity 0 to every other client and 1
    to itself, so that its weight row keeps only itself. ``in_place`` overwrites ``inner`` with the
    cosines instead of copying it (the same bits): a 10 000-client Gram is 800 MB, so the work goes
    a block of rows at a time.
    """
    norms = inner.diagonal().clamp(min=0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = inner if in_place else inner.clone()
    blocks = [slice(top, min(top + SYMMETRIC_BLOCK, len(norms))) for top in range(0, len(norms), SYMMETRIC_BLOCK)]
    for rows in blocks:  # the upper triangle onto the lower, all of it before any division
        cosine[rows, : rows.start] = cosine[: rows.start, rows].T
        block = cosine[rows, rows]
        block.copy_(block.triu() + block.triu(1).T)
    for rows in blocks:
        cosine[rows].div_(safe[rows, None] * safe[None, :])
    cosine.clamp_(-1.0, 1.0)
    zero = norms == 0
    cosine[zero, :] = 0.0
    cosine[:, zero] = 0.0
    cosine.fill_diagonal_(1.0)
    return cosine, norms


# Rows of a cosine matrix made symmetric and normalised at a time.
SYMMETRIC_BLOCK = 1024


def module_inner_products(
    adapters: Sequence[Adapter],
    modules: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    cache: InnerProductCache | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Inner-product matrices for every module, reading each module's factors once.

    Args:
        adapters: the clients.
        modules: the modules to compute (a client without one has a zero delta there).
        device: where the products are computed; it is part of the cache key, since another device
            may round differently.
        cache: known products (default: none kept).
        progress: called with 1 after each module.
    """
    cache = cache or InnerProductCache()
    salt = f"{ENGINE}/{torch.device(device).type}"
    result: dict[str, torch.Tensor] = {}
    reader = FactorReader()
    for module in modules:
        # Without a cache directory nothing is looked up, so the clients need no content hash.
        keyed = keyed_module_factors(adapters, module, salt=salt, device=device, hashed=cache.persistent, reader=reader)
        result[module] = cached_inner_products(keyed, cache)
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
