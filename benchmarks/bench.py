"""Issue 4's benchmark: fedbip against the peft path, a dense torch reference and the I/O floor.

For each workload (see ``workloads.py``: seeded fp16 PEFT adapters with planted clusters, cached
under ``benchmarks/.work/``), every contender runs in its own process on the same files, in this
order, with the page cache warm (every input file is read once first):

1. the I/O floor (``floor.py``): read every input byte, write the merged adapters' bytes; and the
   arithmetic floor (``arithmetic.py``): a lower bound of the exact algorithm's float64 operations at
   the machine's float64 GEMM rate, measured in the same run (merges are also reported against the
   larger of the two floors);
2. ``fedbip --version`` (once per run): the start-up every CLI run pays;
3. ``fedbip merge DIR --out OUT --no-cache --json`` (global), the same with ``--layerwise``, and
   ``fedbip inspect-similarity DIR --no-cache --format json`` (stdout to a file, whose rows are
   checked); ``--similarity sketch`` where the CLI offers it (workloads that ask for it);
4. the peft path (``peft_path.py``): ``add_weighted_adapter(..., "svd")`` per client on a one-block
   base, measured on a subset of modules and clients, scaled per module to the workload;
5. the dense reference (``reference.py``): ΔW materialized in float64, weighted sum, SVD, on the
   same subset, scaled the same way; it is also the yardstick of every contender's error.

The peft path and the reference merge with fedbip's own weights P (``fedbip-manifest.json`` of the
global merge; the layer-wise merge's for its check), so every contender computes the same M_i.

Usage:
    python benchmarks/bench.py [--workload NAME]... [--quick] [--device cpu|cuda] [--timeout S]
                               [--seed N] [--skip CONTENDER]... [--work-dir DIR] [--results FILE]
                               [--json FILE] [--write-docs]
    make bench            # every issue workload, full size
    make bench QUICK=1    # the smaller QUICK sizes (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import docgen, measure, report, workloads  # noqa: E402
from benchmarks.contenders import FEDBIP, Run, fedbip_rows, python_rows  # noqa: E402

CONTENDERS = ("floor", "arithmetic", "startup", "merge", "merge-layerwise", "inspect", "sketch", "peft", "dense")


def child_env() -> dict[str, str]:
    """The children's environment: this checkout's package first, offline, no colour, wide help.

    ``OMP_WAIT_POLICY=PASSIVE`` for every contender, as fedbip sets it for itself on import: on a
    shared machine spinning OpenMP threads make torch 10-20x slower whenever another process is
    busy, which would penalize the peft path and the dense reference alone.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1", COLUMNS="200")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def startup_row(args: argparse.Namespace, env: dict[str, str]) -> report.Row:
    """``fedbip --version``: the interpreter start-up and imports that every CLI run pays (once per run)."""
    measured = measure.run([*FEDBIP, "--version"], timeout=args.timeout, env=env)
    return {
        "name": "",
        "workload": "every workload",
        "key": "startup",
        "contender": "fedbip start-up (`--version`)",
        "quick": args.quick,
        "status": measured.status,
        "wall_s": measured.wall_s,
        "peak_rss_mb": measured.peak_rss_mb,
        "error": "",
        "how": "interpreter and imports: paid by every fedbip command below",
    }


def warm_page_cache(directory: Path) -> None:
    """Read every input byte once, so that no contender pays for the first read from disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def run_workload(wl: workloads.Workload, args: argparse.Namespace, env: dict[str, str]) -> tuple[Run, str]:
    """Every contender on one workload; the rows and the workloads-table line."""
    gen = workloads.ensure(wl, args.seed, args.work_dir, regenerate=args.regenerate)
    done = "reused (cached)" if gen.reused else f"{gen.seconds:.1f} s"
    print(
        f"== {wl.key}: {wl.clients} clients, {len(wl.modules())} modules, {gen.input_bytes / 1e6:,.0f} MB of adapters ({done})",
        flush=True,
    )
    runs = gen.root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    warm_page_cache(gen.clients)
    run = Run(wl, gen, runs, args, env)
    fedbip_rows(run)
    python_rows(run)
    shapes = sorted({f"{o}×{i}" for o, i in wl.modules().values()})
    line = (
        f"| {run.label} | {wl.clients:,} | {wl.blocks} × {len(wl.targets)} ({', '.join(wl.targets)}) | {', '.join(shapes)} "
        f"| {wl.rank} | {gen.input_bytes / 1e6:,.1f} | {done}, {wl.clusters} planted clusters |"
    )
    return run, line


HOW = [
    "**Wall time** of a contender: from spawning its process to its exit (Python start-up and imports included, as "
    "a user's command pays them), measured by the harness. **Peak RSS**: the child's own `ru_maxrss` as `os.wait4` "
    "returns it for that process (MB = 10⁶ bytes). Each contender runs alone, one after the other; other engineers "
    "share the machine, so expect some noise.",
    "**Page cache warm**: every input file is read once before the first contender, and the largest workload "
    "(≈ 1.5 GB) fits in RAM many times over, so no contender reads from disk.",
    "Every contender runs with torch's default threads and `OMP_WAIT_POLICY=PASSIVE` (fedbip sets it on import; "
    "the harness sets it for the peft path and the dense reference too, so that contention hurts none of them more).",
    "**I/O floor**: one process reads every input file to the end and writes the merged adapters' bytes (K files of "
    "Σ_modules R·(out+in)·2 bytes each: fp16 factors at rank R) through one 16 MiB buffer, no fsync (fedbip does not "
    "sync either), timed inside the process (no start-up). Merges are compared with read + write, similarity with read alone.",
    "**fedbip**: the CLI as users run it (`python -m fedbip_cli`), `--no-cache` (no inner products from earlier runs), "
    "`--device` as given; `inspect-similarity` writes its JSON to a file (its rows are checked). Per client = wall / K.",
    '**peft path**: peft\'s `add_weighted_adapter(adapters=all K, weights=P_i, combination_type="svd", svd_rank=R)` '
    "(defaults otherwise: `full_matrices=True`), then `save_pretrained` and `delete_adapter`, one call per client, "
    "on a one-block base built with transformers (Llama or a MiniLM-shaped BERT, float32, random init; the MLP width "
    "is the real one only where an MLP module is measured). peft computes Σ_j w_j·(s_j B_j A_j) densely, then the SVD, "
    "so w = P_i gives exactly M_i. Measured on one module per distinct shape of block 0 and the first few clients, "
    "each shape in its own process; the estimate is Σ over shapes (modules of that shape) × (loading K adapters of "
    "one module + K × mean per-client time). Building the base and trimming the adapters are not counted.",
    "**dense reference**: for each measured module, every ΔW_j materialized in float64, M_i += P_ij ΔW_j for the "
    "measured clients, `torch.linalg.svd(M_i, full_matrices=False)`; the estimate is Σ over shapes (modules of that "
    "shape) × (K materializations + K × (mean weighted sum + mean SVD)).",
    "**Errors** (same subset): M_i is the dense float64 merge with the contender's own weights (global or "
    "layer-wise P), M_R its optimal rank-R truncation. For a contender's output X (read from disk; ΔW = s·B@A with "
    "its config's scale, which is 1 for fedbip and peft outputs): `rel` = ‖X − M_R‖_F / ‖M_R‖_F (the largest over "
    "the pairs), `energy` = 1 − ‖M − X‖²_F / ‖M‖²_F next to the optimum Σ_{k≤R} σ_k² / Σ σ_k² (the pair furthest "
    "from it). fedbip writes fp16 like its inputs, so a rel of a few 1e-4 is its storage rounding. Similarity: max |cos − reference| over the first clients' pairs, the reference from dense "
    "flattened ΔW of every module in float64.",
    "**Scaled** numbers are marked ≈ and their peak RSS '(subset)'; the how column says what was measured.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=list(workloads.WORKLOADS),
        help="run this workload (repeatable; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="the smaller QUICK sizes")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="passed to fedbip, the peft path and the dense reference",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds any contender may run before it is recorded as 'timeout' (default 900; "
        "with --quick, 30 for fedbip's commands and 300 for the peft path and dense reference)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated adapters (default 0)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=CONTENDERS, help="leave a contender out (repeatable)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "benchmarks" / ".work", help="generated adapters and outputs"
    )
    parser.add_argument("--regenerate", action="store_true", help="regenerate the adapters even when cached")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="where to write the markdown report"
    )
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the summary into docs/performance.md and README.md (their 'bench' sections)",
    )
    args = parser.parse_args(argv)
    limits = workloads.TIMEOUTS["quick" if args.quick else "full"]
    args.timeout, args.baseline_timeout = limits if args.timeout is None else (args.timeout, args.timeout)
    start = time.perf_counter()
    load = docgen.load_note()
    env = child_env()
    info = report.machine(ROOT)
    rows = [startup_row(args, env)] if "startup" not in args.skip else []
    lines = []
    for name in args.workload or workloads.DEFAULT_WORKLOADS:
        run, line = run_workload(workloads.workload(name, quick=args.quick), args, env)
        rows += run.rows
        lines.append(line)
    elapsed = time.perf_counter() - start
    print()
    print(report.table(rows))
    print()
    for target, value, verdict in report.targets(rows):
        print(f"{target}: {value} — {verdict}")
    print(f"\n(total {elapsed:.0f} s)")
    command = "python " + docgen.invocation(None if argv is None else [sys.argv[0], *argv])
    limits = (
        f"**Time limits**: fedbip's commands {args.timeout:.0f} s each, the peft path and the dense reference "
        f"{args.baseline_timeout:.0f} s; a contender past its limit is killed and shown as timeout, with the limit as its wall time."
    )
    report.write_results(
        args.results,
        command=command,
        machine_info=info,
        rows=rows,
        workload_lines=lines,
        how=[*HOW, limits],
        elapsed_s=elapsed,
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "elapsed_s": elapsed}, indent=1) + "\n")
    if args.write_docs:
        note = f"{info['CPU']}; {load}"
        body = f"`{command}`, {elapsed:.0f} s in all (generation included):\n\n{report.docs_tables(rows)}"
        docgen.write_generated(ROOT / "docs" / "performance.md", "bench", body, note)
        docgen.write_generated(ROOT / "README.md", "bench", report.readme_bullet(rows), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
