"""``fedbip simulate`` as one library call: run every strategy, then write the results.

Outputs in ``out``: ``metrics.jsonl`` (per strategy, round and client), ``similarity.jsonl``
(the participants' update similarity of every round), ``summary.json``, ``groups.json`` (each
client's true task group, when known), ``base/`` (the Hugging Face sequence classifier the run
started from: encoder and initial head), the final personalized adapters as PEFT directories with
the head inside (``adapters/<client>``, or ``adapters/<strategy>/<client>`` when several strategies
are compared; each names ``base/`` as its base model), ``accuracy.png`` and ``similarity.png``, and
``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedbip_cli import __version__, report
from fedbip_cli.clustering import adjusted_rand_index, cluster_labels, suggest_clusters
from fedbip_cli.pipeline import resolve_device
from fedbip_cli.similarity import GroupSimilarity, SimilarityResult
from fedbip_cli.simulate.loop import (
    METRICS,
    SIMILARITY,
    Progress,
    RoundCallback,
    Simulation,
    SimulationConfig,
    StrategyRun,
    check_out,
    final_accuracy,
    mean_accuracy_by_round,
    prepare_out,
)
from fedbip_cli.simulate.model import ClientModel

SUMMARY = "summary.json"
GROUPS = "groups.json"
BASE = "base"
ADAPTERS = "adapters"


@dataclass
class SimulationResult:
    out: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class ClientInfo:
    """What the outputs record of one client (an engine whose server holds no data learns it from the client)."""

    name: str
    group: int | None
    train_examples: int
    test_examples: int


def simulate(
    config: SimulationConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
    round_done: RoundCallback | None = None,
) -> SimulationResult:
    """Run every strategy of ``config`` on one partition and write the outputs into ``out``."""
    out = Path(out)
    torch_device = resolve_device(device)
    check_out(out, resume=resume, overwrite=overwrite)  # fail fast, before loading data and model
    simulation = Simulation(config, out, device=str(torch_device))
    prepare_out(out, resume=resume, overwrite=overwrite)
    runs: list[StrategyRun] = []

    def on_round(run: StrategyRun, accuracy: float | None) -> None:
        # metrics.jsonl is rewritten each round so that it can be followed while the run goes on
        _write_jsonl(out / METRICS, [row for r in [*runs, run] for row in r.metrics])
        if round_done is not None:
            round_done(run.strategy, run.round, accuracy)

    for strategy in config.strategies:
        runs.append(simulation.run_strategy(strategy, resume=resume, progress=progress, on_round=on_round))

    clients = [ClientInfo(d.name, d.group, len(d.train), len(d.test)) for d in simulation.data]
    return write_outputs(config, out, simulation.model, clients, simulation.label_names, runs, str(torch_device))


def write_outputs(
    config: SimulationConfig,
    out: Path,
    model: ClientModel,
    clients: list[ClientInfo],
    labels: list[str],
    runs: list[StrategyRun],
    device: str,
) -> SimulationResult:
    """Write every output of finished ``runs`` into ``out``; every engine ends with this."""
    _write_jsonl(out / METRICS, [row for r in runs for row in r.metrics])
    _write_jsonl(out / SIMILARITY, [row for r in runs for row in r.similarity])
    _write_adapters(model, runs, out)
    _write_groups(clients, out)
    summary = _summary(config, clients, labels, runs, device)
    _atomic_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    report.write_accuracy_plot({r.strategy: mean_accuracy_by_round(r.metrics) for r in runs}, out / "accuracy.png")
    report.write_heatmap(_final_similarity(runs[0]), out / "similarity.png")
    return SimulationResult(out, summary)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_adapters(model: ClientModel, runs: list[StrategyRun], out: Path) -> None:
    """The base the run started from (encoder and initial head) and every final adapter, which
    names that base by its absolute path."""
    base = out / BASE
    shutil.rmtree(base, ignore_errors=True)
    model.save_base(base)
    root = out / ADAPTERS
    shutil.rmtree(root, ignore_errors=True)
    for run in runs:
        directory = root if len(runs) == 1 else root / run.strategy
        for client, state in run.bar.items():
            model.save_adapter(state, directory / client, base=base)


def _write_groups(clients: list[ClientInfo], out: Path) -> None:
    """``groups.json``: each client's true task group, when the partition knows them (``tasks``),
    to score suggested clusters against."""
    groups = {c.name: c.group for c in clients}
    if all(group is not None for group in groups.values()):
        _atomic_text(out / GROUPS, json.dumps(groups, indent=2) + "\n")


def _final_similarity(run: StrategyRun) -> SimilarityResult:
    last = run.similarity[-1]
    matrix = torch.tensor(last["similarity"], dtype=torch.float64)
    group = GroupSimilarity("model", [], matrix, torch.ones(matrix.shape[0], dtype=torch.float64))
    return SimilarityResult(list(last["clients"]), "model", {"model": group})


def _summary(
    config: SimulationConfig, clients: list[ClientInfo], labels: list[str], runs: list[StrategyRun], device: str
) -> dict[str, Any]:
    groups = {c.name: c.group for c in clients}
    strategies: dict[str, Any] = {}
    for run in runs:
        accuracy = final_accuracy(run.metrics)
        similarity = _final_similarity(run)
        entry: dict[str, Any] = {
            "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            "worst_accuracy": min(accuracy.values()),
            "accuracy": accuracy,
            "seconds": run.seconds,
            "rounds": run.round,
            "clusters": [
                [similarity.clients[i] for i in c] for c in suggest_clusters(similarity.groups["model"].similarity)
            ],
        }
        if all(groups[c] is not None for c in similarity.clients):
            found = cluster_labels(suggest_clusters(similarity.groups["model"].similarity), len(similarity.clients))
            entry["ari"] = adjusted_rand_index(found, [groups[c] for c in similarity.clients])
        strategies[run.strategy] = entry
    return {
        "fedbip": __version__,
        "device": device,
        "config": asdict(config),
        "clients": [
            {"name": c.name, "group": c.group, "train_examples": c.train_examples, "test_examples": c.test_examples}
            for c in clients
        ],
        "labels": labels,
        "strategies": strategies,
    }
