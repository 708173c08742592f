"""The benchmark harness (``benchmarks/bench.py``) end to end on its tiny workload.

3 clients, 2 blocks, width 32: generation, the I/O floor, fedbip's merges and similarity, and the
dense reference and the peft path, each in its own process as in a real run (the start-up row is
left out to keep the test short). Checks the rows, that fedbip's outputs match the dense float64
optimum up to their fp16 storage, and that the harness's own weights (used when fedbip leaves no
manifest) are fedbip's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks.arithmetic import merge_flops, similarity_flops  # noqa: E402
from benchmarks.paper_weights import paper_weights  # noqa: E402
from benchmarks.workloads import client_names, workload  # noqa: E402


def test_bench_tiny_end_to_end(tmp_path: Path) -> None:
    rows_path, results = tmp_path / "rows.json", tmp_path / "RESULTS.md"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--workload",
        "tiny",
        "--work-dir",
        str(tmp_path / "work"),
        "--results",
        str(results),
        "--json",
        str(rows_path),
        "--skip",
        "startup",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr

    rows = {row["key"]: row for row in json.loads(rows_path.read_text())["rows"]}
    assert list(rows) == ["floor", "arithmetic", "merge", "merge-layerwise", "inspect", "peft", "dense"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    wl = workload("tiny")
    assert rows["floor"]["wall_s"] > 0
    shapes = list(wl.modules().values())
    floor = merge_flops(wl.clients, wl.rank, shapes) / (
        json.loads((tmp_path / "work" / "tiny-0" / "runs" / "gemm.result.json").read_text())["float64"] * 1e9
    )
    assert rows["arithmetic"]["wall_s"] == pytest.approx(floor)
    for key in ("merge", "merge-layerwise"):  # against the larger floor
        assert rows[key]["both_ratio"] == pytest.approx(rows[key]["wall_s"] / max(floor, rows["floor"]["wall_s"]))
    for key in ("merge", "merge-layerwise"):
        assert rows[key]["rel_err"] < 2e-3  # fp16 outputs: storage rounding only
        assert rows[key]["energy_gap"] < 1e-4
    assert rows["peft"]["rel_err"] < 1e-5  # float32 dense SVD, float32 outputs
    assert rows["peft"]["estimated"] and rows["peft"]["per_client_s"] > 0
    for key in ("merge", "merge-layerwise", "inspect"):
        assert rows[key]["per_client_s"] == rows[key]["wall_s"] / wl.clients
    assert rows["inspect"]["max_cos_err"] < 1e-9
    assert rows["dense"]["estimated"] and rows["dense"]["wall_s"] > 0

    text = results.read_text()
    for label in (
        "I/O floor",
        "fedbip merge --layerwise",
        "fedbip inspect-similarity",
        "dense torch reference (float64)",
        "peft add_weighted_adapter (svd)",
    ):
        assert f"| {label} |" in text
    assert "## Targets" in text and "tiny" in text

    run = tmp_path / "work" / "tiny-0"
    manifest = json.loads((run / "runs" / "merge" / "fedbip-manifest.json").read_text())
    assert manifest["clients"] == client_names(wl.clients)
    ours = paper_weights(run / "clients", manifest["clients"], list(wl.modules()))
    torch.testing.assert_close(ours, torch.tensor(manifest["groups"]["model"]["weights"], dtype=torch.float64))
    similarity = manifest["groups"]["model"]["similarity"]
    assert similarity[0][2] > max(similarity[0][1], similarity[1][2])  # clients 0 and 2 share a planted cluster


def test_the_arithmetic_floor_counts_by_hand() -> None:
    """K = 2 clients of rank 3 on a 10 × 7 module: n = 6 stacked columns, both sides' bases 6 wide.
    Grams n²(d_out + d_in); outputs K · 2 d p R per side; one product per client's SVD, K · 2 p_B p_A R."""
    assert merge_flops(2, 3, [(10, 7)]) == 36 * 17 + 2 * 2 * (10 * 6 + 7 * 6) * 3 + 2 * 2 * 6 * 6 * 3
    assert similarity_flops(2, 3, [(10, 7), (10, 7)]) == 2 * 36 * 17
    # 40 clients of rank 8 on 384 × 384: n = 320 < 384; 60 clients: n = 480, the bases stop at 384
    assert merge_flops(60, 8, [(384, 384)]) == 480**2 * 768 + 60 * 2 * 2 * 384 * 384 * 8 + 60 * 2 * 384 * 384 * 8
    assert merge_flops(2, 3, [(10, 7)], output_rank=1) < merge_flops(2, 3, [(10, 7)])


def test_measure_own_peak_rss_timeout_and_failure() -> None:
    """The launcher reports the child's own peak (not this process's, which holds torch), a timeout and a failure."""
    python = [sys.executable, "-c"]
    small = measure.run([*python, "pass"], timeout=30, env=os.environ)
    big = measure.run(
        [*python, "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096])"], timeout=30, env=os.environ
    )
    assert small.status == big.status == "ok"
    assert small.peak_rss_mb < 40 and big.peak_rss_mb > 300
    slow = measure.run([*python, "import time; time.sleep(30)"], timeout=0.5, env=os.environ)
    assert slow.status == "timeout" and slow.wall_s < 10
    failed = measure.run([*python, "import sys; sys.exit('no luck')"], timeout=30, env=os.environ)
    assert failed.status == "failed" and "no luck" in failed.detail


def test_similarity_rows_streams_any_json_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of named clients come out of compact or indented JSON, tokens split across chunks."""
    from benchmarks import reference

    monkeypatch.setattr(reference, "CHUNK", 7)  # every token straddles a chunk boundary somewhere
    clients = ["c0", "c1", "c2", "c3"]
    matrix = [[float(10 * i + j) for j in range(4)] for i in range(4)]
    document = {
        "clients": clients,
        "granularity": "model",
        "groups": {"model": {"similarity": matrix, "norms": [1.0] * 4}},
    }
    for indent in (None, 2):
        path = tmp_path / f"out-{indent}.json"
        path.write_text(json.dumps(document, indent=indent))
        got = reference.similarity_rows(path, ["c2", "c0"])
        assert got.tolist() == [[22.0, 20.0], [2.0, 0.0]]
