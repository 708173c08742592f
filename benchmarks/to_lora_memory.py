"""Peak memory of ``fedbip merge --to-lora R`` over full fine-tuned checkpoints.

Each linear weight's personalized deltas M_i = Σ_j P_ij (W_j − W_base) are factored whole (the
randomized SVD needs the whole matrix). The engine now holds the K clients' tensors as stored, one
float64 copy of the base, the sum in progress and one term; it held every client's float64 delta
and every client's float64 sum before (2K float64 copies). This script writes a BERT-shaped base
(random weights, ``--hidden`` wide, 4 × as wide in the MLP) and ``--clients`` fine-tuned copies in
float32, then runs ``fedbip merge --to-lora`` in its own process (``measure.run``: wall time and
peak RSS, and the peak of its anonymous memory, sampled every 5 ms: ru_maxrss also counts the pages
of the checkpoint files it maps), for this checkout and, with ``--ref COMMIT``, for that commit (a
git worktree).

Usage: .venv/bin/python benchmarks/to_lora_memory.py [--clients 8] [--hidden 2048] [--ref COMMIT] [--write-docs]

``--write-docs`` also writes this checkout's figures into docs/full-checkpoints.md (its ``to-lora-memory`` section).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks.docgen import load_note, write_generated  # noqa: E402


def write_models(work: Path, clients: int, hidden: int) -> tuple[Path, Path, int]:
    """A random BERT base and ``clients`` copies, each matrix moved by a low-rank ΔW; returns the
    base, the clients' directory and the elements of the largest linear weight."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    base = work / "base"
    model.save_pretrained(base, safe_serialization=True)
    for c in range(clients):
        generator = torch.Generator().manual_seed(100 + c)
        copy = BertModel.from_pretrained(base).eval()
        with torch.no_grad():
            for _, param in sorted(copy.named_parameters()):
                if param.ndim == 2:
                    rows, cols = param.shape
                    param += (
                        0.01 * torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)
                    )
        copy.save_pretrained(work / "clients" / f"ft{c:02d}", safe_serialization=True)
    return base, work / "clients", 4 * hidden * hidden


# Runs the CLI of the fedbip tree named by the first argument in this process while a thread samples
# RssAnon (memory the process allocated, without the pages of the checkpoint files it maps, which
# ru_maxrss counts and the kernel can drop), then writes the largest value seen (kB) to the file
# named by the second.
ANON_PEAK = """
import sys, threading, time
tree, path, sys.argv = sys.argv[1], sys.argv[2], ["fedbip", *sys.argv[3:]]
sys.path.insert(0, tree)  # before the working directory, which python -c puts first
peak = [0]
def sample():
    while True:
        with open("/proc/self/status") as f:
            peak[0] = max(peak[0], next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from fedbip_cli.cli import main
try:
    main()
finally:
    open(path, "w").write(str(peak[0]))
"""


def measure_merge(tree: Path, base: Path, clients: Path, out: Path, rank: int) -> tuple[measure.Measured, float]:
    """Wall time and peak RSS of one ``merge --to-lora`` run, and its peak anonymous memory (MB)."""
    args = [
        "merge",
        str(clients),
        "--base",
        str(base),
        "--to-lora",
        str(rank),
        "--out",
        str(out),
        "--no-cache",
        "--json",
        "--device",
        "cpu",
    ]
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.NamedTemporaryFile(suffix=".kb") as anon:
        command = [sys.executable, "-c", ANON_PEAK, str(tree), anon.name, *args]
        measured = measure.run(
            command, timeout=1800, env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
        )
        return measured, int(Path(anon.name).read_text() or 0) * 1024 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048, help="the size docs/full-checkpoints.md reports")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ref", help="also measure this git commit (checked out in a temporary worktree)")
    parser.add_argument(
        "--write-docs", action="store_true", help="also write the figures into docs/full-checkpoints.md"
    )
    args = parser.parse_args()
    load = load_note()
    work = Path(tempfile.mkdtemp(prefix="fedbip-to-lora-"))
    base, clients, largest = write_models(work, args.clients, args.hidden)
    size = sum(f.stat().st_size for f in clients.rglob("*.safetensors"))
    print(
        f"{args.clients} checkpoints of {size / args.clients / 1e6:.0f} MB (float32); largest linear weight {largest:,} elements"
    )
    print(
        f"K + 3 float64-equivalent copies of it: {(args.clients * 4 + 3 * 8) * largest / 1e6:.0f} MB; 2K float64: {2 * args.clients * 8 * largest / 1e6:.0f} MB\n"
    )
    rows = [("this checkout", measure_merge(ROOT, base, clients, work / "out", args.rank))]
    if args.ref:
        tree = work / "ref"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.ref],
            check=True,
            capture_output=True,
        )
        try:
            rows.append((f"commit {args.ref}", measure_merge(tree, base, clients, work / "out-ref", args.rank)))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    if args.write_docs:
        measured, anon = rows[0][1]
        held, before = (args.clients * 4 + 3 * 8) * largest / 1e6, 2 * args.clients * 8 * largest / 1e6
        text = (
            f"Measured with `benchmarks/to_lora_memory.py`: {args.clients} float32 BERT-shaped checkpoints of "
            f"{size / args.clients / 1e6:,.0f} MB each (hidden {args.hidden}), `--to-lora {args.rank}`: peak anonymous "
            f"memory of the whole process **{anon:,.0f} MB** ({measured.status}, {measured.wall_s:.0f} s), interpreter and "
            f"libraries included. For scale, computed: the largest linear weight's {args.clients} stored copies and three "
            f"float64 ones are {held:,.0f} MB; every client's float64 delta and sum held at once would be {before:,.0f} MB. "
            f"The process's RSS, {measured.peak_rss_mb:,.0f} MB, also counts the pages of the checkpoint files it maps, "
            "which the kernel can drop."
        )
        write_generated(
            ROOT / "docs" / "full-checkpoints.md",
            "to-lora-memory",
            text,
            load,
        )
    print("| fedbip | status | wall s | peak RSS MB | peak anonymous MB |")
    print("|---|---|---:|---:|---:|")
    for name, (m, anon) in rows:
        print(f"| {name} | {m.status} | {m.wall_s:.1f} | {m.peak_rss_mb:,.0f} | {anon:,.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
