"""``fedbip simulate`` as one library call: run every strategy, then write the results.

Outputs in ``out``: ``metrics.jsonl`` (per strategy, round and client, with the bytes each client
sent and received), ``timings.jsonl`` (per strategy and round: each participant's local training
seconds and the server step's; kept apart so that metrics.jsonl is the same on every re-run),
``similarity.jsonl``
(the participants' update similarity of every round), ``summary.json``, ``groups.json`` (each
client's true task group, when known), ``base/`` (the Hugging Face sequence classifier the run
started from: encoder and initial head), the final personalized adapters as PEFT directories with
the head inside (``adapters/<client>``, or ``adapters/<strategy>/<client>`` when several strategies
are compared; each names ``base/`` as its base model), ``accuracy.png`` and ``similarity.png``, and
``checkpoints/``, and ``separation.png`` (the paper's Figure 3 check per round, from
``similarity.jsonl``'s ``separation`` records).

With several seeds, each seed is such a run in ``seed-<s>/`` and ``out`` holds the aggregate:
``summary.json`` (mean ± sd per strategy and every seed's summary), ``accuracy.png`` and
``separation.png`` with ±sd bands over seeds.

``--overwrite`` of an existing run stages the new one beside it and swaps it in only once it has
succeeded, with merge's journaled mechanism (``outdir.Outputs``): a run that fails or is killed
leaves the previous one as it was, and the next run removes what a killed one left. Only a
directory holding a run record (``fedbip-run.json``) is ever replaced or resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from fedbip_cli import __version__, report
from fedbip_cli.clustering import adjusted_rand_index, cluster_labels, suggest_clusters
from fedbip_cli.outdir import Outputs, recover
from fedbip_cli.pipeline import resolve_device
from fedbip_cli.similarity import GroupSimilarity, SimilarityResult
from fedbip_cli.simulate import figures, seeds
from fedbip_cli.simulate.attacks import honest_summary
from fedbip_cli.simulate.export import export_data
from fedbip_cli.simulate.loop import (
    METRICS,
    SIMILARITY,
    UNRECORDED,
    Progress,
    RoundCallback,
    Simulation,
    SimulationConfig,
    StrategyRun,
    check_out,
    final_accuracy,
    foreign_entries,
    mark_run,
    mean_accuracy_by_round,
    prepare_out,
)
from fedbip_cli.simulate.model import ClientModel
from fedbip_cli.simulate.separation import KINDS
from fedbip_cli.simulate.weight_trace import weight_curves, weight_summary

SUMMARY = "summary.json"
TIMINGS = "timings.jsonl"
GROUPS = "groups.json"
BASE = "base"
ADAPTERS = "adapters"


# run_seed(config, out, final, resume, device, progress, round_done) -> the seed's summary: one seed's
# run written into out, whose files will live in final (``_run_seed``: the in-process loop; Flower's
# engine is another).
SeedRun = Callable[[SimulationConfig, Path, Path, bool, str, Progress | None, RoundCallback | None], dict[str, Any]]


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
    seed_list: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
    round_done: RoundCallback | None = None,
    engine: SeedRun | None = None,
    export: Path | None = None,
) -> SimulationResult:
    """Run every strategy of ``config`` (for each seed of ``seed_list``, or for ``config.seed``)
    and write the outputs into ``out``; each seed's run by ``engine`` (default: the in-process loop).
    With ``export``, first write the clients' data there (``export.export_data``)."""
    run_seed = engine or _run_seed
    out = Path(out)
    torch_device = str(resolve_device(device))
    every = (config, seed_list, resume, torch_device, progress, round_done, run_seed)
    replace_old = check_out(out, resume=resume, overwrite=overwrite)  # fail fast, before loading
    if export is not None:
        export_data(config, export, seed_list=seed_list, out=out)
    if not replace_old:
        recover(out)  # what a killed --overwrite run left beside ``out``
        with written_as_os_errors():
            return SimulationResult(out, _run_all(out, out, *every))
    with Outputs() as outputs:  # the new run is staged and swapped in once complete (``outdir``)
        work = outputs.directory(out, overwrite=True, owner=foreign_entries, why=UNRECORDED)
        with written_as_os_errors():
            summary = _run_all(work, out, *every)
    return SimulationResult(out, summary)


@contextmanager
def written_as_os_errors() -> Iterator[None]:
    """safetensors reports a failed write (a full disk while saving the base or a checkpoint) as a
    ``SafetensorError`` whose text ends in ``(os error N)``: raise it as the ``OSError`` it is, which
    the CLI (and ``Outputs``) turn into one line."""
    try:
        yield
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number)) from None


def _run_all(
    work: Path,
    out: Path,
    config: SimulationConfig,
    seed_list: Sequence[int] | None,
    resume: bool,
    device: str,
    progress: Progress | None,
    round_done: RoundCallback | None,
    run_seed: SeedRun,
) -> dict[str, Any]:
    """Every seed's run written into ``work``, whose files will live in ``out``; returns the summary."""
    if seed_list is None:
        return run_seed(config, work, out, resume, device, progress, round_done)
    per_seed = {}
    for seed in seed_list:
        tag = f"seed {seed} "
        per_seed[seed] = run_seed(
            replace(config, seed=seed),
            work / f"seed-{seed}",
            out / f"seed-{seed}",
            resume,
            device,
            (lambda stage, total, tag=tag: progress(tag + stage, total)) if progress else None,
            (lambda name, r, acc, tag=tag: round_done(tag + name, r, acc)) if round_done else None,
        )
    return _write_aggregate(config, list(seed_list), per_seed, work)


def _run_seed(
    config: SimulationConfig,
    out: Path,
    final: Path,
    resume: bool,
    device: str,
    progress: Progress | None,
    round_done: RoundCallback | None,
) -> dict[str, Any]:
    """One seed's run written into ``out``, whose files will live in ``final`` (the adapters name
    ``final/base`` as their base model); returns its summary."""
    simulation = Simulation(config, out, device=device)
    prepare_out(out, resume=resume, overwrite=False)
    runs: list[StrategyRun] = []

    def on_round(run: StrategyRun, accuracy: float | None) -> None:
        # metrics.jsonl is rewritten each round so that it can be followed while the run goes on
        _write_jsonl(out / METRICS, [row for r in [*runs, run] for row in r.metrics])
        if round_done is not None:
            round_done(run.strategy, run.round, accuracy)

    for strategy in config.strategies:
        runs.append(simulation.run_strategy(strategy, resume=resume, progress=progress, on_round=on_round))

    clients = [ClientInfo(d.name, d.group, len(d.train), len(d.test)) for d in simulation.data]
    result = write_outputs(config, out, simulation.model, clients, simulation.label_names, runs, device, final / BASE)
    return result.summary


def _separation_curves(records: list[list[dict[str, Any]]]) -> tuple[figures.Curves, figures.Curves]:
    """Per kind of vector, one {round: gap} and one {round: ARI} per seed from similarity records."""
    gap: figures.Curves = {kind: [] for kind in KINDS}
    ari: figures.Curves = {kind: [] for kind in KINDS}
    for rows in records:
        rows = [r for r in rows if r.get("separation")]
        for kind in KINDS:
            gap[kind].append({r["round"]: r["separation"][kind]["gap"] for r in rows})
            ari[kind].append({r["round"]: r["separation"][kind]["ari"] for r in rows})
    return gap, ari


def _write_aggregate(
    config: SimulationConfig, seed_list: list[int], per_seed: dict[int, dict[str, Any]], out: Path
) -> dict[str, Any]:
    """The multi-seed ``summary.json``, ``accuracy.png`` and ``separation.png`` in ``out``."""
    summary = {
        "fedbip": __version__,
        "seeds": seed_list,
        "config": {**asdict(config), "seed": None},
        "strategies": seeds.aggregate(per_seed),
        "per_seed": {str(seed): s for seed, s in per_seed.items()},
    }
    _atomic_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    mark_run(out)
    metrics = {seed: _read_jsonl(out / f"seed-{seed}" / METRICS) for seed in seed_list}
    curves = {
        name: [mean_accuracy_by_round([row for row in metrics[seed] if row["strategy"] == name]) for seed in seed_list]
        for name in config.strategies
    }
    regime = f"{config.examples_per_client} train examples per client" if config.examples_per_client else "all data"
    figures.write_accuracy_bands(curves, out / "accuracy.png", title=f"accuracy per round ({regime}), ±sd over seeds")
    first = config.strategies[0]
    records = [
        [row for row in _read_jsonl(out / f"seed-{seed}" / SIMILARITY) if row["strategy"] == first]
        for seed in seed_list
    ]
    if all(rows and rows[0].get("separation") for rows in records):
        gap, ari = _separation_curves(records)
        title = f"separation of the true groups, {first} runs, ±sd over seeds"
        figures.write_separation(gap, ari, out / "separation.png", title=title, kinds=KINDS)
    rows = [_read_jsonl(out / f"seed-{seed}" / SIMILARITY) for seed in seed_list]
    _write_weights(rows, out, "±sd over seeds")
    return summary


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_outputs(
    config: SimulationConfig,
    out: Path,
    model: ClientModel,
    clients: list[ClientInfo],
    labels: list[str],
    runs: list[StrategyRun],
    device: str,
    base_path: Path | None = None,
) -> SimulationResult:
    """Write every output of finished ``runs`` into ``out``; every engine ends with this.
    The adapters name ``base_path`` as their base model (default ``out/base``): where the base
    will be once ``out`` is in its final place."""
    _write_jsonl(out / METRICS, [row for r in runs for row in r.metrics])
    _write_jsonl(out / SIMILARITY, [row for r in runs for row in r.similarity])
    _write_jsonl(out / TIMINGS, [{"strategy": r.strategy, **row} for r in runs for row in r.timings])
    _write_adapters(model, runs, out, base_path or out / BASE)
    _write_groups(clients, out)
    summary = _summary(config, clients, labels, runs, device)
    _atomic_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    report.write_accuracy_plot({r.strategy: mean_accuracy_by_round(r.metrics) for r in runs}, out / "accuracy.png")
    report.write_heatmap(_final_similarity(runs[0]), out / "similarity.png")
    if runs[0].similarity and runs[0].similarity[-1].get("separation"):
        gap, ari = _separation_curves([runs[0].similarity])
        title = f"separation of the true groups, {runs[0].strategy} run (seed {config.seed})"
        figures.write_separation(gap, ari, out / "separation.png", title=title, kinds=KINDS)
    _write_weights([[row for r in runs for row in r.similarity]], out, f"seed {config.seed}")
    return SimulationResult(out, summary)


def _write_weights(rows_per_seed: list[list[dict[str, Any]]], out: Path, label: str) -> None:
    """``weights.png``: self-weight and own-group weight per round (``weight_trace``), when the true
    groups are known."""
    self_curves, own_curves, uniform = weight_curves(rows_per_seed)
    if uniform is not None:
        title = f"where each client's weight goes ({label})"
        figures.write_weights(self_curves, own_curves, uniform, out / "weights.png", title=title)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_adapters(model: ClientModel, runs: list[StrategyRun], out: Path, base_path: Path) -> None:
    """The base the run started from (encoder and initial head) and every final adapter, which
    names that base by its absolute path in its final place, ``base_path``."""
    base = out / BASE
    shutil.rmtree(base, ignore_errors=True)
    model.save_base(base)
    root = out / ADAPTERS
    shutil.rmtree(root, ignore_errors=True)
    for run in runs:
        directory = root if len(runs) == 1 else root / run.strategy
        for client in run.bar:  # the model each client keeps (its own choice under --select-on-validation)
            model.save_adapter(run.personal(client), directory / client, base=base_path)


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


def cost_summary(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Traffic per client and round from metrics rows that record it: the client-rounds (a client
    training in a round) and the mean bytes each sent (uplink) and received (downlink) in one; None
    when the rows do not record traffic. Seconds per client-round and per round follow from the
    summary's ``seconds`` (``train`` / ``client_rounds``, ``server`` / ``rounds``)."""
    rows = [row for row in metrics if row.get("train_loss") is not None]
    if not rows or any("uplink_bytes" not in row for row in rows):
        return None
    return {
        "client_rounds": len(rows),
        "uplink_bytes_per_client_round": sum(row["uplink_bytes"] for row in rows) / len(rows),
        "downlink_bytes_per_client_round": sum(row["downlink_bytes"] for row in rows) / len(rows),
    }


def selection_summary(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Under --select-on-validation: ``selected_weight``, the mean over clients of the merge's share λ
    in the model each kept at its last choice (0: its own, 1: the merge); else nothing."""
    last: dict[str, float] = {}
    for row in metrics:
        if row.get("selected_weight") is not None:
            last[row["client"]] = row["selected_weight"]
    return {"selected_weight": sum(last.values()) / len(last)} if last else {}


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
            "separation": run.similarity[-1].get("separation") if run.similarity else None,
            "clusters": [
                [similarity.clients[i] for i in c] for c in suggest_clusters(similarity.groups["model"].similarity)
            ],
        }
        if all(groups[c] is not None for c in similarity.clients):
            found = cluster_labels(suggest_clusters(similarity.groups["model"].similarity), len(similarity.clients))
            entry["ari"] = adjusted_rand_index(found, [groups[c] for c in similarity.clients])
        entry.update(weight_summary(run.similarity[-1].get("weights") if run.similarity else None))
        entry.update(honest_summary(run.metrics))  # under --attack: ASR and accuracy of the honest clients
        entry.update(selection_summary(run.metrics))
        cost = cost_summary(run.metrics)
        if cost is not None:
            entry["cost"] = cost
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
