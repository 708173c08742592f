"""How long the fedbip command line takes to answer, against ``python -c "import torch"`` in the same run.

``fedbip --help`` and ``fedbip --version`` import no heavy library (tests/test_startup.py), so they
should cost a small fraction of the torch import. ``inspect-similarity`` on four tiny adapters pays
torch and the rest once: its ratio to the baseline is what a real command adds on top of torch.

Each command runs in a fresh process (interpreter start-up and imports included, as a user pays
them); the time is the median of ``--runs`` runs, taken round-robin so that a busy moment on a
shared machine falls on every command alike, after one untimed run of each to warm the file cache.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--write-docs]

``--write-docs`` also writes the table into docs/cli.md (its ``startup`` section).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from factories import random_adapter  # noqa: E402

from benchmarks.docgen import load_note, write_generated  # noqa: E402

CLIENTS = 4
# A two-block encoder's attention projections: big enough to be a real adapter, small enough that
# the run time is start-up, not arithmetic.
SHAPES = {f"encoder.layer.{block}.attention.self.{name}": (32, 32) for block in range(2) for name in ("query", "value")}
BASELINE = 'python -c "import torch"'


def fedbip() -> list[str]:
    """The installed ``fedbip`` script beside this interpreter, else ``python -m fedbip_cli``."""
    script = Path(sys.executable).parent / "fedbip"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedbip_cli"]


def write_adapters(root: Path, seed: int = 0) -> Path:
    """``CLIENTS`` random rank-2 LoRA adapters over ``SHAPES`` under ``root/adapters``."""
    generator = torch.Generator().manual_seed(seed)
    for client in range(CLIENTS):
        random_adapter(root / "adapters" / f"client{client}", SHAPES, generator)
    return root / "adapters"


def wall_time(command: Sequence[str], env: dict[str, str]) -> float:
    """Seconds from spawn to exit of ``command`` (stdout discarded; a failure raises with its stderr)."""
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (the median is reported)")
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/cli.md")
    args = parser.parse_args()
    runs = args.runs
    load = load_note()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="fedbip-startup-") as tmp:
        adapters = write_adapters(Path(tmp))
        commands = {
            BASELINE: [sys.executable, "-c", "import torch"],
            "fedbip --help": [*fedbip(), "--help"],
            "fedbip --version": [*fedbip(), "--version"],
            # --no-cache: every run computes the similarities instead of reading the first run's.
            f"fedbip inspect-similarity ({CLIENTS} clients)": [
                *fedbip(),
                "inspect-similarity",
                str(adapters),
                "--no-cache",
                "--format",
                "json",
            ],
        }
        for command in commands.values():
            wall_time(command, env)
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(runs):
            for label, command in commands.items():
                times[label].append(wall_time(command, env))
    medians = {label: statistics.median(values) for label, values in times.items()}
    processor = platform.processor() or platform.machine()
    print(f"fedbip start-up, median of {runs} runs; {datetime.date.today()}, {processor}, {os.cpu_count()} CPUs")
    width = max(map(len, medians))
    print(f"{'command':<{width}}  {'seconds':>8}  {'/ import torch':>14}")
    for label, seconds in medians.items():
        print(f"{label:<{width}}  {seconds:>8.3f}  {seconds / medians[BASELINE]:>14.2f}")
    if args.write_docs:
        rows = [
            f"| `{label}` | {seconds:.2f} | {seconds / medians[BASELINE]:.2f}× |" for label, seconds in medians.items()
        ]
        table = "\n".join(
            [f"| command (median of {runs} runs) | seconds | ÷ `import torch` |", "|---|---:|---:|", *rows]
        )
        write_generated(ROOT / "docs" / "cli.md", "startup", table, load)


if __name__ == "__main__":
    main()
