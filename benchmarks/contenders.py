"""Each contender of one workload run, as table rows: the I/O floor and fedbip's CLI, then the peft
path and the dense reference (which merge with fedbip's weights and check every output).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import arithmetic, measure, workloads
from benchmarks.report import Row

ROOT = Path(__file__).resolve().parent.parent
FEDBIP = [sys.executable, "-m", "fedbip_cli"]
MLP = ("gate_proj", "up_proj", "down_proj")
PEFT = "peft add_weighted_adapter (svd)"
DENSE = "dense torch reference (float64)"
SKETCH = "fedbip inspect-similarity --similarity sketch"


@dataclass
class Run:
    """One workload's run: where its files are, how to start children, and the rows so far."""

    wl: workloads.Workload
    gen: workloads.Generated
    runs: Path
    args: argparse.Namespace
    env: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    floor: dict = field(default_factory=dict)
    gemm: dict = field(default_factory=dict)  # GFLOP/s of float64 and float32 products (``arithmetic``)

    @property
    def label(self) -> str:
        return f"{self.wl.name} (QUICK: {self.wl.note})" if self.wl.quick and self.wl.note else self.wl.name

    def wanted(self, contender: str) -> bool:
        return contender not in self.args.skip

    def row(self, key: str, contender: str, measured: measure.Measured | None = None, **values: object) -> Row:
        """Append and return a table row; a failed or timed-out run keeps its status and wall time."""
        row: Row = {
            "name": self.wl.name,
            "workload": self.label,
            "key": key,
            "contender": contender,
            "quick": self.wl.quick,
            "clients": self.wl.clients,
            "input_mb": self.gen.input_bytes / 1e6,
            "status": "ok",
            "error": "",
            "how": "",
        }
        if measured is not None:
            row.update(status=measured.status, wall_s=measured.wall_s, peak_rss_mb=measured.peak_rss_mb)
        row.update(values)
        if measured is not None and measured.status != "ok":  # the reason replaces the description
            row["how"] = measured.detail.splitlines()[-1][:200] if measured.detail else measured.status
        self.rows.append(row)
        return row

    def child(self, script: str, name: str, spec: dict) -> tuple[measure.Measured, dict | None]:
        """Run ``benchmarks/<script>`` on ``spec``; its measurement and its result JSON (None unless ok)."""
        spec_path, result_path = self.runs / f"{name}.spec.json", self.runs / f"{name}.result.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        result_path.unlink(missing_ok=True)
        command = [sys.executable, str(ROOT / "benchmarks" / script), str(spec_path), str(result_path)]
        measured = measure.run(command, timeout=self.args.baseline_timeout, env=self.env)
        return measured, json.loads(result_path.read_text()) if measured.status == "ok" else None


def max_floor(run: Run, *, write: bool) -> float | None:
    """max(I/O floor, arithmetic floor) for a merge (``write``) or a similarity."""
    floors = [f for f in (floor_seconds(run, write=write), arithmetic_seconds(run, merge=write)) if f]
    return max(floors) if floors else None


def floor_seconds(run: Run, *, write: bool = True) -> float | None:
    """The I/O floor to compare with: read + write for merges, read alone for similarity."""
    if not run.floor:
        return None
    return run.floor["read_s"] + (run.floor["write_s"] if write else 0.0)


def ratio(seconds: float | None, floor: float | None) -> float | None:
    return None if seconds is None or not floor else seconds / floor


GEMM_SIZE = 2048


def arithmetic_flops(run: Run, *, merge: bool) -> float:
    """``arithmetic``'s lower bound of the exact merge's (or similarity's) float64 operations."""
    shapes = list(run.wl.modules().values())
    return (arithmetic.merge_flops if merge else arithmetic.similarity_flops)(run.wl.clients, run.wl.rank, shapes)


def arithmetic_seconds(run: Run, *, merge: bool) -> float | None:
    """The arithmetic floor: ``arithmetic_flops`` at this machine's float64 GEMM rate, measured in the same run."""
    if not run.gemm:
        return None
    return arithmetic_flops(run, merge=merge) / (run.gemm["float64"] * 1e9)


def gemm_row(run: Run) -> None:
    """The machine's GEMM rates (a child with torch's default threads) and the arithmetic floor's row."""
    measured, result = run.child("arithmetic.py", "gemm", {"size": GEMM_SIZE})
    if result is None:
        run.row("arithmetic", "arithmetic floor", measured)
        return
    run.gemm = result
    seconds = arithmetic_seconds(run, merge=not run.wl.similarity_only)
    flops = arithmetic_flops(run, merge=not run.wl.similarity_only)
    run.row(
        "arithmetic",
        "arithmetic floor",
        None,
        wall_s=seconds,
        how=f"{flops / 1e9:,.0f} GFLOP (a lower bound of the exact algorithm's float64 work: Grams, outputs from the "
        f"shared basis, one product per client's SVD) at this machine's float64 GEMM rate, {result['float64']:.1f} "
        f"GFLOP/s ({result['float32']:.1f} in float32), measured in this run",
    )


def floor_row(run: Run) -> None:
    wl = run.wl
    files = 0 if wl.similarity_only else wl.clients
    spec = {
        "inputs": str(run.gen.clients),
        "outputs": str(run.runs / "floor-out"),
        "files": files,
        "bytes_per_file": wl.per_client_bytes(wl.rank),
    }
    measured, result = run.child("floor.py", "floor", spec)
    if result is None:
        run.row("floor", "I/O floor", measured)
        return
    run.floor = result
    run.row(
        "floor",
        "I/O floor",
        measured,
        wall_s=result["read_s"] + result["write_s"],
        floor_ratio=1.0,
        how=f"in process: read {result['read_bytes'] / 1e6:,.1f} MB ({result['read_files']:,} files) in "
        f"{result['read_s']:.2f} s, wrote {result['write_bytes'] / 1e6:,.1f} MB in {result['write_s']:.2f} s",
    )


def cli(run: Run, key: str, label: str, args: list[str], *, write: bool) -> None:
    """One fedbip command, stdout kept in ``runs/<key>.json``."""
    stdout = run.runs / f"{key}.json"
    measured = measure.run(
        [*FEDBIP, *args, "--device", run.args.device], timeout=run.args.timeout, env=run.env, stdout=stdout
    )
    shown = " ".join("DIR" if a == str(run.gen.clients) else "OUT" if a.startswith(str(run.runs)) else a for a in args)
    run.row(
        key,
        label,
        measured,
        per_client_s=measured.wall_s / run.wl.clients,
        stdout=str(stdout),
        floor_ratio=ratio(measured.wall_s, floor_seconds(run, write=write)),
        both_ratio=ratio(measured.wall_s, max_floor(run, write=write)),
        how=f"`fedbip {shown} --device {run.args.device}`; vs the floor's " + ("read + write" if write else "read"),
    )


def sketch_available(env: dict[str, str]) -> bool:
    """Whether this fedbip's ``inspect-similarity`` offers ``--similarity sketch``."""
    done = subprocess.run([*FEDBIP, "inspect-similarity", "--help"], capture_output=True, text=True, env=env)
    return re.search(r"--similarity\b(?!-)", done.stdout) is not None and "sketch" in done.stdout


def fedbip_rows(run: Run) -> None:
    """The floor, fedbip's merges (global, layer-wise) and similarity runs."""
    wl, clients = run.wl, str(run.gen.clients)
    if run.wanted("floor"):
        floor_row(run)
    if run.wanted("arithmetic"):
        gemm_row(run)
    if not wl.similarity_only:
        for key, label, extra in (
            ("merge", "fedbip merge", []),
            ("merge-layerwise", "fedbip merge --layerwise", ["--layerwise"]),
        ):
            if run.wanted(key):
                out = run.runs / key
                cli(run, key, label, ["merge", clients, "--out", str(out), "--no-cache", "--json", *extra], write=True)
        if run.wanted("inspect"):
            cli(
                run,
                "inspect",
                "fedbip inspect-similarity",
                ["inspect-similarity", clients, "--no-cache", "--format", "json"],
                write=False,
            )
    if wl.sketch and run.wanted("sketch"):
        if sketch_available(run.env):
            # The matrix goes to a safetensors file: as JSON text it would be 2 GB at 10 000 clients.
            matrix = str(run.runs / "sketch.safetensors")
            args = [
                "inspect-similarity",
                clients,
                "--similarity",
                "sketch",
                "--no-cache",
                "--format",
                "json",
                "--matrix",
                matrix,
            ]
            cli(run, "sketch", SKETCH, args, write=False)
            run.rows[-1]["stdout"] = matrix  # where the similarity check reads the rows
        else:
            run.row(
                "sketch", SKETCH, status="n/a", how="this fedbip's inspect-similarity has no --similarity sketch option"
            )


def merge_weights(run: Run) -> tuple[list[str], dict[str, dict[str, list[list[float]]]], int, str]:
    """Client order, per variant (global, layerwise) and checked module the (K, K) weights, rank, and their source."""
    wl = run.wl
    checked = list(wl.check_modules())
    variants: dict[str, dict[str, list[list[float]]]] = {}
    path = run.runs / "merge" / "fedbip-manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        order, rank, source = manifest["clients"], manifest["rank"], "fedbip's manifest"
        (group,) = manifest["groups"].values()
        variants["global"] = {m: group["weights"] for m in checked}
    else:
        from benchmarks.paper_weights import paper_weights

        order, rank = workloads.client_names(wl.clients), wl.rank
        source = "the harness (fedbip's global merge left no manifest)"
        weights = paper_weights(run.gen.clients, order, list(wl.modules())).tolist()
        variants["global"] = {m: weights for m in checked}
    path = run.runs / "merge-layerwise" / "fedbip-manifest.json"
    if wl.check_layerwise and path.exists():
        manifest = json.loads(path.read_text())
        if manifest["clients"] == order:
            variants["layerwise"] = {
                m: g["weights"] for g in manifest["groups"].values() for m in g["modules"] if m in checked
            }
    return order, variants, rank, source


def scaled(wl: workloads.Workload, per_shape: dict[tuple[int, int], float]) -> float | None:
    """Σ over module shapes of (modules of that shape) × (measured seconds per such module); None if a shape is unmeasured."""
    counts = Counter(wl.modules().values())
    if set(counts) - set(per_shape):
        return None
    return sum(n * per_shape[shape] for shape, n in counts.items())


def first_failure(measured: list[measure.Measured]) -> measure.Measured | None:
    return next((m for m in measured if m.status != "ok"), None)


def peft_row(
    run: Run, order: list[str], weights: dict[str, list[list[float]]], rank: int, checked: list[str], source: str
) -> list[dict]:
    """The peft path on each checked module in its own process; its outputs for the error check."""
    wl = run.wl
    per_shape, outputs, measured, wall = {}, [], [], 0.0
    for target, (module, shape) in zip(wl.check_targets, wl.check_modules().items()):
        spec = {
            "family": wl.family,
            "hidden": wl.hidden,
            "intermediate": wl.intermediate if target in MLP else 64,
            "clients_dir": str(run.gen.clients),
            "clients": order,
            "module": module,
            "rank": rank,
            "measured": checked,
            "weights": [weights[module][order.index(c)] for c in checked],
            "work": str(run.runs / f"peft-{target}"),
            "device": run.args.device,
        }
        m, result = run.child("peft_path.py", f"peft-{target}", spec)
        measured.append(m)
        wall += m.wall_s
        if result is None:
            continue
        per_client = statistics.mean(c["add_s"] + c["save_s"] for c in result["clients"].values())
        per_shape[shape] = result["load_s"] + wl.clients * per_client
        outputs += [
            {
                "contender": PEFT,
                "variant": "global",
                "client": c,
                "module": module,
                "dir": result["clients"][c]["adapter"],
            }
            for c in checked
        ]
    failed = first_failure(measured)
    if failed is not None:
        run.row("peft", PEFT, failed)
        return outputs
    estimate = scaled(wl, per_shape)
    run.row(
        "peft",
        PEFT,
        wall_s=estimate,
        estimated=True,
        peak_rss_mb=max(m.peak_rss_mb for m in measured),
        per_client_s=None if estimate is None else estimate / wl.clients,
        floor_ratio=ratio(estimate, floor_seconds(run)),
        how=f"measured {len(checked)} client(s) × {', '.join(wl.check_targets)} of block 0 ({wall:.0f} s wall in "
        f"{len(measured)} process(es)); scaled to {wl.clients} clients × {len(wl.modules())} modules; weights from {source}",
    )
    return outputs


def describe_errors(errors: list[dict]) -> str:
    worst = max(errors, key=lambda e: e["energy_opt"] - e["energy"])
    return (
        f"rel ≤ {max(e['rel_err'] for e in errors):.1e}; energy {worst['energy']:.4f} of opt "
        f"{worst['energy_opt']:.4f} ({len(errors)} client-module pairs)"
    )


def dense_row(run: Run, spec: dict, source: str) -> None:
    """The dense reference: its own scaled row, and every checked contender's error."""
    wl = run.wl
    m, result = run.child("reference.py", "reference", spec)
    if result is None:
        run.row("dense", DENSE, m)
        return
    for row in run.rows:
        errors = [e for e in result["errors"] if e["contender"] == row["contender"]]
        if errors:
            row.update(
                error=describe_errors(errors),
                rel_err=max(e["rel_err"] for e in errors),
                energy_gap=max(e["energy_opt"] - e["energy"] for e in errors),
            )
        sim = result["similarity"].get(row["contender"])
        if sim and "unreadable" in sim:
            row["error"] = f"output not checked: {sim['unreadable']}"
        elif sim:
            row.update(
                error=f"max |Δcos| {sim['max_abs_err']:.1e} ({sim['clients']} clients)",
                max_cos_err=sim["max_abs_err"],
                checked=sim["clients"],
            )
    if not spec["check_modules"]:
        run.row(
            "dense",
            "dense cosine reference (float64)",
            m,
            wall_s=result.get("similarity_reference_s"),
            how=f"the similarity reference alone: {len(spec['similarity']['clients'])} clients, all modules (not a merge)",
        )
        return
    shapes = wl.check_modules()
    per_shape = {}
    for module, timing in result["dense"].items():
        per_client = statistics.mean(c["sum_s"] + c["svd_s"] for c in timing["clients"].values())
        per_shape[shapes[module]] = timing["materialize_s"] + wl.clients * per_client
    estimate = scaled(wl, per_shape)
    opt = min(e["energy_opt"] for e in result["errors"]) if result["errors"] else None
    unmeasured = sorted({f"{o}×{i}" for o, i in wl.modules().values()} - {f"{o}×{i}" for o, i in per_shape})
    how = (
        f"float64, {result['threads']} threads; measured {len(spec['check_clients'])} client(s) × "
        f"{', '.join(wl.check_targets)} of block 0 ({m.wall_s:.0f} s wall, with the layer-wise and similarity checks); "
        + (
            f"scaled to {wl.clients} clients × {len(wl.modules())} modules"
            if estimate is not None
            else f"not scaled: shapes {', '.join(unmeasured)} not measured"
        )
        + f"; weights from {source}"
    )
    run.row(
        "dense",
        DENSE,
        wall_s=estimate,
        estimated=estimate is not None,
        peak_rss_mb=m.peak_rss_mb,
        per_client_s=None if estimate is None else estimate / wl.clients,
        floor_ratio=ratio(estimate, floor_seconds(run)),
        error="the reference" + ("" if opt is None else f"; optimal energy ≥ {opt:.4f}"),
        how=how,
    )


def python_rows(run: Run) -> None:
    """The peft path and the dense reference, merging with fedbip's weights, and every error check."""
    wl = run.wl
    inspect = {
        r["contender"]: r["stdout"] for r in run.rows if r["key"] in ("inspect", "sketch") and r["status"] == "ok"
    }
    spec: dict[str, Any] = {
        "clients_dir": str(run.gen.clients),
        "device": run.args.device,
        "modules": list(wl.modules()),
        "similarity": {"clients": workloads.client_names(wl.clients)[: wl.similarity_check], "inspect": inspect},
        "check_modules": [],
        "outputs": [],
        "weights": {},
        "clients": [],
        "check_clients": [],
        "rank": wl.rank,
    }
    if wl.similarity_only:
        if run.wanted("dense") and inspect:
            dense_row(run, spec, "none")
        return
    order, variants, rank, source = merge_weights(run)
    checked = order[: wl.check_clients]
    outputs = [
        {"contender": label, "variant": variant, "client": c, "module": module, "dir": str(run.runs / key / c)}
        for key, label, variant in (
            ("merge", "fedbip merge", "global"),
            ("merge-layerwise", "fedbip merge --layerwise", "layerwise"),
        )
        if any(r["key"] == key and r["status"] == "ok" for r in run.rows) and variant in variants
        for c in checked
        for module in wl.check_modules()
    ]
    if wl.peft and run.wanted("peft"):
        outputs += peft_row(run, order, variants["global"], rank, checked, source)
    if run.wanted("dense"):
        by_client = {
            v: {m: {c: rows[order.index(c)] for c in checked} for m, rows in per_module.items()}
            for v, per_module in variants.items()
        }
        spec.update(
            check_modules=list(wl.check_modules()),
            outputs=outputs,
            weights=by_client,
            clients=order,
            check_clients=checked,
            rank=rank,
        )
        dense_row(run, spec, source)
