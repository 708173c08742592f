"""Per-round overhead of Flower against the in-process loop, on the same ``fedbip simulate`` run.

Each engine runs the same options at two round counts, R1 and R2 (default 1 and 3); its time per
round is (T(R2) - T(R1)) / (R2 - R1), so that the fixed costs (Ray's start, processes, the server's
model load, writing the outputs) cancel out, and they are reported apart as T(R1) - R1 x per round.
Both runs evaluate once, after their last round (``eval_every`` is set above R2). Flower's overhead
per round is its time per round minus the in-process one. The engines:

- inprocess: ``fedbip simulate`` (``runner.simulate``), every client in this process, in turn;
- simulation: Flower's Simulation Engine (``--engine flower``), ClientApps on Ray, one CPU each;
- deployment: a SuperLink and one SuperNode per client as processes on 127.0.0.1 and ``flwr run``
  (``flower.local.LocalFederation``); each message to a SuperNode starts a new ClientApp process, fedbip's
  light relay (``flower.relay``), which hands it to the SuperNode's long-lived worker: the libraries,
  data and model stay loaded across messages;
- deployment-subprocess: the same with ``FEDBIP_FLOWER_WORKER=0``, as before the worker: each ClientApp
  process imports torch, transformers and peft and loads its data and model itself.

Every process uses ``--threads`` intra-op threads (default 1: the engines then give the same bits,
which the benchmark checks; Flower runs several clients at once on a machine's cores).

    .venv/bin/python benchmarks/flower_overhead.py                 # the default run: 10 clients, 6 layers
    .venv/bin/python benchmarks/flower_overhead.py --quick         # the tests' tiny run: 3 clients, 2 layers
    .venv/bin/python benchmarks/flower_overhead.py --write-docs    # the default run, into docs/flower.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from fedbip_cli.simulate.flower import OFFLINE_ENV  # before flwr is imported  # isort: skip

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedbip_cli.simulate.flower.engine import simulate_on_flower  # noqa: E402
from fedbip_cli.simulate.flower.local import LocalFederation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402
from fedbip_cli.simulate.loop import SimulationConfig  # noqa: E402
from fedbip_cli.simulate.runner import simulate  # noqa: E402

# The label-skew regime these engine costs were measured in (a round's cost hardly depends on it).
FULL = SimulationConfig(partition="tasks", alpha=1.0, examples_per_client=64)
QUICK = replace(FULL, num_layers=2, batch_size=8, local_steps=2, clients=3)


def run_inprocess(config: SimulationConfig, out: Path) -> float:
    start = time.perf_counter()
    simulate(config, out, device="cpu")
    return time.perf_counter() - start


def run_simulation_engine(config: SimulationConfig, out: Path) -> float:
    start = time.perf_counter()
    simulate_on_flower(config, out)
    return time.perf_counter() - start


def run_deployment(config: SimulationConfig, out: Path, *, worker: bool = True) -> float:
    """From the SuperLink's start to the end of ``flwr run`` (SuperNodes started with it); ``worker``:
    the relay ClientApp hands messages to a long-lived worker (else each ClientApp process computes)."""
    env = {"FEDBIP_FLOWER_WORKER": "1" if worker else "0"}
    with LocalFederation(out.parent / f"{out.name}-federation", env={**os.environ, **env}) as federation:
        start = time.perf_counter()
        federation.start_superlink()
        for index in range(config.clients):
            federation.start_supernode(index, config.clients)
        run = federation.start_run(config, out)
        if run.wait() != 0 or not (out / "summary.json").is_file():
            raise SystemExit(f"the deployment run failed:\n{federation.log('flwr-run')}")
        return time.perf_counter() - start


ENGINES = {
    "inprocess": run_inprocess,
    "simulation": run_simulation_engine,
    "deployment": run_deployment,
    "deployment-subprocess": lambda config, out: run_deployment(config, out, worker=False),
}


def largest_difference(a: Path, b: Path) -> float:
    """The largest elementwise difference between the two runs' final adapters."""
    worst = 0.0
    for client in sorted(p.name for p in (a / "adapters").iterdir()):
        x = load_file(a / "adapters" / client / "adapter_model.safetensors")
        y = load_file(b / "adapters" / client / "adapter_model.safetensors")
        worst = max(worst, *((x[k] - y[k]).abs().max().item() for k in x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tests' tiny run instead of the default run")
    parser.add_argument("--rounds", default="1,3", help="R1,R2 (default 1,3)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--write-docs", action="store_true", help="write docs/flower.md's table (the default run)")
    args = parser.parse_args()
    note = load_note()
    r1, r2 = (int(r) for r in args.rounds.split(","))
    engines = [e.strip() for e in args.engines.split(",")]
    os.environ.update({**OFFLINE_ENV, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    base = replace(QUICK if args.quick else FULL, eval_every=r2 + 1)

    work = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    seconds: dict[str, dict[int, float]] = {}
    try:
        for engine in engines:
            seconds[engine] = {}
            for rounds in (r1, r2):
                seconds[engine][rounds] = ENGINES[engine](replace(base, rounds=rounds), work / f"{engine}-{rounds}")
                print(f"{engine:<11} {rounds} rounds: {seconds[engine][rounds]:7.1f} s", flush=True)
        differences = {
            e: largest_difference(work / f"{e}-{r2}", work / f"inprocess-{r2}") for e in engines if e != "inprocess"
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_round = {e: (s[r2] - s[r1]) / (r2 - r1) for e, s in seconds.items()}
    fixed = {e: seconds[e][r1] - r1 * per_round[e] for e in engines}
    print(
        f"\n{'quick' if args.quick else 'default'} run: {base.clients} clients, "
        f"{base.num_layers or 'all'} layers, {base.local_steps} local steps of batch {base.batch_size}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s) per process"
    )
    print(f"{'engine':<22} {'per round':>10} {'overhead':>10} {'x in-proc':>9} {'fixed':>8} {'max |diff|':>11}")
    inprocess = per_round.get("inprocess", float("nan"))
    for engine in engines:
        overhead = per_round[engine] - inprocess
        diff = differences.get(engine, 0.0)
        print(
            f"{engine:<22} {per_round[engine]:9.2f}s {overhead:+9.2f}s {per_round[engine] / inprocess:9.2f} "
            f"{fixed[engine]:7.1f}s {diff:11.3g}"
        )
    if args.write_docs:
        names = {"inprocess": "in-process", "simulation": "Simulation Engine"}
        names["deployment"] = f"Deployment Engine, {base.clients} SuperNodes (relay and worker)"
        names["deployment-subprocess"] = f"Deployment Engine, {base.clients} SuperNodes (a ClientApp process computes)"
        rows = [
            "| engine | per round | × in-process | Flower's overhead per round | fixed (start-up, evaluation, outputs) "
            "| largest adapter difference |",
            "|---|---|---|---|---|---|",
        ]
        for engine in engines:
            overhead = "–" if engine == "inprocess" else f"{per_round[engine] - inprocess:+.1f} s"
            diff = "–" if engine == "inprocess" else f"{differences[engine]:.3g}"
            rows.append(
                f"| {names[engine]} | {per_round[engine]:.1f} s | {per_round[engine] / inprocess:.2f} | {overhead} "
                f"| {fixed[engine]:.0f} s | {diff} |"
            )
        write_generated(ROOT / "docs" / "flower.md", "flower-overhead", "\n".join(rows), note)
    if args.json is not None:
        figures = {"config": base.__dict__, "seconds": seconds, "per_round": per_round, "fixed": fixed}
        args.json.write_text(json.dumps({**figures, "max_difference": differences}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
