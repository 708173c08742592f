"""The benchmark's outputs: the table, the targets, and ``benchmarks/RESULTS.md``. Never measures."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

Row = dict[str, Any]
COLUMNS = (
    "workload",
    "contender",
    "wall s",
    "× I/O floor",
    "× max floor",
    "per client s",
    "peak RSS MB",
    "error vs dense reference",
    "how",
)


def machine(root: Path) -> dict[str, str]:
    """CPU, cores, memory, load, library versions and threads, date and commit of this run."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    import torch

    versions = {"torch": torch.__version__}
    for dist in ("peft", "transformers", "safetensors"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    return {
        "CPU": f"{cpu} ({len(os.sched_getaffinity(0))} cores usable, {os.cpu_count()} online)",
        "RAM": f"{mem_kb / 1024**2:.1f} GiB",
        "load average at start": ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (the machine is shared)",
        "Python": platform.python_version(),
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "torch threads": f"{torch.get_num_threads()} (default; every contender runs with torch's default)",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit or "unknown",
    }


def seconds(value: float | None, estimated: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return f"≈ {text}" if estimated else text


def cell(row: Row, column: str) -> str:
    estimated = row.get("estimated", False)
    if row["status"] == "timeout" and column in (
        "wall s",
        "× I/O floor",
        "× max floor",
        "per client s",
    ):  # lower bounds
        return "> " + cell({**row, "status": "ok"}, column)
    if column == "workload":
        return row["workload"]
    if column == "contender":
        return row["contender"] if row["status"] == "ok" else f"{row['contender']} (**{row['status']}**)"
    if column == "wall s":
        return seconds(row.get("wall_s"), estimated)
    if column == "× I/O floor":
        ratio = row.get("floor_ratio")
        return "–" if ratio is None else (f"≈ {ratio:,.1f}" if estimated else f"{ratio:,.1f}")
    if column == "× max floor":  # against max(I/O floor, arithmetic floor)
        ratio = row.get("both_ratio")
        return "–" if ratio is None else (f"≈ {ratio:,.1f}" if estimated else f"{ratio:,.1f}")
    if column == "per client s":
        return seconds(row.get("per_client_s"), estimated)
    if column == "peak RSS MB":
        rss = row.get("peak_rss_mb")
        return "–" if rss is None else f"{rss:,.0f}" + (" (subset)" if estimated else "")
    if column == "error vs dense reference":
        return row.get("error") or "–"
    return row.get("how", "")


def table(rows: list[Row]) -> str:
    """A markdown table, one line per row, the workload named once per group."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|"
        + "|".join(
            "---:" if c in ("wall s", "× I/O floor", "× max floor", "per client s", "peak RSS MB") else "---"
            for c in COLUMNS
        )
        + "|",
    ]
    previous = None
    for row in rows:
        cells = [cell(row, c).replace("|", "\\|") for c in COLUMNS]
        if row["workload"] == previous:
            cells[0] = ""
        previous = row["workload"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find(rows: list[Row], workload: str, contender: str) -> Row | None:
    return next((r for r in rows if r["name"] == workload and r["key"] == contender), None)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**reached**" if ok else "**missed**")


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The targets: (target, what was measured, reached / missed / not measured)."""
    out: list[tuple[str, str, str]] = []

    def measured(r: Row | None) -> bool:
        return r is not None and r["status"] in ("ok", "timeout") and r.get("wall_s") is not None

    def time_target(label: str, r: Row | None, limit: float) -> None:
        if not measured(r):
            out.append((label, "–", _verdict(None)))
        elif r["status"] == "timeout":  # a limit below the target proves nothing
            out.append(
                (label, f"> {r['wall_s']:.1f} s (timeout){_size(r)}", _verdict(None if r["wall_s"] < limit else False))
            )
        else:
            out.append((label, f"{r['wall_s']:.1f} s{_size(r)}", _verdict(r["wall_s"] < limit)))

    merge, peft = find(rows, "7b-attn", "merge"), find(rows, "7b-attn", "peft")
    if measured(merge) and merge.get("floor_ratio") is not None and merge["status"] == "ok":
        out.append(
            (
                "7b-attn merge ≤ 2× I/O floor",
                f"{merge['floor_ratio']:.1f}×{_size(merge)}",
                _verdict(merge["floor_ratio"] <= 2),
            )
        )
    else:
        out.append(("7b-attn merge ≤ 2× I/O floor", "–", _verdict(None)))
    for name in ("7b-attn", "7b-all-linear", "many-clients"):  # ≤ 2× max(I/O floor, arithmetic floor) everywhere
        row = find(rows, name, "merge")
        label = f"{name} merge ≤ 2× max(I/O floor, arithmetic floor)"
        if measured(row) and row["status"] == "ok" and row.get("both_ratio") is not None:
            out.append((label, f"{row['both_ratio']:.1f}×{_size(row)}", _verdict(row["both_ratio"] <= 2)))
    if measured(merge) and merge["status"] == "ok" and peft and peft.get("per_client_s"):
        speedup = peft["per_client_s"] / merge["per_client_s"]
        out.append(
            (
                "7b-attn merge ≥ 1000× faster per client than peft",
                f"{speedup:,.0f}×{_size(merge)}",
                _verdict(speedup >= 1000),
            )
        )
    else:
        out.append(("7b-attn merge ≥ 1000× faster per client than peft", "–", _verdict(None)))
    if merge is not None and merge.get("peak_rss_mb") and merge["status"] == "ok":
        rss, size = merge["peak_rss_mb"], merge["input_mb"]
        out.append(("7b-attn merge peak RSS < 1.5 GB", f"{rss:,.0f} MB{_size(merge)}", _verdict(rss < 1500)))
        out.append(
            (
                "7b-attn merge peak RSS well under the input size (< ½)",
                f"{rss:,.0f} MB vs {size:,.0f} MB of input{_size(merge)}",
                _verdict(rss < 0.5 * size),
            )
        )
    else:
        out += [
            ("7b-attn merge peak RSS < 1.5 GB", "–", _verdict(None)),
            ("7b-attn merge peak RSS well under the input size (< ½)", "–", _verdict(None)),
        ]
    time_target("many-clients exact similarity < 30 s", find(rows, "many-clients", "inspect"), 30)
    time_target("many-clients personalized merge (global) < 3 min", find(rows, "many-clients", "merge"), 180)
    sketch = find(rows, "huge-k", "sketch")
    time_target("huge-k sketched similarity < 60 s", sketch, 60)
    if sketch is not None and sketch.get("max_cos_err") is not None:
        err = sketch["max_cos_err"]
        out.append(
            (
                "huge-k sketch max cosine error ≤ 0.02",
                f"{err:.3g} on {sketch['checked']} clients{_size(sketch)}",
                _verdict(err <= 0.02),
            )
        )
    else:
        out.append(("huge-k sketch max cosine error ≤ 0.02", "–", _verdict(None)))
    return out


def _size(row: Row) -> str:
    return " (QUICK size)" if row.get("quick") else ""


def _wall(row: Row) -> str:
    """A contender's wall time for prose: '61.1 s', or '> 30 s (timeout)'."""
    text = f"{seconds(row['wall_s'])} s"
    return text if row["status"] == "ok" else f"> {text} ({row['status']})"


def speedups(rows: list[Row]) -> dict[str, float]:
    """Per workload, peft's time per client over fedbip's global merge's (both measured in this run)."""
    out = {}
    for merge in (r for r in rows if r["key"] == "merge" and r["status"] == "ok"):
        peft = find(rows, merge["name"], "peft")
        if peft is not None and peft["status"] == "ok" and peft.get("per_client_s"):
            out[merge["name"]] = peft["per_client_s"] / merge["per_client_s"]
    return out


def docs_tables(rows: list[Row]) -> str:
    """docs/performance.md's summary of a run: merges against peft and the floor, similarity, the targets."""
    faster = speedups(rows)
    lines = [
        "| workload | clients | fedbip merge | × I/O floor | arithmetic floor | × max(I/O, arithmetic) | per client "
        "| peft `add_weighted_adapter` svd, per client | peft ÷ fedbip | peak RSS MB | error vs dense float64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for merge in (r for r in rows if r["key"] == "merge"):
        peft = find(rows, merge["name"], "peft")
        cells = [
            merge["workload"],
            f"{merge['clients']:,}",
            cell(merge, "wall s"),
            cell(merge, "× I/O floor"),
            "–" if (arith := find(rows, merge["name"], "arithmetic")) is None else cell(arith, "wall s"),
            cell(merge, "× max floor"),
            cell(merge, "per client s"),
            "–" if peft is None else cell(peft, "per client s"),
            f"**{faster[merge['name']]:,.0f}×**" if merge["name"] in faster else "–",
            cell(merge, "peak RSS MB"),
            cell(merge, "error vs dense reference"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "| similarity | clients | wall s | peak RSS MB | error vs dense float64 cosine |",
        "|---|---:|---:|---:|---|",
    ]
    for row in (r for r in rows if r["key"] in ("inspect", "sketch")):
        cells = [
            f"{row['workload']}: {row['contender']}",
            f"{row['clients']:,}",
            cell(row, "wall s"),
            cell(row, "peak RSS MB"),
            cell(row, "error vs dense reference"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(rows)]
    return "\n".join(lines)


def readme_bullet(rows: list[Row]) -> str:
    """The README's one-line summary of a run: the 7B merge against peft, exact and sketched similarity."""
    said = []
    merge, faster = find(rows, "7b-attn", "merge"), speedups(rows)
    if merge is not None:
        size = f"{merge['input_mb']:,.0f} MB{', QUICK size' if merge.get('quick') else ''}"
        said.append(f"{merge['clients']} clients of a 7B model's attention LoRA ({size}) merged in {_wall(merge)}")
        if "7b-attn" in faster:
            said[-1] += f", **{faster['7b-attn']:,.0f}×** faster per client than peft's `add_weighted_adapter(svd)`"
    for key, name, what in (("inspect", "many-clients", "exact"), ("sketch", "huge-k", "sketched")):
        row = find(rows, name, key)
        if row is not None:
            said.append(f"{what} similarity of {row['clients']:,} clients{_size(row)} in {_wall(row)}")
    return f"- **Fast**: {'; '.join(said)} ([performance](docs/performance.md))."


def write_results(
    path: Path,
    *,
    command: str,
    machine_info: dict[str, str],
    rows: list[Row],
    workload_lines: list[str],
    how: list[str],
    elapsed_s: float,
) -> None:
    """``RESULTS.md``: machine, method, table, targets and workloads of this run."""
    parts = [
        "# fedbip benchmark results",
        "",
        f"Written by `{command}` in {elapsed_s:.0f} s (generation included). Re-run to refresh; QUICK runs "
        "use the smaller workloads named in the table and say so.",
        "",
        "## Machine",
        "",
        *[f"- **{k}**: {v}" for k, v in machine_info.items()],
        "",
        "## Results",
        "",
        table(rows),
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {t} | {m} | {v} |" for t, m, v in targets(rows)],
        "",
        "## Workloads",
        "",
        "| workload | clients | blocks × modules | shapes | r | input MB | generation |",
        "|---|---:|---|---|---:|---:|---|",
        *workload_lines,
        "",
        "## How each number is measured",
        "",
        *[f"- {line}" for line in how],
        "",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
