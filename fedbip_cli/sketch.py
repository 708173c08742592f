"""Sketched cosine similarity for huge K: a seeded random sketch of every ΔW, compared by one Gram.

The exact engine costs O(K² r² (d + k)) per module; for thousands of clients that is hours. Here each
client's ΔW^m = s B A is reduced, from its factors and without forming d × k, to F = M² numbers
(``--sketch-dim M``) whose inner products estimate the Frobenius ones without bias::

    S_ℓ = Ψ_ℓᵀ (s B A) Ω_ℓ / M      for ℓ = 1 .. b²  (blocks of m × m, m = M / b)

Ψ (d × bM) and Ω (k × bM) have orthogonal columns of norm √d and √k (Haar, in chunks of d or k
columns), cut into b² groups of m columns; E[Ψ_ℓ Ψ_ℓᵀ] = m I, so E[<S(X), S(Y)>] = <X, Y>_F. With
b = 1 this is the plain two-sided M × M sketch; b² smaller blocks (b the largest divisor of M up to
4) cut the error for correlated pairs to that of M² independent rank-one Gaussian projections at a
twentieth of their cost (``benchmarks/sketch_error.py`` measures the alternatives). For M ≥ min(d, k)
one block is used, and with M = d = k it is exact. Cost per client and module: O(r (d + k) bM + r M²).

Ψ and Ω depend only on (seed, module name, shape, M): any client, in any run, with any other clients,
gets the same sketch. Sketches are quantized per client and module to int8 (scale max|x| / 127) and
their Gram is computed in integers, which is exact and so independent of the order, number and
tiling of the clients: entry (i, j) is the same bits whatever else is computed. Each group's Gram is
the float64 sum over its modules of s_i s_j <q_i, q_j>, filled by row tiles (one K × K float64 per
group, none per module), then normalised by ``cosine_from_inner``. The norms reported are exact
(from the factors), not sketched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fedbip_cli.adapters import Adapter, FactorReader, read_module
from fedbip_cli.defaults import DEFAULT_DIM, MAX_DIM, SIMILARITY_METHODS
from fedbip_cli.errors import AdapterError, UsageError
from fedbip_cli.similarity import GroupSimilarity, SimilarityResult, cosine_from_inner

# Names the sketch in the seeds of its projections: change it when the projections change.
ENGINE = "fedbip-sketch-v1"
METHODS = SIMILARITY_METHODS
MAX_BLOCKS = 4  # blocks per side: b² blocks in all
LEVELS = 127  # int8 codes -127 .. 127
INT_CHUNK = 1 << 17  # features per integer product: 127² · 2¹⁷ < 2³¹, no int32 overflow
ROW_TILE = 1024  # Gram rows computed at once: a tile is ROW_TILE × K
CLIENT_BATCH = 64  # clients sketched at once: their features stay in the core's cache


@dataclass(frozen=True)
class SimilarityMethod:
    """How the similarity is computed: ``exact`` (factor space) or ``sketch`` (dimension, seed)."""

    name: str = "exact"
    dim: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise UsageError(f"unknown similarity method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.name == "exact":
            given = [
                option
                for option, value in (("--sketch-dim", self.dim), ("--sketch-seed", self.seed))
                if value is not None
            ]
            if given:
                raise UsageError(
                    f"{' and '.join(given)} apply to --similarity sketch", hint="add --similarity sketch, or drop them"
                )
            return
        if self.dim is not None and (
            isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= MAX_DIM
        ):
            raise UsageError(
                f"sketch dimension {self.dim!r} must be an integer from 1 to {MAX_DIM}",
                hint=f"each module is sketched to M x M numbers; the default M = {DEFAULT_DIM} kept whole-model cosines within 0.02 (README, 'Huge K')",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise UsageError(f"sketch seed {self.seed!r} must be an integer from 0 to 2^63 - 1")

    @property
    def sketch_dim(self) -> int:
        return DEFAULT_DIM if self.dim is None else self.dim

    @property
    def sketch_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    def as_dict(self) -> dict[str, Any]:
        """``{"method": "exact"}`` or ``{"method": "sketch", "dim": M, "seed": S}``, defaults filled in."""
        if self.name == "exact":
            return {"method": "exact"}
        return {"method": "sketch", "dim": self.sketch_dim, "seed": self.sketch_seed}


@dataclass(frozen=True)
class Projection:
    """The seeded maps of one module: ``blocks`` (b² in all) of ``Ψ_ℓᵀ ΔW Ω_ℓ``, each m × m."""

    psi: torch.Tensor  # (d, b·M) float64
    omega: torch.Tensor  # (k, b·M) float64
    dim: int  # M
    blocks: int  # b: blocks per side


def blocks_per_side(dim: int, out_features: int, in_features: int) -> int:
    """b: the largest divisor of ``dim`` up to ``MAX_BLOCKS``; 1 when M ≥ min(d, k), where one block is exact."""
    if dim >= min(out_features, in_features):
        return 1
    return max(b for b in range(1, MAX_BLOCKS + 1) if dim % b == 0)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread.

    LAPACK's QR of a few hundred columns synchronises its threads at every column: on 2 cores of
    which another process holds one, a 384 × 384 QR took 0.6 s on 2 threads and 8 ms on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def orthogonal_columns(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(n, count) float64: Haar-orthogonal columns of norm √n, in independent chunks of n columns.

    Each column c has E[c cᵀ] = I. QR of a Gaussian matrix with R's diagonal made positive.
    """
    chunks = []
    with one_thread():
        for start in range(0, count, n):
            width = min(n, count - start)
            q, r = torch.linalg.qr(torch.randn(n, width, generator=generator, dtype=torch.float64))
            chunks.append(q * torch.where(r.diagonal() < 0, -1.0, 1.0))
    return torch.cat(chunks, dim=1) * math.sqrt(n)


def projection_seed(seed: int, module: str, out_features: int, in_features: int, dim: int) -> int:
    """A 63-bit generator seed from (seed, module, shape, M): the same in any run and for any client."""
    text = f"{ENGINE}|{seed}|{module}|{out_features}x{in_features}|{dim}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def projection(seed: int, module: str, out_features: int, in_features: int, dim: int) -> Projection:
    """The projections Ψ, Ω of ``module`` (ΔW of shape (out_features, in_features)) for sketch dimension ``dim``."""
    generator = torch.Generator().manual_seed(projection_seed(seed, module, out_features, in_features, dim))
    b = blocks_per_side(dim, out_features, in_features)
    psi = orthogonal_columns(out_features, b * dim, generator)
    omega = orthogonal_columns(in_features, b * dim, generator)
    return Projection(psi, omega, dim, b)


def sketch_factors(b: torch.Tensor, a: torch.Tensor, proj: Projection) -> torch.Tensor:
    """Sketches of ΔW_i = B_i A_i from stacked factors of one rank, in the factors' dtype.

    Args:
        b: (n, d, r) scaled B factors.
        a: (n, r, k) A factors.
        proj: the module's projections (on the factors' device).

    Returns:
        (n, M²): row i flattens the b² blocks ``Ψ_ℓᵀ B_i A_i Ω_ℓ / M``, so that
        ``<row_i, row_j>`` estimates ``<B_i A_i, B_j A_j>_F`` without bias.
    """
    n, d, r = b.shape
    count, m = proj.blocks**2, proj.dim // proj.blocks
    # One product over all clients' factor rows each side: (n·r, d) @ (d, bM), then the blocks.
    left = (
        (b.transpose(1, 2).reshape(n * r, d) @ proj.psi.to(b.dtype)).reshape(n, r, count, m).permute(0, 2, 3, 1)
    )  # Ψ_ℓᵀ B
    right = (
        (a.reshape(n * r, -1) @ (proj.omega.to(a.dtype) / proj.dim)).reshape(n, r, count, m).transpose(1, 2)
    )  # A Ω_ℓ / M
    return (left @ right).reshape(n, -1)


def quantize(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes and float64 scales: ``features ≈ scale[:, None] * codes``.

    A row's scale is max|x| / 127 (0 for a zero row, whose codes are 0). Rounding to the nearest
    code keeps |x / scale| ≤ 127, so no clamp is needed.
    """
    low, high = torch.aminmax(features, dim=1)
    peak = torch.maximum(high, -low).to(torch.float64)
    inverse = torch.where(peak > 0, LEVELS / peak, torch.zeros_like(peak))
    codes = (features * inverse[:, None].to(features.dtype)).round_().to(torch.int8)
    return codes, peak / LEVELS


def integer_products(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ yᵀ`` of int8 codes, exactly, as float64 (integers well below 2⁵³).

    int8 products in int32 (``torch._int_mm``) on the CPU, chunked so no sum can overflow; elsewhere,
    or without ``_int_mm``, a float64 product, which is exact too. Either way the result does not
    depend on how the rows are tiled or ordered.
    """
    if x.device.type != "cpu" or not hasattr(torch, "_int_mm"):
        return x.to(torch.float64) @ y.to(torch.float64).T
    total = None
    for start in range(0, x.shape[1], INT_CHUNK):
        part = torch._int_mm(x[:, start : start + INT_CHUNK].contiguous(), y[:, start : start + INT_CHUNK].T).to(
            torch.float64
        )
        total = part if total is None else total.add_(part)
    return total if total is not None else torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)


def accumulate_gram(gram: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, tile: int = ROW_TILE) -> None:
    """Add ``diag(scale) codes codesᵀ diag(scale)`` to the upper triangle (and diagonal) of ``gram``.

    Row tiles of ``tile`` rows: memory beyond ``gram`` is one tile × K. Entry (i, j) adds
    ``<q_i, q_j> · (scale_i · scale_j)``, the same bits for (j, i) and whatever the tiles; the lower
    triangle is left for ``mirror_upper``.
    """
    for start in range(0, codes.shape[0], tile):
        stop = min(start + tile, codes.shape[0])
        products = integer_products(codes[start:stop], codes[start:])
        gram[start:stop, start:].addcmul_(products, scale[start:stop, None] * scale[None, start:])


def mirror_upper(gram: torch.Tensor, *, tile: int = ROW_TILE) -> None:
    """Copy the upper triangle of ``gram`` onto the lower one, in place, by tiles."""
    for start in range(0, gram.shape[0], tile):
        stop = min(start + tile, gram.shape[0])
        gram[stop:, start:stop] = gram[start:stop, stop:].T
        block = gram[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)


@dataclass
class ModuleSketch:
    """One module's sketches of every client: int8 codes, their scales, and the exact squared norms."""

    codes: torch.Tensor  # (K, M²) int8
    scale: torch.Tensor  # (K,) float64
    norms2: torch.Tensor  # (K,) float64: ||ΔW_i||²_F, exact


def module_shape(adapters: Sequence[Adapter], module: str) -> tuple[int, int]:
    """(out_features, in_features) of ``module`` from the first adapter that targets it."""
    spec = next(a.modules[module] for a in adapters if module in a.modules)
    return spec.out_features, spec.in_features


def sketch_module(
    adapters: Sequence[Adapter],
    module: str,
    method: SimilarityMethod,
    *,
    device: torch.device | str = "cpu",
    reader: FactorReader | None = None,
    batch: int = CLIENT_BATCH,
) -> ModuleSketch:
    """Read ``module``'s factors of every client (``batch`` clients at a time) and sketch them.

    A client without the module has a zero sketch and norm. Clients are stacked by rank, so mixed
    ranks need no padding. Sketches are computed in float32 (their int8 codes keep 8 bits), the
    exact norms in float64. ``reader`` serves the factors (one per pass over the modules).
    """
    reader = reader or FactorReader()
    out_features, in_features = module_shape(adapters, module)
    full = projection(method.sketch_seed, module, out_features, in_features, method.sketch_dim)
    proj = Projection(full.psi.to(device, torch.float32), full.omega.to(device, torch.float32), full.dim, full.blocks)
    count = len(adapters)
    codes = torch.zeros(count, method.sketch_dim**2, dtype=torch.int8, device=device)
    scale = torch.zeros(count, dtype=torch.float64, device=device)
    norms2 = torch.zeros(count, dtype=torch.float64, device=device)
    # Each operation below is small: a second thread costs more in synchronisation than it saves,
    # and far more when another process holds a core (measured: 3x slower on 2 shared cores).
    with one_thread():
        for first in range(0, count, batch):
            by_rank: dict[int, list[int]] = {}
            stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            last = min(first + batch, count)
            for i, pair in zip(range(first, last), read_module(adapters[first:last], module, reader)):
                if pair is not None:
                    stored[i] = pair
                    by_rank.setdefault(pair[1].shape[0], []).append(i)
            for index in by_rank.values():
                b, a = stack_factors(adapters, module, index, stored, device)
                rows = torch.tensor(index, device=device)
                codes[rows], scale[rows] = quantize(sketch_factors(b.float(), a.float(), proj))
                norms2[rows] = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
    return ModuleSketch(codes, scale, norms2)


def stack_factors(
    adapters: Sequence[Adapter],
    module: str,
    index: list[int],
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clients' ``(scale · B, A)`` of one rank stacked, in float64 on ``device`` (``stored``
    as ``adapters.read_module`` returned them: checked for NaN and Inf)."""
    b = torch.stack([stored[i][0] for i in index])
    a = torch.stack([stored[i][1] for i in index])
    factor_scale = torch.tensor([adapters[i].modules[module].scale for i in index], dtype=torch.float64, device=device)
    return b.to(device, torch.float64) * factor_scale[:, None, None], a.to(device, torch.float64)


def sketch_similarity(
    adapters: Sequence[Adapter],
    granularity: str,
    groups: dict[str, list[str]],
    method: SimilarityMethod,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    dense: Callable[[str], torch.Tensor] | None = None,
    dense_parts: Collection[str] = (),
) -> SimilarityResult:
    """Sketched cosine similarity of the clients' task vectors in every group.

    Groups are done one after another, each module read once; a group's float64 K × K Gram becomes
    its similarity in place: no other K × K is held but, for a dense part, its exact Gram while it is added.

    Args:
        adapters: the clients.
        granularity: recorded in the result.
        groups: group name -> its parts (``taskvec.group_modules``).
        method: a ``sketch`` method (dimension and seed).
        device: where sketches and Grams are computed.
        progress: called with 1 after each part.
        dense: the exact (K, K) float64 Gram of a dense part (saved module, DoRA, bias), which is not
            sketched: its inner products are added exactly to the group's sketched ones.
        dense_parts: the parts that ``dense`` computes; every other part is a LoRA module, sketched.

    Raises:
        AdapterError: a client's whole task vector is zero (its similarity is undefined).
    """
    count = len(adapters)
    results: dict[str, GroupSimilarity] = {}
    total_norms2 = torch.zeros(count, dtype=torch.float64)
    reader = FactorReader()
    for name, members in groups.items():
        gram = torch.zeros(count, count, dtype=torch.float64, device=device)
        norms2 = torch.zeros(count, dtype=torch.float64)
        for module in members:
            if module in dense_parts and dense is not None:
                exact = dense(module)
                gram += exact.to(gram.device)
                norms2 += exact.diagonal().cpu()
                del exact
            else:
                sketch = sketch_module(adapters, module, method, device=device, reader=reader)
                accumulate_gram(gram, sketch.codes, sketch.scale)
                norms2 += sketch.norms2.cpu()
                del sketch
            if progress is not None:
                progress(1)
        mirror_upper(gram)
        cosine, _ = cosine_from_inner(gram, in_place=True)
        results[name] = GroupSimilarity(name, list(members), cosine.cpu(), norms2.sqrt())
        total_norms2 += norms2
    zero = [a.name for a, value in zip(adapters, total_norms2.tolist()) if value <= 0]
    if zero:
        raise AdapterError(
            f"task vector is zero (every lora_B or lora_A is 0): {', '.join(zero)}",
            where=zero[0],
            hint="an untrained adapter (peft initialises lora_B to zero) carries no task; drop it or train it",
        )
    return SimilarityResult([a.name for a in adapters], granularity, results, method.as_dict())
