"""The engine's fast paths against dense float64 references written here.

Exact stacked Grams (``gram``): equal to the dense inner products, and the same bits whatever the
other clients, their order or the tiling. Module merges: the shared-basis path (exact and randomized
top-R solvers, Cholesky and Householder bases, identity basis for wide stacks) and the per-client
path against the dense best rank-R approximation, and against each other. The streaming writer
against ``safetensors``' own reader. Top-k rows against the cost model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedbip_cli import gram, merge
from fedbip_cli.adapters import StreamingAdapterWriter, lora_entries


def planted_factors(
    count: int,
    out_dim: int,
    in_dim: int,
    ranks: list[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    clusters: int = 3,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stored (B, A) per client: a cluster centre plus noise, in ``dtype`` like community adapters."""
    g = torch.Generator().manual_seed(seed)
    centres = [
        (torch.randn(out_dim, max(ranks), generator=g) * 0.02, torch.randn(max(ranks), in_dim, generator=g))
        for _ in range(clusters)
    ]
    out = []
    for u in range(count):
        r = ranks[u % len(ranks)]
        b, a = centres[u % clusters]
        b = b[:, :r] + 0.3 * torch.randn(out_dim, r, generator=g) * 0.02
        a = a[:r] + 0.3 * torch.randn(r, in_dim, generator=g)
        out.append((b.to(dtype), a.to(dtype)))
    return out


def dense_inner(factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float]) -> torch.Tensor:
    deltas = torch.stack([s * b.double() @ a.double() for (b, a), s in zip(factors, scales)]).flatten(1)
    return deltas @ deltas.T


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_gram_matches_dense_inner_products(dtype: torch.dtype) -> None:
    factors = planted_factors(9, 40, 24, [2, 3, 5], dtype=dtype)
    scales = [2.0 / (1 + u % 3) for u in range(9)]
    got = gram.all_products(gram.stack_factors(factors, scales))
    ref = dense_inner(factors, scales)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert not torch.equal(got, torch.zeros_like(got))


def test_exact_gram_bits_do_not_depend_on_other_clients_order_or_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    factors = planted_factors(12, 64, 48, [2, 4, 3], dtype=torch.float32)
    scales = [0.5 + u / 7 for u in range(12)]
    full = gram.all_products(gram.stack_factors(factors, scales))
    subset = [9, 2, 5, 11]
    alone = gram.all_products(gram.stack_factors([factors[u] for u in subset], [scales[u] for u in subset]))
    assert torch.equal(alone, full[subset][:, subset])
    assert torch.equal(full, full.T)
    rows = gram.rows_products(gram.stack_factors(factors, scales), [3, 4, 10])
    assert torch.equal(rows, full[[3, 4, 10]])
    monkeypatch.setattr(gram, "TILE_ELEMENTS", 50)
    assert gram.row_tile(gram.stack_factors(factors, scales)) == 1
    assert torch.equal(gram.all_products(gram.stack_factors(factors, scales)), full)


def test_split_columns_is_exact_for_half_precision() -> None:
    x = planted_factors(1, 300, 4, [6], dtype=torch.float16)[0][0].double()
    split = gram.split_columns(x)
    assert split.lo is None  # float16: kept as its few non-zeros
    lo = torch.zeros_like(x).index_put_((split.lo_rows, split.lo_columns), split.lo_values)
    assert torch.equal(split.hi + lo, x)
    bits = gram.slice_bits(x.shape[0])
    unit = torch.ldexp(torch.ones(x.shape[1], dtype=torch.float64), torch.frexp(x.abs().amax(0))[1] - bits)
    assert torch.equal(torch.round(split.hi / unit), split.hi / unit)
    assert float((split.hi / unit).abs().max()) <= 2.0**bits


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse_and_dense_low_slices_give_the_same_bits(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    factors = planted_factors(11, 200, 72, [3, 5, 4], dtype=dtype)
    scales = [0.25 + u / 5 for u in range(11)]
    monkeypatch.setattr(gram, "SPARSE_LO", 0.0)  # always dense
    dense = gram.all_products(gram.stack_factors(factors, scales))
    assert gram.stack_factors(factors, scales).b.lo is not None
    monkeypatch.setattr(gram, "SPARSE_LO", 2.0)  # always sparse
    sparse_stack = gram.stack_factors(factors, scales)
    assert sparse_stack.b.lo is None and sparse_stack.a.lo is None
    sparse = gram.all_products(sparse_stack)
    monkeypatch.setattr(gram, "TILE_ELEMENTS", 40)  # tiles slice the sparse columns too
    tiled = gram.all_products(gram.stack_factors(factors, scales))
    assert torch.equal(dense, sparse) and torch.equal(dense, tiled)
    assert torch.equal(gram.rows_products(sparse_stack, [0, 6, 7]), dense[[0, 6, 7]])
    ref = dense_inner(factors, scales)
    assert torch.allclose(dense, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def merge_cases() -> dict[str, tuple[list, torch.Tensor, int]]:
    """Name -> (scaled float64 factors with None for missing modules, weight rows, rank)."""
    g = torch.Generator().manual_seed(1)
    k = 10
    rows = torch.rand(k, k, generator=g, dtype=torch.float64)
    rows[rows < 0.4] = 0.0
    rows.fill_diagonal_(1.0)
    rows /= rows.sum(1, keepdim=True)

    def scaled(fs: list) -> list:
        return [None if f is None else (1.5 * f[0].double(), f[1].double()) for f in fs]

    narrow = scaled(planted_factors(k, 96, 80, [2, 3, 4]))
    wide = scaled(planted_factors(k, 12, 16, [3, 4]))  # stacked rank > width: identity basis
    duplicates = list(narrow)
    duplicates[1] = duplicates[0]  # a rank-deficient stack: Householder QR instead of Cholesky
    missing = list(narrow)
    missing[3] = missing[7] = None
    # Equal ranks: the pieces of the cores come from one batched product instead of one per client.
    equal = scaled(planted_factors(k, 96, 80, [4]))
    equal_missing = list(equal)
    equal_missing[0] = equal_missing[5] = None
    wide_equal = scaled(planted_factors(k, 12, 16, [3]))
    return {
        "narrow": (narrow, rows, 4),
        "wide": (wide, rows, 5),
        "duplicates": (duplicates, rows, 4),
        "missing": (missing, rows, 3),
        "equal": (equal, rows, 5),
        "equal-missing": (equal_missing, rows, 4),
        "wide-equal": (wide_equal, rows, 4),
    }


def dense_best(factors: list, row: torch.Tensor, keep: int) -> tuple[torch.Tensor, float]:
    """The best rank-``keep`` approximation of Σ_j w_j ΔW_j by a dense float64 SVD, and its energy."""
    total = sum(float(w) * f[0] @ f[1] for f, w in zip(factors, row) if f is not None and w != 0)
    u, s, vt = torch.linalg.svd(total)
    return (u[:, :keep] * s[:keep]) @ vt[:keep], float((s[:keep] ** 2).sum() / (s**2).sum())


@pytest.mark.parametrize("case", ["narrow", "wide", "duplicates", "missing", "equal", "equal-missing", "wide-equal"])
@pytest.mark.parametrize("path,solver", [("shared", "exact"), ("shared", "randomized"), ("per-client", "auto")])
def test_module_merge_paths_match_the_dense_truncated_svd(case: str, path: str, solver: str) -> None:
    factors, rows, rank = merge_cases()[case]
    results = merge.merge_module("svd", factors, rows, rank, path=path, solver=solver)
    first = next(f for f in factors if f is not None)
    shape = (first[0].shape[0], first[1].shape[1])
    ranks = [None if f is None else f[1].shape[0] for f in factors]
    for i, result in enumerate(results):
        keep = merge.output_rank("svd", ranks, rows[i], rank, shape)
        assert result.a.shape == (keep, shape[1]) and result.b.shape == (shape[0], keep)
        best, energy = dense_best(factors, rows[i], keep)
        # The randomized solver converges on these planted spectra; exact paths are at rounding level.
        tolerance = 1e-6 if solver == "randomized" else 1e-11
        assert float((result.b @ result.a - best).norm() / best.norm()) < tolerance, i
        assert abs(result.energy - energy) < tolerance


def test_randomized_solver_is_close_on_a_flat_spectrum_and_reports_the_energy_it_keeps() -> None:
    g = torch.Generator().manual_seed(5)
    factors = [
        ((torch.randn(120, 6, generator=g)).double(), torch.randn(6, 100, generator=g).double()) for _ in range(8)
    ]
    rows = torch.full((8, 8), 1 / 8, dtype=torch.float64)
    results = merge.merge_module("svd", factors, rows, 4, path="shared", solver="randomized")
    for i, result in enumerate(results):
        best, energy = dense_best(factors, rows[i], 4)
        total = sum(w * f[0] @ f[1] for f, w in zip(factors, rows[i].tolist()))
        kept = float((result.b @ result.a).square().sum() / total.square().sum())
        assert result.energy == pytest.approx(kept, rel=1e-9)  # the energy the output really keeps
        assert energy - 1e-3 < result.energy <= energy + 1e-12


def test_stack_basis_falls_back_to_householder_for_rank_deficient_stacks() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert merge.stack_basis(x).r is not None  # well conditioned: Cholesky QR
    deficient = torch.cat([x, x[:, :2]], dim=1)
    basis = merge.stack_basis(deficient)
    assert basis.q is not None
    assert torch.allclose(basis.apply(basis.lt), deficient, atol=1e-12)
    assert merge.stack_basis(torch.randn(5, 8, generator=g, dtype=torch.float64)).lt.shape == (5, 8)  # identity


def test_auto_path_choice_follows_the_cost_model_and_top_k_cuts_it() -> None:
    ranks = [8] * 200
    dense_rows = torch.full((200, 200), 1 / 200, dtype=torch.float64)
    sparse_rows = torch.zeros(200, 200, dtype=torch.float64)
    for i in range(200):
        sparse_rows[i, [(i + d) % 200 for d in range(5)]] = 0.2
    full = merge.svd_costs(ranks, dense_rows, 8, (384, 384))
    sparse = merge.svd_costs(ranks, sparse_rows, 8, (384, 384))
    assert sparse["per-client"] < full["per-client"] / 20
    assert sparse["shared"] < full["shared"]
    wide = merge.svd_costs([16] * 32, torch.full((32, 32), 1 / 32, dtype=torch.float64), 16, (4096, 4096))
    assert wide["shared"] < wide["per-client"] / 10


def test_auto_path_gives_the_same_merge_as_both_explicit_paths() -> None:
    factors, rows, rank = merge_cases()["narrow"]
    auto = merge.merge_module("svd", factors, rows, rank)
    for path in ("shared", "per-client"):
        other = merge.merge_module("svd", factors, rows, rank, path=path, solver="exact")
        for x, y in zip(auto, other):
            assert torch.allclose(x.b @ x.a, y.b @ y.a, rtol=0, atol=1e-10 * float((y.b @ y.a).abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_streaming_writer_output_loads_as_the_tensors_written(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"layer.0.q": (6, 5), "layer.0.v": (6, 5), "layer.1.q": (7, 3)}
    ranks = {"layer.0.q": 2, "layer.0.v": 3, "layer.1.q": 1}
    written = {
        m: (torch.randn(shapes[m][0], r, generator=g), torch.randn(r, shapes[m][1], generator=g))
        for m, r in ranks.items()
    }
    writer = StreamingAdapterWriter(tmp_path / "adapter_model.safetensors", lora_entries(ranks, shapes), dtype)
    for module, (b, a) in written.items():
        writer.write(module, b, a)
    digest = writer.close()
    loaded = load_file(tmp_path / "adapter_model.safetensors")
    assert len(loaded) == 2 * len(ranks)
    for module, (b, a) in written.items():
        assert torch.equal(loaded[f"base_model.model.{module}.lora_B.weight"], b.to(dtype))
        assert torch.equal(loaded[f"base_model.model.{module}.lora_A.weight"], a.to(dtype))
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_streaming_writer_refuses_out_of_order_or_missing_tensors(tmp_path: Path) -> None:
    writer = StreamingAdapterWriter(
        tmp_path / "w.safetensors", lora_entries({"a": 1, "b": 1}, {"a": (2, 2), "b": (2, 2)}), torch.float32
    )
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("b", torch.zeros(2, 1), torch.zeros(1, 2))
    writer.write("a", torch.zeros(2, 1), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="not written"):
        writer.close()


@pytest.mark.parametrize("case", ["narrow", "equal"])
def test_chunked_cores_and_pieces_give_the_same_merge(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    factors, rows, rank = merge_cases()[case]
    whole = merge.merge_module("svd", factors, rows, rank, path="shared", solver="exact")
    first = next(f for f in factors if f is not None)
    n = sum(f[1].shape[0] for f in factors if f is not None)
    area = min(n, first[0].shape[0]) * min(n, first[1].shape[1])  # one core: p_b × p_a
    # Three clients' cores per chunk, and bands of a few rows of the pieces: several passes of each.
    monkeypatch.setattr(merge, "CORE_ELEMENTS", 3 * area)
    monkeypatch.setattr(merge, "PIECE_ELEMENTS", 2 * area)
    chunked = merge.merge_module("svd", factors, rows, rank, path="shared", solver="exact")
    for a, b in zip(whole, chunked):
        assert torch.allclose(a.b @ a.a, b.b @ b.a, rtol=1e-12, atol=1e-14)
        assert a.energy == pytest.approx(b.energy, abs=1e-13)
