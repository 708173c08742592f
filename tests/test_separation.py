"""The paper's Figure 3 check on planted vectors: cosine, within-minus-between gap and ARI by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbip_cli.simulate.separation import cluster_ari, cosine_matrix, group_gap, round_separation, separation


def stacked(*rows: list[float]) -> dict[str, torch.Tensor]:
    """K vectors split into two tensors per client (first two entries, the rest), as a model's
    parameters are: the cosine must be that of the whole concatenated vector."""
    matrix = torch.tensor(rows, dtype=torch.float32)
    return {"w": matrix[:, :2].reshape(-1, 1, 2), "b": matrix[:, 2:]}


def test_cosine_of_concatenated_tensors_against_a_float64_reference() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 7))
    expected = (rows @ rows.T) / np.outer(np.linalg.norm(rows, axis=1), np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(cosine_matrix(stacked(*rows.tolist())).numpy(), expected, atol=1e-6)
    # (3, 4, 0) and (4, 3, 0): 24/25; a zero vector is similar to nothing, itself included
    s = cosine_matrix(stacked([3, 4, 0], [4, 3, 0], [0, 0, 0]))
    assert s[0, 1].item() == pytest.approx(24 / 25, abs=1e-12)
    assert s[2].tolist() == [0.0, 0.0, 0.0]


# Two planted groups: a1 = (1, 0, 0), a2 = (2, 0, 0) point one way, b1 = (0, 1, 0), b2 = (0, 3, 0)
# another; within-group cosines are 1, between-group ones 0.
PLANTED = stacked([1, 0, 0], [0, 1, 0], [2, 0, 0], [0, 3, 0])


def test_planted_groups_give_gap_one_and_ari_one() -> None:
    s = cosine_matrix(PLANTED)
    assert separation(s, [0, 1, 0, 1]) == {"gap": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_wrong_groups_give_a_negative_gap() -> None:
    # groups {a1, b1} and {a2, b2}: within pairs (a1, b1), (a2, b2) have cosine 0; between pairs
    # (a1, a2) = 1, (a1, b2) = 0, (b1, a2) = 0, (b1, b2) = 1: mean 1/2, so the gap is -1/2.
    s = cosine_matrix(PLANTED)
    assert group_gap(s, [0, 0, 1, 1]) == pytest.approx(-0.5)
    assert cluster_ari(s, [0, 0, 1, 1]) == pytest.approx(-0.5)  # ARI of {0,2}{1,3} vs {0,1}{2,3}


def test_noise_hides_the_groups_partly() -> None:
    """Planted directions plus noise of growing size: the gap shrinks as the noise grows."""
    rng = np.random.default_rng(1)
    centres = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2]] * 10
    gaps = []
    for scale in (0.1, 5.0, 50.0):
        rows = centres + rng.normal(scale=scale, size=centres.shape)
        gaps.append(group_gap(cosine_matrix(stacked(*rows.tolist())), [0, 1, 2] * 3))
    assert gaps[0] > 0.95 and gaps[0] > gaps[1] > gaps[2]


def test_no_pair_of_one_kind_has_no_gap() -> None:
    s = cosine_matrix(PLANTED)
    assert group_gap(s, [0, 0, 0, 0]) is None  # nothing between groups
    assert group_gap(s, [0, 1, 2, 3]) is None  # nothing within a group


def test_round_separation_needs_known_groups_and_three_participants() -> None:
    vectors = {"update": PLANTED, "parameters": stacked([1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])}
    groups = {"a1": 0, "b1": 1, "a2": 0, "b2": 1}
    result = round_separation(["a1", "b1", "a2", "b2"], groups, vectors)
    assert result is not None and result["update"]["gap"] == pytest.approx(1.0)
    # identical parameters: every cosine 1, no separation at all and one cluster (ARI 0)
    assert result["parameters"] == {"gap": pytest.approx(0.0), "ari": pytest.approx(0.0)}
    assert round_separation(["a1", "b1", "a2", "b2"], {**groups, "b2": None}, vectors) is None
    two = {kind: {name: t[:2] for name, t in v.items()} for kind, v in vectors.items()}
    assert round_separation(["a1", "b1"], groups, two) is None
