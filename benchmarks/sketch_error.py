"""Sketched similarity (``--similarity sketch``) against the exact cosine, for 10 000 adapters.

Writes K synthetic LoRA adapters (fp16 safetensors, as peft saves them) at all-MiniLM-L6-v2's
attention widths: 6 blocks x (query, value), 384 x 384, r = 8, lora_alpha 16. The clients have a
planted cluster structure: 10 clusters; per module, client = shared part + its cluster's centre +
noise at a per-client level (factors B and A alike), so that whole-model cosines within a cluster
spread over about 0.2 - 0.9 and across clusters over 0 - 0.04. Every 10th client has rank 4, every 7th uses
rsLoRA, every 9th lacks one module (a zero delta there). Client i depends only on (seed, i), so the
first 1000 clients of a 10 000 set are the 1000-client set.

For each sketch dimension M, a child process runs ``pipeline.load`` and ``pipeline.inspect(...,
similarity="sketch", sketch_dim=M)`` on all K clients at granularity model (wall times and its peak
RSS), and on the first ``--finer`` clients at granularities block and module. The checked clients
(the first ``--checked``) are compared with a dense float64 reference written here: every ΔW
materialised from the files (scale · B @ A, peft's rule), flattened, and multiplied out; every pair
among the checked clients and of a checked client with any other is counted. The baseline is the
exact engine (``similarity="exact"``, no cache) on the checked clients alone, timed in this run and
extrapolated as K²; its cosines also check the dense reference.

``--compare`` also measures the sketch alternatives at equal size (M² numbers per module) on the
checked clients, in float64: a two-sided Gaussian M x M sketch, the same orthogonalized, 4 and 16
orthogonal blocks, fedbip's (float64, and its int8 codes as run), a one-sided B (A Ω) sketch and a
rank-1 (Kronecker) JL projection.

Usage:
    .venv/bin/python benchmarks/sketch_error.py [--clients 10000] [--checked 300] [--dims 16,32,64,96,128]
        [--workdir DIR] [--compare] [--quick] [--write-docs]
QUICK=1 in the environment, or --quick: 1000 clients, 100 checked (``make bench QUICK=1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from factories import PREFIX, pattern_value, write_lora_adapter  # noqa: E402

from benchmarks.docgen import load_note, write_generated  # noqa: E402
from fedbip_cli import pipeline  # noqa: E402
from fedbip_cli.sketch import Projection, one_thread, orthogonal_columns, projection, quantize, sketch_factors  # noqa: E402

WIDTH, BLOCKS, RANK, ALPHA, CLUSTERS = 384, 6, 8, 16, 10
MODULES = [f"encoder.layer.{b}.attention.self.{m}" for b in range(BLOCKS) for m in ("query", "value")]
GROUPINGS = {
    "model": {"model": MODULES},
    "block": {f"encoder.layer.{b}": MODULES[2 * b : 2 * b + 2] for b in range(BLOCKS)},
    "module": {m: [m] for m in MODULES},
}
DATA_VERSION = 1  # bump when the generated clients change


# --- the clients ---------------------------------------------------------------------------------


def centres(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per module: shared B, shared A, and the clusters' B and A centres (float64)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in MODULES:
        out[module] = (
            torch.randn(WIDTH, RANK, generator=gen, dtype=torch.float64),
            torch.randn(RANK, WIDTH, generator=gen, dtype=torch.float64),
            torch.randn(CLUSTERS, WIDTH, RANK, generator=gen, dtype=torch.float64),
            torch.randn(CLUSTERS, RANK, WIDTH, generator=gen, dtype=torch.float64),
        )
    return out


def write_client(directory: Path, i: int, seed: int, centre: dict) -> None:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
    cluster, level = i % CLUSTERS, 0.25 + ((i * 7919) % 101) / 100
    rank = 4 if i % 10 == 9 else RANK
    missing = MODULES[-1] if i % 9 == 4 else None
    factors = {}
    for module in MODULES:
        if module == missing:
            continue
        bs, as_, bc, ac = centre[module]
        b = 0.5 * bs + bc[cluster] + level * torch.randn(WIDTH, RANK, generator=gen, dtype=torch.float64)
        a = 0.5 * as_ + ac[cluster] + level * torch.randn(RANK, WIDTH, generator=gen, dtype=torch.float64)
        factors[module] = (a[:rank] / math.sqrt(WIDTH), b[:, :rank] * 0.05)
    write_lora_adapter(
        directory,
        factors,
        r=rank,
        lora_alpha=ALPHA,
        use_rslora=i % 7 == 3,
        target_modules=["query", "value"],
        dtype=torch.float16,
    )


def clients(workdir: Path, count: int, seed: int) -> list[Path]:
    """The first ``count`` client directories under ``workdir``, written where missing."""
    root = workdir / f"clients-v{DATA_VERSION}-s{seed}"
    marker = root / "written.json"
    written = json.loads(marker.read_text())["count"] if marker.exists() else 0
    paths = [root / f"client{i:05d}" for i in range(count)]
    if written < count:
        start = time.perf_counter()
        centre = centres(seed)
        for i in range(written, count):
            write_client(paths[i], i, seed, centre)
        marker.write_text(json.dumps({"count": count}))
        print(f"wrote clients {written}..{count - 1} to {root} in {time.perf_counter() - start:.1f} s", flush=True)
    return paths


# --- the dense float64 reference -----------------------------------------------------------------


def dense_deltas(paths: list[Path], module: str, configs: list[dict]) -> torch.Tensor:
    """(len(paths), d·k) float64: each client's ΔW = scale · B @ A at ``module``, flattened (0 if absent)."""
    out = torch.zeros(len(paths), WIDTH * WIDTH, dtype=torch.float64)
    with one_thread():  # small products: a second thread only waits (see fedbip_cli.sketch.one_thread)
        for row, (path, config) in enumerate(zip(paths, configs)):
            with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
                if f"{PREFIX}{module}.lora_A.weight" not in f.keys():
                    continue
                a = f.get_tensor(f"{PREFIX}{module}.lora_A.weight").to(torch.float64)
                b = f.get_tensor(f"{PREFIX}{module}.lora_B.weight").to(torch.float64)
            r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            out[row] = (scale * (b @ a)).reshape(-1)
    return out


def reference(
    workdir: Path, paths: list[Path], checked: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (checked x K) inner products of the dense ΔW and every client's squared norm."""
    cache = workdir / f"reference-v{DATA_VERSION}-s{seed}-k{len(paths)}-c{checked}.pt"
    if cache.exists():
        return torch.load(cache)
    start = time.perf_counter()
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in paths]
    out = {}
    for module in MODULES:
        rows = dense_deltas(paths[:checked], module, configs[:checked])
        inner = torch.empty(checked, len(paths), dtype=torch.float64)
        norms2 = torch.empty(len(paths), dtype=torch.float64)
        for first in range(0, len(paths), 256):
            chunk = dense_deltas(paths[first : first + 256], module, configs[first : first + 256])
            inner[:, first : first + len(chunk)] = rows @ chunk.T
            norms2[first : first + len(chunk)] = (chunk * chunk).sum(dim=1)
        out[module] = (inner, norms2)
    torch.save(out, cache)
    print(
        f"dense float64 reference ({checked} x {len(paths)} pairs, {len(MODULES)} modules) in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return out


def exact_cosines(ref: dict, members: list[str], count: int) -> torch.Tensor:
    """(checked x count) exact cosines of one group; a zero task vector has cosine 0 with others, 1 with itself."""
    inner = sum(ref[m][0][:, :count] for m in members)
    norms = sum(ref[m][1][:count] for m in members).sqrt()
    rows = inner.shape[0]
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = inner / safe[:rows, None] / safe[None, :]
    cosine[norms[:rows] == 0, :] = 0.0
    cosine[:, norms == 0] = 0.0
    cosine[torch.arange(rows), torch.arange(rows)] = 1.0
    return cosine


def errors(sketched: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Max and mean |error| over the pairs of a checked client with another client (self pairs left out)."""
    rows = exact.shape[0]
    keep = torch.ones_like(exact, dtype=torch.bool)
    keep[torch.arange(rows), torch.arange(rows)] = False
    err = (sketched - exact).abs()[keep]
    return {"max": err.max().item(), "mean": err.mean().item(), "pairs": int(err.numel())}


def exact_baseline(paths: list[Path], dense: torch.Tensor) -> float:
    """Seconds of the exact engine's similarity step on ``paths``; its cosines must match ``dense``."""
    workspace = pipeline.load([str(p) for p in paths])
    start = time.perf_counter()
    result = pipeline.inspect(workspace, device="cpu")
    seconds = time.perf_counter() - start
    gap = float((result.groups["model"].similarity - dense).abs().max())
    assert gap < 1e-9, f"the exact engine and the dense reference differ by {gap}"
    print(f"exact engine on {len(paths)} clients: {seconds:.1f} s, within {gap:.1e} of the dense reference", flush=True)
    return seconds


# --- the sketch, in a child process (its time and peak memory alone) -----------------------------


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    workspace = pipeline.load([f"@{args.sources}"])
    loaded = time.perf_counter()
    result = pipeline.inspect(
        workspace, granularity=args.granularity, device="cpu", similarity="sketch", sketch_dim=args.dim
    )
    done = time.perf_counter()
    rows = {name: g.similarity[: args.rows].clone() for name, g in result.groups.items()}
    torch.save(rows, args.out)
    print(json.dumps({"load_s": loaded - start, "similarity_s": done - loaded, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it does not count the parent's
    memory that a spawned child shares until its exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def run_child(
    paths: list[Path], dim: int, granularity: str, rows: int, threads: int, scratch: Path
) -> tuple[dict, dict]:
    listing = scratch / f"sources-{len(paths)}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    out = scratch / "rows.pt"
    command = [
        sys.executable,
        __file__,
        "--child",
        "--sources",
        str(listing),
        "--dim",
        str(dim),
        "--granularity",
        granularity,
    ]
    command += ["--rows", str(rows), "--out", str(out), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)


# --- the alternatives, at equal size -------------------------------------------------------------

Sketcher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # stacked (scale · B, A) of one rank -> features


def one_sided(dim: int, gen: torch.Generator, module: str) -> Sketcher:
    """B (A Ω) with Ω Gaussian (k x M²/d): d · M²/d numbers."""
    columns = max(1, dim * dim // WIDTH)
    omega = torch.randn(WIDTH, columns, generator=gen, dtype=torch.float64) / math.sqrt(columns)
    return lambda b, a: (b @ (a @ omega)).reshape(len(b), -1)


def rank_one(dim: int, gen: torch.Generator, module: str) -> Sketcher:
    """ψ_fᵀ B A ω_f for M² independent Gaussian pairs (a Kronecker-structured JL projection)."""
    psi = torch.randn(WIDTH, dim * dim, generator=gen, dtype=torch.float64)
    omega = torch.randn(WIDTH, dim * dim, generator=gen, dtype=torch.float64)
    return lambda b, a: ((psi.T @ b) * (a @ omega).transpose(1, 2)).sum(dim=2) / dim


def blocks(count: int, *, orthogonal: bool = True) -> Callable[[int, torch.Generator, str], Sketcher]:
    """count² two-sided blocks of (M / count)², orthogonal columns or Gaussian ones."""

    def prepare(dim: int, gen: torch.Generator, module: str) -> Sketcher:
        draw = orthogonal_columns if orthogonal else lambda n, c, g: torch.randn(n, c, generator=g, dtype=torch.float64)
        proj = Projection(draw(WIDTH, count * dim, gen), draw(WIDTH, count * dim, gen), dim, count)
        return lambda b, a: sketch_factors(b, a, proj)

    return prepare


def fedbip(*, codes: bool) -> Callable[[int, torch.Generator, str], Sketcher]:
    """The library's projections of ``module``, in float64 or as its float32 sketch's int8 codes."""

    def prepare(dim: int, gen: torch.Generator, module: str) -> Sketcher:
        proj = projection(gen.initial_seed(), module, WIDTH, WIDTH, dim)
        if not codes:
            return lambda b, a: sketch_factors(b, a, proj)

        def dequantized(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            q, scale = quantize(sketch_factors(b.float(), a.float(), proj))
            return q.to(torch.float64) * scale[:, None]

        return dequantized

    return prepare


def compare(paths: list[Path], ref: dict, dims: list[int], seeds: int) -> str:
    """Errors of the alternatives over every pair of checked clients, all of ``seeds`` seeds: the markdown
    table (also printed, row by row)."""
    checked = ref[MODULES[0]][0].shape[0]
    workspace = pipeline.load([str(p) for p in paths[:checked]])
    by_rank: dict[str, dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]] = {}
    for module in MODULES:
        present = [(i, *a.factors(module)) for i, a in enumerate(workspace.adapters) if module in a.modules]
        by_rank[module] = {}
        for rank in sorted({b.shape[1] for _, b, _ in present}):
            members = [(i, b, a) for i, b, a in present if b.shape[1] == rank]
            by_rank[module][rank] = (
                [i for i, _, _ in members],
                torch.stack([b for _, b, _ in members]),
                torch.stack([a for _, _, a in members]),
            )
    exact = {
        g: {name: exact_cosines(ref, members, checked) for name, members in GROUPINGS[g].items()}
        for g in ("model", "module")
    }
    r, d = RANK, WIDTH

    def two_sided(count: int) -> Callable[[int], float]:
        return lambda dim: r * 2 * d * count * dim + r * dim * dim

    # name -> (projections of a module for a dimension and generator, multiply-adds per client and module)
    variants: dict[str, tuple[Callable[[int, torch.Generator, str], Sketcher], Callable[[int], float]]] = {
        "two-sided Gaussian M x M": (blocks(1, orthogonal=False), two_sided(1)),
        "two-sided orthogonal M x M": (blocks(1), two_sided(1)),
        "4 orthogonal blocks (M/2)²": (blocks(2), two_sided(2)),
        "16 orthogonal blocks (M/4)²": (blocks(4), two_sided(4)),
        "fedbip, float64": (fedbip(codes=False), lambda dim: two_sided(projection(0, "m", d, d, dim).blocks)(dim)),
        "fedbip, int8 codes (as run)": (
            fedbip(codes=True),
            lambda dim: two_sided(projection(0, "m", d, d, dim).blocks)(dim),
        ),
        "one-sided B (A Ω), d x M²/d": (one_sided, lambda dim: r * 2 * d * max(1, dim * dim // d)),
        "rank-1 JL (Kronecker), M² pairs": (rank_one, lambda dim: r * 2 * d * dim * dim),
    }
    upper = torch.triu(torch.ones(checked, checked, dtype=torch.bool), diagonal=1)
    lines = [
        f"Alternatives at about equal size, {checked} clients, {checked * (checked - 1) // 2} pairs x {seeds} seeds "
        "(|error| of the cosine: mean and max; work: multiply-adds per client and module):",
        "",
        "| sketch | M | numbers per module | work | model: mean | model: max | module: mean | module: max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n" + "\n".join(lines))
    for dim in dims:
        for name, (prepare, work) in variants.items():
            found: dict[str, list[torch.Tensor]] = {"model": [], "module": []}
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(1000 + seed)
                grams = {}
                for module in MODULES:
                    sketcher = prepare(dim, gen, module)  # one projection for every client of the module
                    parts = [(rows, sketcher(b, a)) for rows, b, a in by_rank[module].values()]
                    features = torch.zeros(checked, parts[0][1].shape[1], dtype=torch.float64)
                    for rows, part in parts:
                        features[torch.tensor(rows)] = part
                    grams[module] = features @ features.T
                for g in found:
                    for group, members in GROUPINGS[g].items():
                        gram = sum(grams[m] for m in members)
                        norms = gram.diagonal().sqrt()
                        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
                        cosine = gram / safe[:, None] / safe[None, :]
                        both = (norms[:, None] > 0) & (norms[None, :] > 0) & upper
                        found[g].append((cosine - exact[g][group][:, :checked]).abs()[both])
            model, module = torch.cat(found["model"]), torch.cat(found["module"])
            lines.append(
                f"| {name} | {dim} | {features.shape[1]} | {work(dim) / 1e6:.2f}M | {model.mean():.4f} | {model.max():.4f} | "
                f"{module.mean():.4f} | {module.max():.4f} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument(
        "--checked", type=int, default=300, help="clients compared with the dense reference (all their pairs)"
    )
    parser.add_argument("--finer", type=int, default=1000, help="clients sketched at granularity block and module")
    parser.add_argument("--dims", default="16,32,64,96,128", help="sketch dimensions M, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated clients")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the sketch runs")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the adapters and the reference are kept and reused (default: a temporary directory)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also measure the sketch alternatives at equal size on the checked clients",
    )
    parser.add_argument("--compare-seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1000 clients, 100 checked (also QUICK=1)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--write-docs", action="store_true", help="also write the tables into docs/inspect.md (with --compare, both)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sources", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--granularity", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick or os.environ.get("QUICK") == "1":
        args.clients, args.checked = 1000, 100
    torch.set_num_threads(args.threads)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        measure(args, args.workdir)
        print(f"\n(adapters and reference kept in {args.workdir})")
        return
    with tempfile.TemporaryDirectory(prefix="fedbip-sketch-") as workdir:
        measure(args, Path(workdir))


def measure(args: argparse.Namespace, workdir: Path) -> None:
    """Write (or reuse) the clients and the reference in ``workdir``; print the tables."""
    dims = [int(x) for x in args.dims.split(",")]
    paths = clients(workdir, args.clients, args.seed)
    ref = reference(workdir, paths, args.checked, args.seed)
    finer = min(args.finer, args.clients)
    exact = {
        g: {
            name: exact_cosines(ref, members, args.clients if g == "model" else finer)
            for name, members in GROUPINGS[g].items()
        }
        for g in GROUPINGS
    }
    model = exact["model"]["model"]
    same = (torch.arange(args.checked)[:, None] % CLUSTERS) == (torch.arange(args.clients)[None, :] % CLUSTERS)
    same[torch.arange(args.checked), torch.arange(args.checked)] = False
    other = (torch.arange(args.checked)[:, None] % CLUSTERS) != (torch.arange(args.clients)[None, :] % CLUSTERS)
    data = (
        f"{args.clients} clients, {len(MODULES)} modules of {WIDTH} x {WIDTH}; exact whole-model cosine: within a cluster "
        f"mean {model[same].mean():.3f} (range {model[same].min():.3f} .. {model[same].max():.3f}), across clusters mean "
        f"{model[other].mean():.3f} (range {model[other].min():.3f} .. {model[other].max():.3f})"
    )
    print(data, flush=True)
    load = load_note()
    print(f"{load} ({os.cpu_count()} cores)", flush=True)
    baseline = exact_baseline(paths[: args.checked], exact["model"]["model"][:, : args.checked])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedbip-sketch-run-") as scratch:
        for dim in dims:
            timing, sketched = run_child(paths, dim, "model", args.checked, args.threads, Path(scratch))
            row = {"dim": dim, **timing, "model": errors(sketched["model"], model)}
            for g in ("block", "module"):
                _, finer_rows = run_child(paths[:finer], dim, g, args.checked, args.threads, Path(scratch))
                worst = [errors(finer_rows[name], exact[g][name]) for name in GROUPINGS[g]]
                row[g] = {
                    "max": max(w["max"] for w in worst),
                    "mean": sum(w["mean"] * w["pairs"] for w in worst) / sum(w["pairs"] for w in worst),
                    "pairs": sum(w["pairs"] for w in worst),
                }
            rows.append(row)
            print(
                f"M={dim}: load {row['load_s']:.1f} s, similarity {row['similarity_s']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB; "
                f"model max {row['model']['max']:.4f} mean {row['model']['mean']:.4f}",
                flush=True,
            )

    ended = f"load average {os.getloadavg()[0]:.1f} at the end"
    print(ended)
    extrapolated = baseline * (args.clients / args.checked) ** 2
    lines = [
        f"{data}. Baseline: the exact engine on the {args.checked} checked clients took {baseline:.1f} s (similarity "
        f"step, in process); as K², {args.clients} clients would take about {extrapolated:.0f} s. Errors |sketched − "
        f"exact| of the cosine over the pairs of the {args.checked} checked clients with every other client (model: "
        f"{rows[0]['model']['pairs']:,} pairs) and, per block and per module, with the first {finer} clients "
        f"({rows[0]['block']['pairs']:,} and {rows[0]['module']['pairs']:,} pairs over the groups); times with "
        f"{args.threads} torch threads:",
        "",
        "| M | numbers per module | load s | similarity s | vs exact | peak RSS MiB | model: max | model: mean "
        "| block: max | block: mean | module: max | module: mean |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['dim'] ** 2} | {row['load_s']:.1f} | {row['similarity_s']:.1f} | {extrapolated / row['similarity_s']:.0f}x | {row['peak_rss_mib']:.0f} | "
            f"{row['model']['max']:.4f} | {row['model']['mean']:.4f} | {row['block']['max']:.4f} | {row['block']['mean']:.4f} | "
            f"{row['module']['max']:.4f} | {row['module']['mean']:.4f} |"
        )
    print("\n" + "\n".join(lines))
    if args.write_docs:
        write_generated(ROOT / "docs" / "inspect.md", "sketch-error", "\n".join(lines), f"{load}; {ended}")
    if args.json is not None:
        record = {
            "clients": args.clients,
            "checked": args.checked,
            "finer": finer,
            "exact_checked_s": baseline,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if args.compare:
        table = compare(paths, ref, dims, args.compare_seeds)
        if args.write_docs:
            write_generated(ROOT / "docs" / "inspect.md", "sketch-compare", table)


if __name__ == "__main__":
    main()
