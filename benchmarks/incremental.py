"""Incremental re-merge: one adapter added to 200, cold vs warm inner-product cache.

Writes 201 synthetic LoRA adapters the shape of all-MiniLM-L6-v2's attention (width 384, 6 blocks,
r = 8 on query and value: 12 modules) with ``tests/factories.random_adapter``, then times
``fedbip inspect-similarity`` end to end (a subprocess, as CI runs it):

1. 200 clients, empty cache (fills it);
2. the 201st client added, warm cache: only its row is computed (12 x 201 inner products);
3. the same 201 clients, empty cache: the cold baseline (12 x 201 x 202 / 2 products);
4. the same 201 clients, ``--no-cache``.

Warm and cold must print the same similarities, bit for bit; the script checks it. The similarity
step alone is also timed in process (``pipeline.inspect``), without start-up, validation and
hashing, and so are plain float64 stacked Grams (all K² products of a module from two (Σr x Σr)
GEMMs, as the engine's exact Grams are, but in one rounding each, whose bits depend on which clients
are stacked together: not cacheable). Ratios are against the cold run measured here, in the same process.

Usage: .venv/bin/python benchmarks/incremental.py [--clients 200] [--workdir DIR] [--write-docs]

``--write-docs`` also writes the table into docs/ci-and-hub.md (its ``incremental`` section).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from factories import random_adapter  # noqa: E402

from benchmarks.docgen import load_note, write_generated  # noqa: E402
from fedbip_cli import pipeline  # noqa: E402
from fedbip_cli.innercache import InnerProductCache  # noqa: E402

WIDTH, BLOCKS, RANK = 384, 6, 8
SHAPES = {f"encoder.layer.{b}.attention.self.{m}": (WIDTH, WIDTH) for b in range(BLOCKS) for m in ("query", "value")}


def make_adapters(root: Path, count: int) -> None:
    for i in range(count):
        random_adapter(root / f"client{i:03d}", SHAPES, torch.Generator().manual_seed(i), r=RANK, lora_alpha=16)


def inspect_cli(clients: Path, *cache_args: str) -> tuple[float, dict]:
    """Wall time of one ``fedbip inspect-similarity --format json`` run, and its output."""
    command = [
        sys.executable,
        "-m",
        "fedbip_cli",
        "inspect-similarity",
        str(clients),
        "--format",
        "json",
        "--device",
        "cpu",
        *cache_args,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(done.stdout)


def inspect_in_process(clients: Path, cache: InnerProductCache) -> float:
    workspace = pipeline.load([str(clients)])
    start = time.perf_counter()
    pipeline.inspect(workspace, device="cpu", cache=cache)
    return time.perf_counter() - start


def stacked_gram_seconds(clients: Path) -> float:
    """All K² products per module from two plain float64 stacked Grams (not bit-stable, for reference)."""
    workspace = pipeline.load([str(clients)])
    factors = {m: [a.factors(m) for a in workspace.adapters] for m in workspace.modules}
    start = time.perf_counter()
    for module_factors in factors.values():
        b = torch.cat([f[0] for f in module_factors], dim=1)
        a = torch.cat([f[1] for f in module_factors], dim=0)
        owner = torch.repeat_interleave(torch.eye(len(module_factors), dtype=torch.float64), RANK, dim=0)
        owner.T @ ((b.T @ b) * (a @ a.T)) @ owner
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="clients before the one that is added")
    parser.add_argument(
        "--workdir", type=Path, help="where to write the adapters and caches (default: a temporary directory)"
    )
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/ci-and-hub.md")
    args = parser.parse_args()
    load = load_note()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedbip-incremental-"))
    clients, pending = work / "clients", work / "pending"
    shutil.rmtree(clients, ignore_errors=True)
    shutil.rmtree(pending, ignore_errors=True)
    k = args.clients
    torch.set_num_threads(1)  # the CLI runs below use torch's default; this only concerns the in-process part

    start = time.perf_counter()
    make_adapters(pending, k + 1)
    clients.mkdir(parents=True)
    for path in sorted(pending.iterdir())[:k]:
        path.rename(clients / path.name)
    print(
        f"wrote {k + 1} adapters ({len(SHAPES)} modules, r={RANK}, width {WIDTH}) in {time.perf_counter() - start:.1f} s"
    )

    caches = {name: work / name for name in ("cache-warm", "cache-cold", "cache-process-warm", "cache-process-cold")}
    for path in caches.values():
        shutil.rmtree(path, ignore_errors=True)
    first, _ = inspect_cli(clients, "--cache", str(caches["cache-warm"]))
    in_process_fill = inspect_in_process(clients, InnerProductCache(caches["cache-process-warm"]))
    newcomer = next(pending.iterdir())
    newcomer.rename(clients / newcomer.name)

    warm, warm_json = inspect_cli(clients, "--cache", str(caches["cache-warm"]))
    cold, cold_json = inspect_cli(clients, "--cache", str(caches["cache-cold"]))
    uncached, uncached_json = inspect_cli(clients, "--no-cache")
    in_process_warm = inspect_in_process(clients, InnerProductCache(caches["cache-process-warm"]))
    in_process_cold = inspect_in_process(clients, InnerProductCache(caches["cache-process-cold"]))
    gram = stacked_gram_seconds(clients)

    stats = {"warm": warm_json.pop("cache"), "cold": cold_json.pop("cache"), "no-cache": uncached_json.pop("cache")}
    assert warm_json == cold_json == uncached_json, "warm, cold and uncached similarities differ"
    modules = len(SHAPES)
    assert stats["warm"]["computed"] == modules * (k + 1), stats
    assert stats["cold"]["computed"] == modules * (k + 1) * (k + 2) // 2, stats

    lines = [
        f"{k} clients + 1 added, {modules} modules; warm, cold and `--no-cache` give the same similarities bit for bit:",
        "",
        f"| run ({k + 1} clients unless said) | wall s | inner products computed | read from cache | vs cold |",
        "|---|---:|---:|---:|---:|",
        f"| `inspect-similarity`, {k} clients, empty cache | {first:.2f} | | | |",
    ]
    for name, seconds in (("cold (empty cache)", cold), ("warm (one client added)", warm), ("`--no-cache`", uncached)):
        key = name.split()[0].strip("`")
        s = stats["no-cache" if key == "--no-cache" else key]
        lines.append(
            f"| `inspect-similarity`, {name} | {seconds:.2f} | {s['computed']:,} | {s['hits']:,} | {cold / seconds:.1f}x |"
        )
    lines += [
        f"| similarity step in process, cold | {in_process_cold:.2f} | | | 1.0x |",
        f"| similarity step in process, warm | {in_process_warm:.2f} | | | {in_process_cold / in_process_warm:.1f}x |",
        f"| plain float64 stacked Grams, all K² products (not bit-stable), in process | {gram:.2f} | | "
        f"| {in_process_cold / gram:.1f}x |",
    ]
    print("\n" + "\n".join(lines))
    if args.write_docs:
        note = f"the in-process rows with 1 torch thread; {load}"
        write_generated(
            ROOT / "docs" / "ci-and-hub.md",
            "incremental",
            "\n".join(lines),
            note,
        )
    print(f"\n(in-process fill of the {k}-client cache: {in_process_fill:.2f} s; adapters and caches in {work})")


if __name__ == "__main__":
    main()
