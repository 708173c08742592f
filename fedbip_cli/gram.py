"""Inner products of LoRA task vectors from stacked factors, fast and with order-independent bits.

One module's inner products ``<s_x B_x A_x, s_y B_y A_y>_F = s_x s_y Σ_st (B_xᵀB_y)_st (A_x A_yᵀ)_st``
for all pairs come from two stacked Grams (a few large matrix products) instead of one small product
per pair. A plain float64 GEMM rounds differently depending on the shapes it is given, so the same
pair would get other last bits in a run with other clients, and a cache of earlier products would
no longer reproduce a cold run. Here every Gram entry is exact instead:

Each column of the stacked factors is split into two slices, ``x = hi + lo``, integer multiples of
a per-column power of two with at most β bits each (β chosen from the inner dimension so that a sum
of products of such integers never exceeds 2⁵³: the GEMM computes it exactly, in any order).
``hiᵀhi`` and ``hiᵀlo + loᵀhi`` are therefore exact; their sum is rounded once. For float16 and
bfloat16 factors ``lo`` is almost all zeros and its products are taken sparse, at a third of the cost. What the split drops
is below 2^(-2β) ≈ 1e-12 of the column's largest entry (nothing at all for float16 factors of
width ≤ 2048), so the products agree with float64 arithmetic to about 1e-12 relative.

The per-pair sum over the r_x × r_y entries is then taken in two fixed orders and averaged, which
makes it symmetric in x and y; the scales are applied last as one product ``s_x · s_y``. A pair's
value thus depends only on the two clients' stored factors, never on the other clients, on their
order, or on tiling: it is what makes the inner-product cache bit-exact and the stacked engine fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Bounds the temporary Gram tile (rows × all columns, float64) per side.
TILE_ELEMENTS = 1 << 23


# ``lo`` is kept as its non-zeros when fewer than this fraction of its entries are non-zero.
SPARSE_LO = 1 / 16


@dataclass(frozen=True)
class SplitColumns:
    """Columns of an (inner, n) float64 matrix as two exact slices, ``x = hi + lo``.

    ``lo`` is dense, or (``lo is None``) kept as its non-zeros sorted by column: float16 and
    bfloat16 factors have a low slice only where an entry is far below its column's largest, so
    their cross products cost a sparse product instead of two more GEMMs. Either way the products
    are exact, hence the same bits.
    """

    hi: torch.Tensor
    lo: torch.Tensor | None = None
    lo_rows: torch.Tensor | None = None
    lo_columns: torch.Tensor | None = None
    lo_values: torch.Tensor | None = None

    def columns(self, index: slice) -> SplitColumns:
        if self.lo is not None:
            return SplitColumns(self.hi[:, index], self.lo[:, index])
        first, last = torch.searchsorted(
            self.lo_columns, torch.tensor([index.start, index.stop], device=self.lo_columns.device)
        ).tolist()
        return SplitColumns(
            self.hi[:, index],
            None,
            self.lo_rows[first:last],
            self.lo_columns[first:last] - index.start,
            self.lo_values[first:last],
        )

    def lo_transposed_times(self, y: torch.Tensor) -> torch.Tensor:
        """``loᵀ @ y``: (n, m) for y (inner, m)."""
        if self.lo is not None:
            return self.lo.T @ y
        shape = (self.hi.shape[1], self.hi.shape[0])
        sparse = torch.sparse_coo_tensor(
            torch.stack([self.lo_columns, self.lo_rows]),
            self.lo_values,
            shape,
            is_coalesced=True,
            check_invariants=False,
        )
        return torch.sparse.mm(sparse, y)


def slice_bits(inner: int) -> int:
    """β: the largest bit width with 2·inner·2^(2β) ≤ 2⁵³ (a cross product sums 2·inner terms)."""
    return (53 - math.ceil(math.log2(max(2 * inner, 2)))) // 2


def split_columns(x: torch.Tensor) -> SplitColumns:
    """Split each column of ``x`` (float64) into hi + lo, integers of at most β bits times a power of two."""
    inner = x.shape[0]
    bits = slice_bits(inner)
    _, exponent = torch.frexp(x.abs().amax(dim=0))  # max |column| < 2**exponent
    unit = torch.ldexp(torch.ones_like(x[0]), exponent - bits)
    hi = torch.round(x / unit) * unit
    fine = unit * 2.0**-bits
    lo = torch.round((x - hi) / fine) * fine
    if int(torch.count_nonzero(lo)) >= SPARSE_LO * lo.numel():
        return SplitColumns(hi, lo)
    rows, columns = lo.nonzero().unbind(1)  # row-major: a scan of the contiguous matrix
    order = torch.sort(columns, stable=True).indices  # then by column, for ``columns``' ranges
    rows, columns = rows[order], columns[order]
    return SplitColumns(hi, None, rows, columns, lo[rows, columns])


def exact_gram(left: SplitColumns, right: SplitColumns) -> torch.Tensor:
    """``leftᵀ right`` from the slices: ``hiᵀhi`` and the cross terms ``hiᵀlo + loᵀhi``, each exact, added once."""
    cross = right.lo_transposed_times(left.hi).T + left.lo_transposed_times(right.hi)
    return left.hi.T @ right.hi + cross


@dataclass(frozen=True)
class StackedFactors:
    """Clients' stored LoRA factors at one module, padded to one rank and split for exact Grams.

    Client u owns columns ``u·r … (u+1)·r − 1`` of the stacked ``B`` (out, K·r) and of ``Aᵀ``
    (in, K·r); a client of smaller rank has zero columns there, which add exact zeros.
    """

    b: SplitColumns
    a: SplitColumns
    scales: torch.Tensor  # (K,) float64
    rank: int

    @property
    def count(self) -> int:
        return self.scales.shape[0]


def stack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scales: Sequence[float], *, device: torch.device | str = "cpu"
) -> StackedFactors:
    """Stack stored (unscaled) ``(B, A)`` pairs, converted exactly to float64, padded to the largest rank."""
    rank = max(a.shape[0] for _, a in factors)
    out, inn = factors[0][0].shape[0], factors[0][1].shape[1]
    b = torch.zeros(out, len(factors) * rank, dtype=torch.float64, device=device)
    a = torch.zeros(inn, len(factors) * rank, dtype=torch.float64, device=device)
    for u, (fb, fa) in enumerate(factors):
        r = fa.shape[0]
        b[:, u * rank : u * rank + r] = fb.to(device=device, dtype=torch.float64)
        a[:, u * rank : u * rank + r] = fa.to(device=device, dtype=torch.float64).T
    return StackedFactors(
        split_columns(b), split_columns(a), torch.tensor(list(scales), dtype=torch.float64, device=device), rank
    )


def block_products(stacked: StackedFactors, rows: slice, columns: slice) -> torch.Tensor:
    """Inner products of clients ``rows`` × ``columns`` (ranges of stacked positions), float64."""
    r = stacked.rank
    row_cols = slice(rows.start * r, rows.stop * r)
    col_cols = slice(columns.start * r, columns.stop * r)
    g_b = exact_gram(stacked.b.columns(row_cols), stacked.b.columns(col_cols))
    g_a = exact_gram(stacked.a.columns(row_cols), stacked.a.columns(col_cols))
    h = (g_b * g_a).reshape(rows.stop - rows.start, r, columns.stop - columns.start, r)
    forward = torch.zeros(h.shape[0], h.shape[2], dtype=torch.float64, device=h.device)
    backward = torch.zeros_like(forward)
    for s in range(r):
        for t in range(r):
            forward += h[:, s, :, t]  # the row client's entries outer
    for t in range(r):
        for s in range(r):
            backward += h[:, s, :, t]  # the column client's entries outer
    scale = stacked.scales[rows, None] * stacked.scales[None, columns]
    return (forward + backward) * 0.5 * scale + 0.0  # + 0.0: no negative zeros


def row_tile(stacked: StackedFactors) -> int:
    """How many clients' rows one tile holds so that a tile's Grams stay under ``TILE_ELEMENTS``."""
    return max(1, TILE_ELEMENTS // max(1, stacked.count * stacked.rank * stacked.rank))


def all_products(stacked: StackedFactors) -> torch.Tensor:
    """The full (K, K) matrix of inner products, computing the upper triangle tile by tile."""
    k = stacked.count
    result = torch.zeros(k, k, dtype=torch.float64, device=stacked.scales.device)
    step = row_tile(stacked)
    for start in range(0, k, step):
        stop = min(k, start + step)
        block = block_products(stacked, slice(start, stop), slice(start, k))
        result[start:stop, start:] = block
        result[start:, start:stop] = block.T
    return result


def rows_products(stacked: StackedFactors, rows: Sequence[int]) -> torch.Tensor:
    """Inner products of the clients at ``rows`` with every client: (len(rows), K)."""
    k = stacked.count
    out = torch.zeros(len(rows), k, dtype=torch.float64, device=stacked.scales.device)
    step = row_tile(stacked)
    # Consecutive runs of rows make a block each (tiles of a run when it is long).
    runs: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if runs and rows[runs[-1][1] - 1] + 1 == row and runs[-1][1] - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    for first, last in runs:
        start = rows[first]
        out[first:last] = block_products(stacked, slice(start, start + last - first), slice(0, k))
    return out
