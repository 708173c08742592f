"""Clustering of similarity matrices and the report renderers (tables, JSON, CSV, heatmaps).

Expectations are worked out by hand on small matrices with obvious structure.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedbip_cli.clustering import mean_similarity, nearest_neighbours, silhouette, suggest_clusters
from fedbip_cli.errors import OutputError
from fedbip_cli.report import similarity_csv, similarity_json, similarity_tables, write_heatmap, write_json
from fedbip_cli.similarity import GroupSimilarity, SimilarityResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def blocks(*sizes: int, within: float = 0.9, across: float = 0.05) -> torch.Tensor:
    """A similarity matrix of consecutive blocks: ``within`` inside a block, ``across`` between."""
    k = sum(sizes)
    matrix = torch.full((k, k), across, dtype=torch.float64)
    start = 0
    for size in sizes:
        matrix[start : start + size, start : start + size] = within
        start += size
    matrix.fill_diagonal_(1.0)
    return matrix


def model_result(matrix: torch.Tensor, clients: list[str] | None = None) -> SimilarityResult:
    clients = clients or NAMES[: matrix.shape[0]]
    norms = torch.arange(1, len(clients) + 1, dtype=torch.float64)
    group = GroupSimilarity("model", ["layer.0.q", "layer.0.v"], matrix, norms)
    return SimilarityResult(clients, "model", {"model": group})


def block_result(matrices: list[torch.Tensor], clients: list[str] | None = None) -> SimilarityResult:
    clients = clients or NAMES[: matrices[0].shape[0]]
    groups = {}
    for b, matrix in enumerate(matrices):
        name = f"encoder.layer.{b}"
        norms = torch.full((len(clients),), float(b + 1), dtype=torch.float64)
        groups[name] = GroupSimilarity(name, [f"{name}.q", f"{name}.v"][: 1 + b % 2], matrix, norms)
    return SimilarityResult(clients, "block", groups)


def render(renderables: list) -> str:
    console = Console(record=True, width=120)
    for renderable in renderables:
        console.print(renderable)
    return console.export_text()


# --- clustering -------------------------------------------------------------------------------


def test_nearest_neighbours_sorted_descending_ties_by_index_self_excluded():
    similarity = torch.tensor(
        [
            [1.0, 0.5, 0.5, -0.2],
            [0.5, 1.0, 0.9, 0.1],
            [0.5, 0.9, 1.0, 0.3],
            [-0.2, 0.1, 0.3, 1.0],
        ],
        dtype=torch.float64,
    )
    assert nearest_neighbours(similarity, k=2) == [
        [(1, 0.5), (2, 0.5)],
        [(2, 0.9), (0, 0.5)],
        [(1, 0.9), (0, 0.5)],
        [(2, 0.3), (1, 0.1)],
    ]
    # More neighbours than there are other clients: all of them, never the client itself.
    assert nearest_neighbours(similarity, k=10)[3] == [(2, 0.3), (1, 0.1), (0, -0.2)]
    assert nearest_neighbours(torch.ones(1, 1), k=3) == [[]]


def test_two_obvious_blocks_give_two_clusters():
    assert suggest_clusters(blocks(3, 3)) == [[0, 1, 2], [3, 4, 5]]


def test_three_blocks_of_unequal_size_give_three_clusters():
    assert suggest_clusters(blocks(2, 4, 3, within=0.7, across=0.0)) == [[0, 1], [2, 3, 4, 5], [6, 7, 8]]


def test_interleaved_clusters_are_sorted_and_ordered_by_smallest_index():
    order = [3, 0, 4, 1, 5, 2]  # client c sits at position order[c] of the block matrix
    matrix = blocks(3, 3)[order][:, order]
    # Clients at block positions 0, 1, 2 are 1, 3, 5; positions 3, 4, 5 are 0, 2, 4.
    assert suggest_clusters(matrix) == [[0, 2, 4], [1, 3, 5]]


def test_no_structure_gives_one_cluster():
    assert suggest_clusters(torch.eye(5, dtype=torch.float64)) == [[0, 1, 2, 3, 4]]
    assert suggest_clusters(torch.ones(4, 4, dtype=torch.float64)) == [[0, 1, 2, 3]]


def test_fewer_than_three_clients_form_one_cluster():
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert suggest_clusters(opposed) == [[0, 1]]
    assert suggest_clusters(torch.ones(1, 1)) == [[0]]


def test_weak_split_is_reported_only_above_the_silhouette_threshold():
    weak = blocks(3, 3, within=0.3, across=0.1)
    # Two blocks: a = 0.7 within, b = 0.9 across, so the silhouette is (0.9 - 0.7) / 0.9 = 0.222.
    assert suggest_clusters(weak) == [[0, 1, 2], [3, 4, 5]]
    assert suggest_clusters(weak, min_silhouette=0.25) == [[0, 1, 2, 3, 4, 5]]


def test_clustering_tolerates_float_noise_outside_the_unit_interval():
    matrix = blocks(3, 3)
    matrix[0, 1] = 0.9 + 1e-12  # asymmetric
    matrix[2, 2] = 1.0 + 1e-12  # above 1
    assert suggest_clusters(matrix) == [[0, 1, 2], [3, 4, 5]]


def test_silhouette_hand_computed():
    distance = np.array([[0, 1, 4, 4], [1, 0, 4, 4], [4, 4, 0, 1], [4, 4, 1, 0]], dtype=float)
    # Every point: a = 1, b = 4, s = 3 / 4.
    assert silhouette(distance, np.array([1, 1, 2, 2])) == pytest.approx(0.75)
    # Point 2 alone scores 0; points 0 and 1: a = 1, b = 4 -> 0.75 each; mean over three is 0.5.
    assert silhouette(distance[:3, :3], np.array([1, 1, 2])) == pytest.approx(0.5)
    assert silhouette(distance, np.array([1, 1, 1, 1])) == 0.0


def reference_silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    """The textbook definition, client by client."""
    scores = []
    for i, label in enumerate(labels):
        own = [j for j in range(len(labels)) if labels[j] == label and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = float(np.mean(distance[i, own]))
        b = min(float(np.mean(distance[i, labels == other])) for other in set(labels.tolist()) if other != label)
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


@pytest.mark.parametrize("contiguous", [True, False])
def test_silhouette_matches_the_definition_with_runs_and_scattered_labels(contiguous: bool):
    rng = np.random.default_rng(5)
    points = rng.normal(size=(23, 4))
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    labels = np.repeat([3, 1, 7, 2], [6, 5, 9, 3]) if contiguous else rng.integers(0, 4, size=23)
    assert silhouette(distance, labels) == pytest.approx(reference_silhouette(distance, labels), abs=1e-12)


def test_mean_similarity_is_the_plain_mean_over_groups():
    first = blocks(3, 3, within=0.8, across=0.0)
    second = blocks(3, 3, within=0.4, across=-0.2)
    mean = mean_similarity(block_result([first, second]))
    assert mean[0, 1].item() == pytest.approx(0.6)
    assert mean[0, 5].item() == pytest.approx(-0.1)
    assert torch.equal(mean.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.equal(mean_similarity(model_result(first)), first)


# --- JSON and CSV -----------------------------------------------------------------------------


def test_similarity_json_shape_and_values_at_full_precision():
    matrix = blocks(3, 3, within=0.123456789012345678, across=-0.3)
    result = model_result(matrix)
    data = similarity_json(result, neighbours=2)
    assert set(data) == {"clients", "granularity", "similarity", "groups", "clusters", "neighbours", "covers"}
    assert data["clients"] == NAMES
    assert data["granularity"] == "model"
    assert data["similarity"] == {"method": "exact"}
    group = data["groups"]["model"]
    assert set(group) == {"similarity", "modules", "norms", "outliers"}
    assert group["outliers"] == {"norm": [], "similarity": [], "near_copies": []}
    assert group["similarity"] == matrix.tolist()
    assert group["similarity"][0][1] == 0.123456789012345678
    assert type(group["similarity"][0][1]) is float
    assert group["modules"] == ["layer.0.q", "layer.0.v"]
    assert group["norms"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert data["clusters"] == [["alpha", "beta", "gamma"], ["delta", "epsilon", "zeta"]]
    assert data["neighbours"]["alpha"] == [["beta", 0.123456789012345678], ["gamma", 0.123456789012345678]]
    assert data["neighbours"]["zeta"][0] == ["delta", 0.123456789012345678]
    assert json.loads(json.dumps(data)) == data


def test_similarity_json_layerwise_reads_clusters_from_the_mean():
    # Clusters and neighbours come from the mean of the blocks: delta-epsilon is (0.9 + 0.5) / 2.
    first = blocks(3, 3, within=0.9, across=0.1)
    second = blocks(3, 3, within=0.5, across=0.0)
    data = similarity_json(block_result([first, second]))
    assert list(data["groups"]) == ["encoder.layer.0", "encoder.layer.1"]
    assert data["groups"]["encoder.layer.1"]["modules"] == ["encoder.layer.1.q", "encoder.layer.1.v"]
    assert data["groups"]["encoder.layer.1"]["norms"] == [2.0] * 6
    assert data["clusters"] == [["alpha", "beta", "gamma"], ["delta", "epsilon", "zeta"]]
    assert data["neighbours"]["delta"][0] == ["epsilon", pytest.approx(0.7)]


def test_similarity_csv_long_format():
    first = blocks(2, 1, within=0.25, across=-0.1)
    second = torch.eye(3, dtype=torch.float64)
    second[0, 2] = second[2, 0] = 0.1 + 0.2  # 0.30000000000000004: repr keeps every digit
    text = similarity_csv(block_result([first, second], clients=["a", "b,c", "d"]))
    lines = text.splitlines()
    assert lines[0] == "group,client_i,client_j,similarity"
    assert len(lines) == 1 + 2 * 3 * 3
    assert lines[1] == "encoder.layer.0,a,a,1.0"
    assert lines[2] == 'encoder.layer.0,a,"b,c",0.25'
    assert lines[3] == "encoder.layer.0,a,d,-0.1"
    assert lines[12] == "encoder.layer.1,a,d,0.30000000000000004"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["client_j"] for row in rows[:3]] == ["a", "b,c", "d"]
    assert float(rows[11]["similarity"]) == 0.1 + 0.2
    assert text.endswith("\n") and "\r" not in text


# --- tables -----------------------------------------------------------------------------------


def test_model_table_shows_names_values_neighbours_and_clusters():
    matrix = blocks(3, 3, within=0.93, across=-0.25)
    matrix[0, 2] = matrix[2, 0] = 0.71
    text = render(similarity_tables(model_result(matrix), neighbours=2))
    assert "whole model" in text
    for name in NAMES:
        assert name in text
    assert "-0.25" in text
    assert "beta 0.93, gamma 0.71" in text  # alpha's two nearest
    assert "Suggested clusters: {alpha, beta, gamma}  {delta, epsilon, zeta}" in text
    assert "Per group" not in text


def test_layerwise_tables_show_the_mean_and_one_row_per_group():
    first = blocks(3, 3, within=0.8, across=0.0)
    second = blocks(2, 4, within=0.6, across=0.0)
    text = render(similarity_tables(block_result([first, second])))
    assert "Mean cosine similarity over 2 block groups" in text
    assert "0.70" in text  # mean of 0.8 and 0.6 for alpha-beta
    assert "0.40" in text  # mean of 0.8 and 0.0 for alpha-gamma
    lines = text.splitlines()
    first_row = next(line for line in lines if "encoder.layer.0" in line)
    second_row = next(line for line in lines if "encoder.layer.1" in line)
    assert "{0, 1, 2}  {3, 4, 5}" in first_row and " 1 " in first_row
    assert "{0, 1}  {2, 3, 4, 5}" in second_row and " 2 " in second_row


def test_tables_without_structure_and_with_long_names_stay_readable():
    clients = ["a-very-long-client-name-from-the-hub-v12345", "short", "other"]
    text = render(similarity_tables(model_result(torch.eye(3, dtype=torch.float64), clients)))
    assert "a-very-long-client-name…" in text
    assert "a-very-long-client-name-from-the-hub-v12345" not in text.split("Suggested")[0]
    assert "Suggested clusters: none" in text
    assert max(len(line) for line in text.splitlines()) <= 120


# --- heatmaps ---------------------------------------------------------------------------------


def test_layerwise_heatmap_is_a_png_and_byte_identical_on_rewrite(tmp_path: Path):
    matrices = [blocks(3, 3, within=0.2 + 0.1 * b, across=-0.1 * b) for b in range(6)]
    result = block_result(matrices)
    path = tmp_path / "similarity.png"
    write_heatmap(result, path)
    first = path.read_bytes()
    assert first.startswith(PNG_MAGIC)
    assert b"tEXtSoftware\x00fedbip" in first and b"matplotlib" not in first.lower()  # no library version
    write_heatmap(result, path)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["similarity.png"]  # no temporary left


def test_heatmap_changes_with_the_data_and_supports_pdf_and_svg(tmp_path: Path):
    write_heatmap(model_result(blocks(3, 3)), tmp_path / "a.png")
    write_heatmap(model_result(blocks(2, 4)), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = tmp_path / f"m{suffix}"
        write_heatmap(model_result(blocks(3, 3)), path)
        first = path.read_bytes()
        assert first.startswith(magic)
        write_heatmap(model_result(blocks(3, 3)), path)
        assert path.read_bytes() == first


def test_heatmap_refuses_bad_paths_and_writes_nothing(tmp_path: Path):
    result = model_result(blocks(3, 3))
    with pytest.raises(OutputError, match="unknown image format"):
        write_heatmap(result, tmp_path / "similarity.jpg")
    with pytest.raises(OutputError, match="directory does not exist"):
        write_heatmap(result, tmp_path / "missing" / "similarity.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_heatmap(result, tmp_path / "dir.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]


def test_write_json_streams_tensors_and_round_trips():
    matrix = torch.tensor([[1.0, 0.1234567890123456789], [-0.0, 1e-300]], dtype=torch.float64)
    data = {
        "clients": ["a", "b"],
        "empty": {},
        "nothing": [],
        "groups": {
            "model": {"similarity": matrix, "norms": torch.tensor([2.0, 3.5], dtype=torch.float64), "modules": ["q"]}
        },
        "neighbours": {"a": [["b", 0.5]], "b": []},
        "rows": [{"x": 1, "y": None}, {"x": 2.5, "y": True}],
        "flag": False,
    }
    stream = io.StringIO()
    write_json(data, stream)
    text = stream.getvalue()
    parsed = json.loads(text)
    expected = {**data, "groups": {"model": {"similarity": matrix.tolist(), "norms": [2.0, 3.5], "modules": ["q"]}}}
    assert parsed == expected
    assert parsed["groups"]["model"]["similarity"][0][1] == 0.1234567890123456789  # full precision
    assert "[1.0, 0.12345678901234568]" in text  # a matrix row on one line
    assert text.endswith("}\n") and text.startswith('{\n  "clients": ["a", "b"],')
