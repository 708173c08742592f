"""The compute cost of a round of every strategy, measured side by side in one process.

The timings a long ``--compare`` run records depend on what else the machine was doing while each
strategy ran; this measures every strategy's round under the same conditions instead. In one
process, on one partition of the limited regime (the defaults: 10 clients, 64 sentences each, 4
local steps of batch 16), each strategy runs ``ROUNDS`` = 3 rounds, evaluated only after the last;
its **second** round is timed, the one that is neither round 1 (which the non-method strategies
share, computed once) nor the last (where a method's post-training phase runs). The post-training
phase (TAP's distillation) is reported apart, per client, from the last round. Reported: a client's
seconds per round, the ratio to FedAvg's measured in the same run, the server step's seconds, and
the bytes a client sends and receives in the round.

    .venv/bin/python benchmarks/method_cost.py [--strategies ...] [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402
from fedbip_cli.simulate.loop import Simulation, SimulationConfig  # noqa: E402
from fedbip_cli.simulate.methods import METHODS  # noqa: E402

ROUNDS = 3
# The regime these costs were first measured in (the label-skew default of earlier versions); a
# round's cost hardly depends on it, but the section's numbers stay those of the command shown.
LABEL_SKEW = SimulationConfig(partition="tasks", alpha=1.0, examples_per_client=64)
STRATEGIES = "fedbip,fedbip-layerwise,fedmerge,tap,fedoa,universal-expert,fedamp,fedavg,local"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=STRATEGIES, help="comma-separated (fedavg is the ratio's baseline)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--clients", type=int, default=10, help="clients (the default's 10; fewer is quicker)")
    parser.add_argument("--write-docs", action="store_true", help="write docs/simulate.md's method-cost section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    note = load_note()
    names = args.strategies.split(",")
    config = replace(
        LABEL_SKEW, strategies=tuple(names), clients=args.clients, rounds=ROUNDS, eval_every=ROUNDS, seed=0
    )
    rows: dict[str, tuple[float, float, float | None, int, int]] = {}
    with tempfile.TemporaryDirectory() as out:
        simulation = Simulation(config, Path(out))
        for name in names:
            run = simulation.run_strategy(name, resume=False)
            timed = run.timings[1]
            clients = timed["client_seconds"]
            per_client = sum(clients.values()) / len(clients)
            last = run.timings[-1]["client_seconds"]
            # a method's post-training phase runs in the last round: its extra time there
            method = METHODS[name](config) if name in METHODS else None
            finish = sum(last.values()) / len(last) - per_client if method and method.finish else None
            second = [r for r in run.metrics if r["round"] == 2]
            up = sum(r["uplink_bytes"] for r in second) // len(second)
            down = sum(r["downlink_bytes"] for r in second) // len(second)
            rows[name] = (per_client, timed["server_seconds"], finish, up, down)
            print(f"{name:18} client {per_client:6.2f} s  server {timed['server_seconds']:7.3f} s", flush=True)
    base = rows.get("fedavg", next(iter(rows.values())))[0]
    lines = [
        "| strategy | client s per round | × FedAvg's | server s per round | post-training s per client "
        "| kB up / down per client-round |",
        "|---|---|---|---|---|---|",
    ]
    for name, (client, server, finish, up, down) in rows.items():
        extra = "–" if finish is None else f"{finish:.1f}"
        lines.append(
            f"| {name} | {client:.2f} | {client / base:.2f} | {server:.3f} | {extra} | {up / 1e3:.0f} / {down / 1e3:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        head = (
            f"One process, {args.threads} torch thread(s), {os.cpu_count()} CPUs; the limited regime "
            f"({config.clients} clients, {config.examples_per_client} sentences each, {config.local_steps} local steps "
            f"of batch {config.batch_size}), seed {config.seed}; round 2 of {ROUNDS} timed."
        )
        write_generated(ROOT / "docs" / "simulate.md", "method-cost", f"{head}\n\n{table}", note)


if __name__ == "__main__":
    main()
