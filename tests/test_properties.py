"""Properties of the core maths that plausible one-token bugs (mutants) used to get past the suite.

Each test pins one property against a value computed here by hand or with a dense float64
reference: a merge with negative weights (``--negative keep``) on every combine path, a weight row
that sums to exactly zero, the 2⁵³ budget of the exact Grams, softmax weights at a similarity of
exactly 0, peft's default ``lora_alpha``, neighbour lists past the partition threshold, cluster
suggestions for three clients, and the outlier report's mean similarity. Pure functions only, so
that ``make mutate`` (which runs this file first against every mutant) starts fast; the properties
that need files are in test_engine.py (``--negative keep`` merges, ``lora_alpha``), test_cli.py (a
client with its negated copy) and test_kinds.py (embedding LoRA beside a saved embedding).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fedbip_cli import similarity as similarity_module
from fedbip_cli.clustering import nearest_neighbours, suggest_clusters
from fedbip_cli.defence import outliers
from fedbip_cli.errors import AdapterError, FedbipError, UsageError
from fedbip_cli.gram import slice_bits, split_columns
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.merge import merge_module, output_rank
from fedbip_cli.similarity import (
    cached_inner_products,
    cosine_from_inner,
    covering_rows,
    dense_inner_products,
    similarity_from_inner,
)
from fedbip_cli.taskvec import KeyedFactors
from fedbip_cli.weights import WeightOptions, personalized_weights

# --- negative weights reach every combine path ---------------------------------------------------

# Row 0 gives client 2 a negative weight, row 1 a zero weight to client 0; row 2 is all positive.
SIGNED_WEIGHTS = torch.tensor([[0.9, 0.5, -0.4], [0.0, 0.7, 0.3], [0.2, 0.3, 0.5]], dtype=torch.float64)


def signed_factors(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(s·B, A) of three clients at one (6, 5) module, ranks 2, 1 and 3."""
    return [
        (torch.randn(6, r, generator=gen, dtype=torch.float64), torch.randn(r, 5, generator=gen, dtype=torch.float64))
        for r in (2, 1, 3)
    ]


@pytest.mark.parametrize(
    ("mode", "path"), [("svd", "per-client"), ("svd", "shared"), ("cat", "auto")], ids=["svd-per-client", "svd", "cat"]
)
def test_negative_weights_are_merged_not_skipped(mode: str, path: str) -> None:
    """M_i = Σ_j P_ij B_j A_j with P_02 < 0: a path that skipped negative weights would be off by ~1 (relative)."""
    factors = signed_factors(torch.Generator().manual_seed(3))
    merged = merge_module(mode, factors, SIGNED_WEIGHTS, rank=64, path=path)
    for i, combined in enumerate(merged):
        want = sum(SIGNED_WEIGHTS[i, j] * (b @ a) for j, (b, a) in enumerate(factors))
        assert float((combined.b @ combined.a - want).norm()) <= 1e-12 * float(want.norm()), f"row {i}"
    skipped = sum(SIGNED_WEIGHTS[0, j] * (b @ a) for j, (b, a) in enumerate(factors) if SIGNED_WEIGHTS[0, j] > 0)
    assert float((skipped - merged[0].b @ merged[0].a).norm()) > 0.3 * float(skipped.norm())
    ranks = [a.shape[0] for _, a in factors]
    # cat stacks every client of non-zero weight, negative ones included: 2 + 1 + 3, then 1 + 3.
    expected = {"cat": [6, 4, 6], "svd": [5, 4, 5]}[mode]
    assert [output_rank(mode, ranks, SIGNED_WEIGHTS[i], 64, (6, 5)) for i in range(3)] == expected
    assert [c.a.shape[0] for c in merged] == expected


# --- a weight row that sums to exactly zero ------------------------------------------------------


def test_a_row_summing_to_zero_is_refused_not_infinite() -> None:
    """A client and its negated copy: S = [[1, −1], [−1, 1]] gives rows summing to 0 under ``keep``.

    Defined behaviour: a FedbipError naming the rows, never ±inf, NaN or 10¹⁶ weights, also when rounding
    leaves the sum at 2⁻⁵² instead of 0 (as the computed cosine of a negated copy does); ``clip`` and
    softmax stay defined (each client keeps itself; softmax weights e^1 : e^−1).
    """
    for off in (-1.0, -(1.0 - 2.0**-52)):
        s = torch.tensor([[1.0, off], [off, 1.0]], dtype=torch.float64)
        with pytest.raises(FedbipError, match=r"row\(s\) \[0, 1\] sum to .* unbounded"):
            personalized_weights(s, WeightOptions(negative="keep"))
    assert personalized_weights(s, WeightOptions()).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    soft = personalized_weights(s, WeightOptions(weighting="softmax", negative="keep"))
    first = math.e / (math.e + 1 / math.e)
    expected = torch.tensor([[first, 1 - first], [1 - first, first]], dtype=torch.float64)
    assert torch.allclose(soft, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize(("ratio", "refused"), [(0.5e-6, True), (2e-6, False)])
def test_the_row_sum_floor_is_a_millionth_of_the_absolute_sum(ratio: float, refused: bool) -> None:
    """Row 0 sums to ``ratio`` × its absolute sum (≈ 2): refused at or below 1e-6, weights ≈ ±1/ratio above."""
    off = -(1.0 - ratio * 2)
    s = torch.tensor([[1.0, off], [off, 1.0]], dtype=torch.float64)
    if refused:
        with pytest.raises(FedbipError, match="unbounded"):
            personalized_weights(s, WeightOptions(negative="keep"))
        return
    weights = personalized_weights(s, WeightOptions(negative="keep"))
    total = 1.0 + off
    assert weights.tolist() == [[1 / total, off / total], [off / total, 1 / total]]


def test_the_floor_is_taken_over_each_row_not_each_column() -> None:
    """With top-k the kept entries are not symmetric: row 0 keeps [1, a] (absolute sum ≈ 2), column 0 only its
    diagonal (1). Row 0 sums to 1.5e-6, at most 1e-6 of its row's absolute sum: refused."""
    a = -(1.0 - 1.5e-6)
    s = torch.tensor([[1.0, a, -1.0], [a, 1.0, 0.5], [-1.0, 0.5, 1.0]], dtype=torch.float64)
    with pytest.raises(FedbipError, match=r"row\(s\) \[0\]"):
        personalized_weights(s, WeightOptions(negative="keep", top_k=2))


def test_the_error_shows_the_first_refused_row() -> None:
    """Rows 0 and 1 are refused; the numbers shown are row 0's (sum 0 of absolute sum 2), not row 1's."""
    s = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 1.0, 1.0 + 1e-7], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(FedbipError, match=r"row\(s\) \[0, 1\] sum to 0 against an absolute sum of 2 "):
        personalized_weights(s, WeightOptions(negative="keep"))


def test_options_compare_by_value_and_stay_fixed() -> None:
    """A mode read from a file or the command line is an equal string, not the literal itself: it must
    still select clipping. Options are immutable values, and a temperature must be positive."""
    s = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    clip = "".join(["cl", "ip"])  # equal to "clip", another object
    assert clip == "clip" and clip is not "clip"  # noqa: F632
    for weighting in ("paper", "softmax"):
        weights = personalized_weights(s, WeightOptions(weighting=weighting, negative=clip))
        assert weights.tolist() == [[1.0, 0.0], [0.0, 1.0]], weighting
    options = WeightOptions()
    with pytest.raises(AttributeError):
        options.negative = "keep"  # type: ignore[misc]
    for temperature in (-1.0, 0.0, float("nan")):
        with pytest.raises(UsageError, match="temperature"):
            WeightOptions(weighting="softmax", temperature=temperature)


# --- the exact Grams' 2⁵³ budget -----------------------------------------------------------------

INNER_SIZES = [1, 2, 3, 4, 5, 100, 1024, 1025, 2047, 2048, 2049, 3000, 1 << 20, (1 << 20) + 1]


@pytest.mark.parametrize("inner", INNER_SIZES)
def test_slice_bits_is_the_largest_width_within_the_budget(inner: int) -> None:
    """β is the largest width whose cross products (2·inner terms of < 2^2β each) sum below 2⁵³."""
    bits = slice_bits(inner)
    assert 2 * inner * 4**bits <= 2**53 < 2 * inner * 4 ** (bits + 1)


def exact_products(x: torch.Tensor, y: torch.Tensor) -> list[list[Fraction]]:
    """xᵀ y in exact rational arithmetic."""
    xs = [[Fraction(v) for v in column] for column in x.T.tolist()]
    ys = [[Fraction(v) for v in column] for column in y.T.tolist()]
    return [[sum(p * q for p, q in zip(u, v)) for v in ys] for u in xs]


def test_near_maximal_same_sign_entries_stay_exact() -> None:
    """Every entry just under its column's largest and of one sign: hi is ~2^β everywhere, so hiᵀhi and
    hiᵀlo reach the budget; each must equal its exact rational value (one bit more width would round)."""
    inner = 3000
    gen = torch.Generator().manual_seed(2)
    x = 1.0 - 2.0**-12 * torch.rand(inner, 3, generator=gen, dtype=torch.float64)
    x[:, 1] *= 2.0**-30  # columns of other scales take their own power of two
    x[:, 2] *= -3.0
    split = split_columns(x)
    assert split.lo is not None  # float64 entries: a dense low slice
    for got, (left, right) in (
        (split.hi.T @ split.hi, (split.hi, split.hi)),
        (split.lo.T @ split.hi, (split.lo, split.hi)),
    ):
        exact = exact_products(left, right)
        assert [[Fraction(v) for v in row] for row in got.tolist()] == exact
    dropped = (split.hi + split.lo - x).abs() / x.abs().amax(dim=0)
    assert float(dropped.max()) <= 2.0 ** (-2 * slice_bits(inner))


# --- softmax at a similarity of exactly 0 --------------------------------------------------------


def test_softmax_keeps_a_similarity_of_exactly_zero() -> None:
    """``clip`` drops negative similarities only: S = 0 gets e^0, not 0."""
    s = torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, 0.5], [-0.5, 0.5, 1.0]], dtype=torch.float64)
    weights = personalized_weights(s, WeightOptions(weighting="softmax", temperature=0.5))
    e = math.exp
    expected = torch.tensor(
        [
            [e(2) / (e(2) + 1), 1 / (e(2) + 1), 0.0],
            [1 / (1 + e(2) + e(1)), e(2) / (1 + e(2) + e(1)), e(1) / (1 + e(2) + e(1))],
            [0.0, e(1) / (e(1) + e(2)), e(2) / (e(1) + e(2))],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(weights, expected, atol=1e-15, rtol=0)


# --- neighbours and clusters ---------------------------------------------------------------------


def reference_neighbours(similarity: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Every other client sorted by similarity descending, then index ascending; the first k."""
    rows = similarity.tolist()
    return [
        sorted(((j, v) for j, v in enumerate(row) if j != i), key=lambda p: (-p[1], p[0]))[:k]
        for i, row in enumerate(rows)
    ]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_neighbours_past_the_partition_threshold_match_a_full_sort(k: int) -> None:
    """From 4(k + 1) + 1 clients on only the top entries are sorted; ties at the threshold included."""
    gen = torch.Generator().manual_seed(4)
    count = 30
    s = torch.round(torch.rand(count, count, generator=gen, dtype=torch.float64) * 5) / 5  # many ties
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    assert count > 4 * (k + 1)
    assert nearest_neighbours(s, k) == reference_neighbours(s, k)


def test_three_clients_can_be_split() -> None:
    """Two similar clients and one apart: the only cut tried for K = 3 (two clusters) is taken."""
    s = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.0], [0.1, 0.0, 1.0]], dtype=torch.float64)
    assert suggest_clusters(s) == [[0, 1], [2]]
    assert suggest_clusters(torch.ones(3, 3, dtype=torch.float64)) == [[0, 1, 2]]


# --- the outlier report's mean similarity --------------------------------------------------------


def test_outlier_value_is_the_mean_similarity_to_the_others() -> None:
    """Client f's mean cosine to the five others, (−0.1 − 0.2 − 0.3 − 0.25 − 0.15) / 5 = −0.2."""
    s = torch.full((6, 6), 0.6, dtype=torch.float64)
    s[5, :5] = s[:5, 5] = torch.tensor([-0.1, -0.2, -0.3, -0.25, -0.15], dtype=torch.float64)
    s.fill_diagonal_(1.0)
    found = outliers(list("abcdef"), s, torch.ones(6, dtype=torch.float64))
    assert [o["client"] for o in found["similarity"]] == ["f"]
    assert found["similarity"][0]["value"] == pytest.approx(-0.2, abs=1e-15)
    # The others' means, (4·0.6 + s_i5) / 5, are 0.46, 0.44, 0.42, 0.43, 0.45: median 0.43, MAD 0.01.
    assert found["similarity"][0]["z"] == pytest.approx(0.6745 * (-0.2 - 0.43) / 0.01, rel=1e-9)


# --- similarity from inner products, without files --------------------------------------------------


def keyed(gen: torch.Generator, rank: int, scale: float, key: bytes) -> KeyedFactors:
    """Random float64 factors of one (6, 5) module."""
    b = torch.randn(6, rank, generator=gen, dtype=torch.float64)
    return KeyedFactors(key, b, torch.randn(rank, 5, generator=gen, dtype=torch.float64), scale)


def dense_inner(factors: list[KeyedFactors | None]) -> torch.Tensor:
    """⟨s_i B_i A_i, s_j B_j A_j⟩_F from the dense deltas, 0 for a client without the module."""
    deltas = [torch.zeros(6, 5, dtype=torch.float64) if f is None else f.scale * f.b @ f.a for f in factors]
    flat = torch.stack([d.flatten() for d in deltas])
    return flat @ flat.T


@pytest.mark.parametrize("persistent", [False, True])
def test_cached_inner_products_match_dense_deltas(tmp_path: Path, persistent: bool) -> None:
    """Mixed ranks and scales, a client without the module, two clients with one key (computed once), and
    a second lookup that reads every product from the cache: all equal the dense float64 products."""
    gen = torch.Generator().manual_seed(12)
    shared = keyed(gen, 2, 0.5, b"k-shared")
    factors = [keyed(gen, 3, 2.0, b"k-a"), None, shared, keyed(gen, 1, -1.5, b"k-b"), shared, keyed(gen, 2, 1, b"k-c")]
    cache = InnerProductCache(tmp_path / "cache" if persistent else None, key_file=tmp_path / "key")
    first = cached_inner_products(factors, cache)
    assert torch.allclose(first, dense_inner(factors), rtol=1e-12, atol=1e-12)
    assert first[1].tolist() == [0.0] * 6 and first[:, 1].tolist() == [0.0] * 6
    assert cache.stats.computed == 10  # 4 distinct keys: 4 · 5 / 2 pairs, the shared one once
    again = cached_inner_products(factors, cache)
    assert torch.equal(again, first)
    assert cache.stats.computed == (10 if persistent else 20)


def test_dense_inner_products_leave_missing_clients_at_zero() -> None:
    gen = torch.Generator().manual_seed(13)
    deltas = [torch.randn(3, 4, generator=gen), None, torch.randn(3, 4, generator=gen)]
    got = dense_inner_products(deltas)
    x = [d.double().flatten() if d is not None else torch.zeros(12, dtype=torch.float64) for d in deltas]
    assert torch.allclose(got, torch.stack(x) @ torch.stack(x).T, rtol=1e-15, atol=0)


@pytest.mark.parametrize("block", [1024, 2])
def test_cosine_from_inner_by_hand(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cosines from an asymmetric Gram (its upper triangle counts), a zero client (similar only to itself),
    and a product a hair over the norms' product (clamped to 1)."""
    monkeypatch.setattr(similarity_module, "SYMMETRIC_BLOCK", block)
    inner = torch.tensor(
        [[4.0, 2.0, 0.0, -6.0], [9.0, 9.0, 0.0, 9.0 * (1 + 1e-12)], [0.0, 0.0, 0.0, 0.0], [-6.0, 0.0, 0.0, 9.0]],
        dtype=torch.float64,
    )
    cosine, norms = cosine_from_inner(inner)
    assert norms.tolist() == [2.0, 3.0, 0.0, 3.0]
    assert cosine.tolist() == [
        [1.0, 2.0 / 6.0, 0.0, -1.0],
        [2.0 / 6.0, 1.0, 0.0, 1.0],
        [0.0, 0.0, 1.0, 0.0],
        [-1.0, 1.0, 0.0, 1.0],
    ]
    copy = inner.clone()
    assert torch.equal(cosine_from_inner(copy, in_place=True)[0], cosine) and torch.equal(copy, cosine)
    # Norms below 1 divide as well, and a product a hair under −n_i n_j is clamped to −1.
    small = torch.tensor([[0.25, -0.25 * (1 + 1e-12)], [-0.25 * (1 + 1e-12), 0.25]], dtype=torch.float64)
    assert cosine_from_inner(small)[0].tolist() == [[1.0, -1.0], [-1.0, 1.0]]


def test_covering_rows_by_hand() -> None:
    """Pairs (0, 3), (1, 3), (2, 3) are all covered by row 3 alone; a limit below what is needed gives None."""
    missing = torch.zeros(5, 5, dtype=torch.bool)
    for i in (0, 1, 2):
        missing[i, 3] = missing[3, i] = True
    assert covering_rows(missing) == [3]
    missing[0, 4] = missing[4, 0] = True
    assert covering_rows(missing) == [0, 3]
    assert covering_rows(missing, limit=1) is None
    assert covering_rows(torch.zeros(3, 3, dtype=torch.bool)) == []


def test_similarity_from_inner_sums_groups_and_refuses_a_zero_client() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    result = similarity_from_inner(["x", "y"], "block", {"g1": ["a"], "g2": ["a", "b"]}, {"a": a, "b": b})
    assert result.clients == ["x", "y"] and result.granularity == "block" and list(result.groups) == ["g1", "g2"]
    assert result.groups["g1"].similarity.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert result.groups["g2"].similarity.tolist() == [[1.0, 0.5], [0.5, 1.0]]  # 2 / (2 · 2)
    assert result.groups["g2"].norms.tolist() == [2.0, 2.0] and result.groups["g2"].modules == ["a", "b"]
    with pytest.raises(AdapterError, match="task vector is zero.*: y"):
        similarity_from_inner(["x", "y"], "model", {"model": ["a"]}, {"a": torch.diag(torch.tensor([1.0, 0.0]))})
