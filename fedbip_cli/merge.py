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


def output_rank(mode: str, ranks: Sequence[int | None], row: torch.Tensor, rank: int, shape: tuple[int, int]) -> int:
    """The rank of client ``row``'s merged module, known before any compute (0: the module is left out).

    Args:
        mode: the combine mode.
        ranks: per input client its rank at the module, None where it does not target it.
        row: the client's weight row.
        rank: the requested rank (svd).
        shape: (out, in) of the module.
    """
    contributing = [r for r, w in zip(ranks, row.tolist()) if r is not None and w != 0.0]
    present = [r for r in ranks if r is not None]
    return registered(mode).stack_rank(contributing, present, rank, shape) if present else 0


def combine_rank(mode: str, rank: int, shape: tuple[int, int]) -> int:
    """The rank a dense merged delta of ``shape`` (out, in) is written with under ``mode``.

    Raises UsageError for a mode that only averages factors (``linear``): a dense delta has none.
    """
    dense_rank = registered(mode).dense_rank
    if dense_rank is None:
        raise UsageError(
            f"--combine {mode} averages LoRA factors; DoRA and mixed-kind modules have no shared factors",
            hint="use --combine svd (rank R) or cat (exact)",
        )
    return dense_rank(rank, shape)


# Randomized subspace iteration for the shared-basis path: extra vectors and power iterations.
OVERSAMPLE = 10
POWER_ITERATIONS = 3
# Bound the memory of the per-client cores in flight and of one band of every client's pieces
# (float64 elements): 256 MB and 64 MB. Every chunk of cores forms the pieces again, so the chunk of
# cores is the larger (1000 clients at 384 × 384: 5 passes).
CORE_ELEMENTS = 1 << 25
PIECE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Basis:
    """One side of a module's stacked factors, ``X = Q Lᵀ`` with Q (dim, p) orthonormal.

    ``lt`` is Lᵀ (p, n). Q is ``x @ solve(r)`` (Cholesky QR) or ``q`` (Householder QR), or the
    identity when the stack is at least as wide as the dimension (``lt`` is then X itself).
    """

    lt: torch.Tensor
    x: torch.Tensor | None = None
    r: torch.Tensor | None = None
    q: torch.Tensor | None = None

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """Q @ y."""
        if self.q is not None:
            return self.q @ y
        if self.r is not None:
            return self.x @ torch.linalg.solve_triangular(self.r, y, upper=True)
        return y


# Cholesky QR is used while the stack's condition number (estimated from R's diagonal) is below
# this; beyond it Householder QR keeps the basis orthonormal to working precision.
CHOLESKY_CONDITION = 1e4


def stack_basis(x: torch.Tensor) -> Basis:
    """A basis of the column space of ``x`` (dim, n) in float64: identity, Cholesky QR or QR."""
    dim, n = x.shape
    if n >= dim:
        return Basis(lt=x)
    r, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
    if int(info) == 0:
        diagonal = r.diagonal().abs()
        if float(diagonal.min()) > 0 and float(diagonal.max() / diagonal.min()) < CHOLESKY_CONDITION:
            return Basis(lt=r, x=x, r=r)
    q, r = torch.linalg.qr(x)
    return Basis(lt=r, q=q)


def orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each (p, w) matrix's columns: Cholesky QR twice (two small batched
    products), or Householder QR when a Gram is not positive definite."""
    q = y
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.transpose(1, 2) @ q, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(y).Q
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q


def top_singular(
    cores: torch.Tensor, keep: int, *, solver: str, generator_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``keep`` largest singular triplets of each matrix of ``cores`` (c, p, q): U, σ, Vᵀ.

    ``exact`` is a full batched SVD; ``randomized`` a subspace iteration with ``OVERSAMPLE`` extra
    vectors and ``POWER_ITERATIONS`` passes from a fixed seed (so re-runs give the same bits).
    """
    p, q = cores.shape[1:]
    if solver == "exact" or min(p, q) <= keep + OVERSAMPLE:
        u, sigma, vt = torch.linalg.svd(cores, full_matrices=False)
        return u[:, :, :keep], sigma[:, :keep], vt[:, :keep]
    width = keep + OVERSAMPLE
    generator = torch.Generator(device=cores.device).manual_seed(generator_seed)
    # The subspace is found in float32 (it only needs to be close); the final projection, which
    # decides σ, the energy and the output factors, is float64.
    single = cores.to(torch.float32)
    omega = torch.randn(q, width, dtype=torch.float32, device=cores.device, generator=generator)
    basis = orthonormal(single @ omega)
    for _ in range(POWER_ITERATIONS):
        basis = orthonormal(single @ orthonormal(single.transpose(1, 2) @ basis))
    basis = orthonormal(basis.to(cores.dtype))
    # (Cᵀ Q) is tall: its SVD is much cheaper in this orientation than Qᵀ C's.
    v, sigma, ut = torch.linalg.svd(cores.transpose(1, 2) @ basis, full_matrices=False)
    return (basis @ ut.transpose(1, 2))[:, :, :keep], sigma[:, :keep], v.transpose(1, 2)[:, :keep]


class ClientPieces:
    """Each client's piece ``L_Bᵀ[:, j] L_A[:, j]ᵀ`` of the cores (p_b, p_a), formed a band of rows at a time.

    ``lt_b`` (p_b, n) and ``lt_a`` (p_a, n) hold the clients' columns side by side, ``ranks`` wide
    each; clients of smaller rank are padded with zero columns (which add exact zeros), so a band
    of every client's pieces is one batched product.
    """

    def __init__(self, lt_b: torch.Tensor, lt_a: torch.Tensor, ranks: Sequence[int]) -> None:
        count, r = len(ranks), max(ranks)
        if len(set(ranks)) == 1:
            self.b = lt_b.reshape(lt_b.shape[0], count, r).permute(1, 0, 2)  # (K, p_b, r)
            self.a = lt_a.reshape(lt_a.shape[0], count, r).permute(1, 2, 0)  # (K, r, p_a)
            return
        self.b = lt_b.new_zeros(count, lt_b.shape[0], r)
        self.a = lt_a.new_zeros(count, r, lt_a.shape[0])
        start = 0
        for j, width in enumerate(ranks):
            self.b[j, :, :width] = lt_b[:, start : start + width]
            self.a[j, :width] = lt_a[:, start : start + width].T
            start += width

    def band(self, clients: torch.Tensor, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of the pieces of the clients at positions ``clients``, flattened: (len(clients), band · p_a)."""
        return torch.bmm(self.b[clients, rows], self.a[clients]).reshape(len(clients), -1)


def merge_module_svd(
    factors: Sequence[Factors | None], weights: torch.Tensor, rank: int, *, solver: str = "auto"
) -> list[Combined | None]:
    """Every client's truncated-SVD merge of one module at once, in a basis shared by all of them.

    All merges M_i = B diag(w_i) A live in the span of the same stacked factors B (out, n) and
    A (n, in): with B = Q_B L_Bᵀ and Aᵀ = Q_A L_Aᵀ (one QR per side for all clients, or the identity
    for a side narrower than n), M_i = Q_B C_i Q_Aᵀ with the small core C_i = L_Bᵀ diag(w_i) L_A.
    The cores are P @ (per-client pieces), so top-k sparse rows cost only their non-zero terms, and
    only each core's top singular triplets are computed.

    Args:
        factors: per client ``(scale · B, A)`` in float64, or None where it does not target the module.
        weights: (K_out, K) weight rows.
        rank: requested rank R.
        solver: ``exact`` (full SVD of each core), ``randomized`` (subspace iteration), or ``auto``:
            exact when a core is small, randomized otherwise.

    Returns:
        Per output client its ``Combined`` (rank ``output_rank``), None when nothing contributes.
    """
    present = [j for j, f in enumerate(factors) if f is not None]
    ranks = [None if f is None else f[1].shape[0] for f in factors]
    results: list[Combined | None] = [None] * weights.shape[0]
    if not present:
        return results
    out_dim, in_dim = factors[present[0]][0].shape[0], factors[present[0]][1].shape[1]
    b = torch.cat([factors[j][0] for j in present], dim=1)
    a = torch.cat([factors[j][1] for j in present], dim=0)
    left, right = stack_basis(b), stack_basis(a.T)
    p_b, p_a = left.lt.shape[0], right.lt.shape[0]
    w = weights[:, present].to(dtype=torch.float64, device=b.device)
    keeps = [output_rank("svd", ranks, weights[i], rank, (out_dim, in_dim)) for i in range(weights.shape[0])]
    wanted = [i for i, keep in enumerate(keeps) if keep > 0]
    pieces = ClientPieces(left.lt, right.lt, [ranks[j] for j in present])
    chunk = max(1, CORE_ELEMENTS // (p_b * p_a))
    for first in range(0, len(wanted), chunk):
        clients = wanted[first : first + chunk]
        rows = w[clients]
        used = (rows != 0).any(dim=0).nonzero().flatten()
        # Cores band by band of rows, each one product over every contributing client: a long inner
        # dimension keeps the product compute-bound (short blocks of clients made it memory-bound).
        band = max(1, PIECE_ELEMENTS // (len(used) * p_a))
        cores = torch.empty(len(clients), p_b, p_a, dtype=torch.float64, device=b.device)
        for top in range(0, p_b, band):
            span = slice(top, min(p_b, top + band))
            cores[:, span] = (rows[:, used] @ pieces.band(used, span)).reshape(len(clients), -1, p_a)
        keep = max(keeps[i] for i in clients)
        mode = solver if solver != "auto" else ("exact" if min(p_b, p_a) <= 4 * (keep + OVERSAMPLE) else "randomized")
        u, sigma, vt = top_singular(cores, min(keep, p_b, p_a), solver=mode)
        total = cores.square().sum(dim=(1, 2))
        root = sigma.clamp(min=0).sqrt()
        # One product per side for the whole chunk: Q_B (U √σ) and Q_A (V √σ), clients side by side.
        width = u.shape[2]
        new_bs = left.apply((u * root[:, None, :]).permute(1, 0, 2).reshape(p_b, -1)).reshape(
            out_dim, len(clients), width
        )
        new_as = right.apply((vt * root[:, :, None]).permute(2, 0, 1).reshape(p_a, -1)).reshape(
            in_dim, len(clients), width
        )
        for c, i in enumerate(clients):
            k_i = min(keeps[i], width)
            new_b = new_bs[:, c, :k_i]
            new_a = new_as[:, c, :k_i].T
            if k_i < keeps[i]:  # the stack's span is narrower than the planned rank: zero columns
                new_b = torch.cat([new_b, new_b.new_zeros(out_dim, keeps[i] - k_i)], dim=1)
                new_a = torch.cat([new_a, new_a.new_zeros(keeps[i] - k_i, in_dim)], dim=0)
            t = float(total[c])
            energy = float(sigma[c, :k_i].square().sum()) / t if t > 0 else 1.0
            results[i] = Combined(new_b, new_a, min(energy, 1.0))
    return results


def svd_costs(
    ranks: Sequence[int | None], weights: torch.Tensor, rank: int, shape: tuple[int, int]
) -> dict[str, float]:
    """Estimated flops of the two exact svd paths at one module (``shared`` basis, ``per-client`` QR).

    per-client: for each client, QR of U (out, n_i) and Vᵀ (in, n_i) and an SVD of the core, with
    n_i the stacked rank of the clients it gives weight to. shared: one basis per side (Gram and
    Cholesky while n < dim), the per-client pieces and cores P @ pieces, and a top-R solve per core.
    """
    out_dim, in_dim = shape
    present = [r for r in ranks if r is not None]
    n = sum(present)
    mask = torch.tensor([r is not None for r in ranks])
    width = torch.tensor([r or 0 for r in ranks], dtype=torch.float64)
    nonzero = (weights[:, mask] != 0).to(torch.float64)
    n_i = (weights != 0).to(torch.float64) @ width
    low_i = torch.minimum(n_i, torch.tensor(float(min(out_dim, in_dim))))
    per_client = float((2 * n_i * low_i * (out_dim + in_dim) + 10 * low_i**3).sum())
    p_b, p_a = min(n, out_dim), min(n, in_dim)
    basis = sum(2 * n * n * dim + n**3 for dim in shape if n < dim)
    k = weights.shape[0]
    chunk = max(1, CORE_ELEMENTS // (p_b * p_a))
    passes = -(-k // chunk)
    pieces = passes * n * 2 * p_b * p_a  # every client's r_j × (p_b × p_a) piece, once per pass
    cores = 2 * float(nonzero.sum()) * p_b * p_a
    keep = min(rank, p_b, p_a)
    solve = k * 2 * p_b * p_a * (keep + OVERSAMPLE) * (2 * POWER_ITERATIONS + 2)
    return {"shared": basis + pieces + cores + solve, "per-client": per_client}


def merge_module(
    mode: str,
    factors: Sequence[Factors | None],
    weights: torch.Tensor,
    rank: int,
    *,
    path: str = "auto",
    solver: str = "auto",
) -> list[Combined | None]:
    """Every client's merge of one module.

    ``svd`` takes the cheaper exact path by ``svd_costs`` (or ``path``: ``shared`` or ``per-client``);
    ``cat`` and ``linear`` go row by row.
    """
    if mode == "svd":
        ranks = [None if f is None else f[1].shape[0] for f in factors]
        present = next((f for f in factors if f is not None), None)
        if present is None:
            return [None] * weights.shape[0]
        if path == "auto":
            costs = svd_costs(ranks, weights, rank, (present[0].shape[0], present[1].shape[1]))
            path = min(costs, key=costs.__getitem__)
        if path == "shared":
            return merge_module_svd(factors, weights, rank, solver=solver)
    combine = combiner(mode)
    return [combine(factors, weights[i], rank) for i in range(weights.shape[0])]


@dataclass(frozen=True)
class Combiner:
    """A combine mode and everything that depends on it.

    ``combine`` merges one client's row; ``stack_rank(contributing, present, rank, shape)`` is its
    output rank from the ranks of the clients with non-zero weight (and of every client with the
    module); ``dense_rank(rank, shape)`` the rank it writes a dense delta with (None: it cannot);
    ``uses_rank``: whether ``--rank`` applies; ``linear_in_weights``: whether its merge is
    Σ_j P_ij ΔW_j, so that scaling a weight scales that client's contribution (``--clip-norm``).
    """

    combine: Callable[[Sequence[Factors | None], torch.Tensor, int], Combined | None]
    stack_rank: Callable[[list[int], list[int], int, tuple[int, int]], int]
    dense_rank: Callable[[int, tuple[int, int]], int] | None
    uses_rank: bool
    linear_in_weights: bool = True


COMBINERS: dict[str, Combiner] = {
    "svd": Combiner(
        combine_svd,
        stack_rank=lambda contributing, present, rank, shape: min(rank, sum(contributing), *shape),  # 0: none
        dense_rank=lambda rank, shape: min(rank, *shape),
        uses_rank=True,
    ),
    "cat": Combiner(
        combine_cat,
        stack_rank=lambda contributing, present, rank, shape: sum(contributing),
        dense_rank=lambda rank, shape: min(shape),  # full rank: exact
        uses_rank=False,
    ),
    "linear": Combiner(
        combine_linear,
        stack_rank=lambda contributing, present, rank, shape: present[0],  # zero weights give zero factors
        dense_rank=None,
        uses_rank=False,
        linear_in_weights=False,  # (Σ P B)(Σ P A): a weight enters twice
    ),
}


# The mode a merge uses unless told otherwise: the exact merge truncated to the largest input rank.
DEFAULT_COMBINE = "svd"


def registered(name: str) -> Combiner:
    """The registered combine mode called ``name``."""
    if name not in COMBINERS:
        raise UsageError(f"unknown combine mode {name!r}; choose one of {', '.join(COMBINERS)}")
    return COMBINERS[name]


def combiner(name: str) -> Callable[[Sequence[Factors | None], torch.Tensor, int], Combined | None]:
    """The combine function of the registered mode ``name``."""
    return registered(name).combine
