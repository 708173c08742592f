"""A soak of merge's outputs: many merges into one OUT with random kills, and concurrent merges
sharing one inner-product cache.

Phase 1 runs ``--runs`` merges back to back into the same OUT (and lock file), alternating two sets
of adapters, each a real ``python -m fedbip_cli merge`` process that is killed (SIGKILL) at a
random moment with probability ``--kill-rate``. After every run OUT must be byte for byte the old
or the new merge (both known from reference merges), and after every completed run nothing of
fedbip's may be left beside it. Phase 2 runs ``--concurrent`` merges at once, ``--rounds`` times,
into their own OUTs but sharing one ``--cache``, and checks each output against its reference.

Reported: runs, kills, recoveries (runs that started with a killed run's leftovers and ended with
none), bytes lost (bytes of OUT neither the old nor the new merge: must be 0), cache rejections
(entries the cache refused, from ``--json``), and the peak resident memory of one merge. Run:

    python benchmarks/soak.py --quick                # a few minutes
    python benchmarks/soak.py --write-docs           # 200 runs; and write docs/threat-model.md's table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docgen import load_note, write_generated  # noqa: E402
from tests.factories import random_adapter  # noqa: E402

SHAPES = {f"model.layers.{i}.self_attn.{p}_proj": (64, 64) for i in range(4) for p in ("q", "v")}
CLIENTS = 6


@dataclass
class Tally:
    """What a phase saw."""

    runs: int = 0
    kills: int = 0
    recoveries: int = 0
    bytes_lost: int = 0
    rejections: int = 0


def tree(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".fedbip-"))


def sources(root: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for i in range(CLIENTS):
        random_adapter(root / f"set{seed}" / f"c{i}", SHAPES, gen)
    return root / f"set{seed}"


def command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedbip_cli", "merge", str(source), "--out", str(out), "--device", "cpu", *extra]


def run(cmd: list[str], kill: Kill | None = None) -> tuple[int, str]:
    """Run ``cmd``, SIGKILL-ed as ``kill`` says if it is still running then. Returns (code, stdout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    if kill is not None:
        kill.wait(process)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    stdout, stderr = process.communicate()
    if process.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"merge failed ({process.returncode}): {stderr.strip()[-500:]}")
    return process.returncode, stdout


@dataclass
class Kill:
    """When to kill a run: ``delay`` seconds after it starts or, with ``watch``, after a journal of
    fedbip's appears in ``watch`` (the run is writing: staging, swapping or committing)."""

    delay: float
    watch: Path | None = None

    def wait(self, process: subprocess.Popen[str]) -> None:
        while self.watch is not None and process.poll() is None:
            if any(p.name.startswith(".fedbip-journal-") for p in self.watch.iterdir()):
                break
            time.sleep(0.002)
        try:
            process.wait(timeout=self.delay)
        except subprocess.TimeoutExpired:
            pass


def back_to_back(
    root: Path, refs: dict[Path, dict[str, bytes]], runs: int, kill_rate: float, rng: random.Random
) -> Tally:
    """Phase 1: ``runs`` merges into one OUT, alternating sources, some killed at random moments."""
    out, lock = root / "out", root / "fedbip.lock"
    tally = Tally()
    typical = 3.0  # seconds; the median of the completed runs once there are some
    took: list[float] = []
    for i in range(runs):
        source = list(refs)[i % 2]
        before = state(out, lock)
        stale = bool(leftovers(root))
        kill = rng.random() < kill_rate
        start = time.perf_counter()
        # Half the kills land anywhere in the run, half while it writes (where the journal matters).
        when = Kill(rng.uniform(0, typical)) if rng.random() < 0.5 else Kill(rng.uniform(0, 0.2), watch=root)
        code, _ = run(command(source, out, "--lock", str(lock), "--overwrite"), when if kill else None)
        tally.runs += 1
        after = state(out, lock)
        if code == 0:
            took.append(time.perf_counter() - start)
            typical = sorted(took)[len(took) // 2] * 1.2
            tally.recoveries += stale
            assert not leftovers(root), leftovers(root)
        else:
            tally.kills += 1
        if after not in (before, refs[source]):  # OUT and its lock file: both old or both new
            tally.bytes_lost += sum(len(v) for v in before.values())
    return tally


def state(out: Path, lock: Path) -> dict[str, bytes]:
    """OUT's files and the lock file's bytes (the lock's sources named as given, the same in every run)."""
    return {**tree(out), "<lock>": lock.read_bytes() if lock.exists() else b""}


def concurrent(root: Path, refs: dict[Path, dict[str, bytes]], width: int, rounds: int) -> Tally:
    """Phase 2: ``width`` merges at once sharing one cache, ``rounds`` times; each output checked."""
    cache = root / "cache"
    tally = Tally()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(rounds):
        jobs = []
        for k in range(width):
            source = list(refs)[k % 2]
            out = root / f"concurrent-{k}"
            cmd = command(source, out, "--cache", str(cache), "--overwrite", "--json")
            jobs.append(
                (source, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True))
            )
        for source, out, process in jobs:
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"concurrent merge failed: {stderr.strip()[-500:]}")
            tally.runs += 1
            tally.rejections += json.loads(stdout)["cache"]["rejected"]
            if tree(out) != {k: v for k, v in refs[source].items() if k != "<lock>"}:
                tally.bytes_lost += sum(len(v) for v in refs[source].values())
    return tally


def table(phases: dict[str, Tally], peak_mib: float) -> str:
    rows = [
        "| phase | runs | kills | recoveries | bytes lost | cache rejections | peak memory of one merge |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in phases.items():
        rows.append(
            f"| {name} | {t.runs} | {t.kills} | {t.recoveries} | {t.bytes_lost} | {t.rejections} | {peak_mib:.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="merges back to back into one OUT")
    parser.add_argument("--kill-rate", type=float, default=0.4, help="share of those runs killed at a random moment")
    parser.add_argument("--concurrent", type=int, default=4, help="merges at once sharing one cache")
    parser.add_argument("--rounds", type=int, default=10, help="times the concurrent merges are run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="30 runs and 3 concurrent rounds: a few minutes")
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/threat-model.md")
    args = parser.parse_args()
    runs, rounds = (30, 3) if args.quick else (args.runs, args.rounds)
    note = load_note()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs = {}
        for seed in (0, 1):
            source = sources(root / "in", seed)
            run(command(source, root / f"ref{seed}", "--lock", str(root / f"ref{seed}.lock")))
            refs[source] = state(root / f"ref{seed}", root / f"ref{seed}.lock")
        (root / "one").mkdir()
        rng = random.Random(args.seed)
        phases = {
            f"{runs} merges into one OUT, {args.kill_rate:.0%} killed": back_to_back(
                root / "one", refs, runs, args.kill_rate, rng
            ),
            f"{args.concurrent} concurrent merges × {rounds}, one cache": concurrent(
                root, refs, args.concurrent, rounds
            ),
        }
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    text = table(phases, peak_mib)
    print(text)
    if args.write_docs:
        write_generated(ROOT / "docs" / "threat-model.md", "soak", text, note=note)


if __name__ == "__main__":
    main()
