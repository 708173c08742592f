"""The Flower apps: ``client_app`` (one client's local rounds) and ``server_app`` (the federation).

Point Flower at them (``[tool.flwr.app.components]`` of ``fedbip_cli/simulate/flower/app``) or, for
the Simulation Engine inside ``fedbip simulate --engine flower``, see ``engine.py``.

A client is the SuperNode's partition: ``--node-config "partition-id=i num-partitions=N"`` picks
the i-th of the N clients ``fedbip simulate`` would make from the same options (the server sends
them), so it trains on exactly the data and with exactly the seeds of the in-process client i.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.flower.records import (
    ARRAYS,
    CLIENT,
    CONFIG,
    METRICS,
    config_from_json,
    config_from_run_config,
    from_record,
    to_record,
)
from fedbip_cli.simulate.flower.strategy import PersonalizedStrategy, Roster
from fedbip_cli.simulate.loop import METRICS as METRICS_FILE
from fedbip_cli.simulate.loop import (
    ClientTokens,
    SimulationConfig,
    StrategyRun,
    build_model,
    evaluate_client,
    load_clients,
    prepare_out,
    tokenize_client,
    train_client,
)
from fedbip_cli.simulate.methods import check_flower_strategies
from fedbip_cli.simulate.model import ClientModel
from fedbip_cli.simulate.runner import SimulationResult, _write_jsonl, write_outputs

log = logging.getLogger(__name__)

# Seconds the server waits for a round's replies before going on with those it has.
DEFAULT_ROUND_TIMEOUT = 600.0


# -- client --------------------------------------------------------------------------------------
@dataclass
class LocalClient:
    """What a client holds: its place in client order, its tokenized data and the model."""

    index: int
    data: ClientTokens
    model: ClientModel
    labels: list[str]


@functools.lru_cache(maxsize=2)
def _local_client(options: str, partition_id: int, num_partitions: int) -> LocalClient:
    """The client ``partition_id`` of the run ``options`` (cached: a ClientApp process that serves
    several messages of one run loads its data and model once)."""
    config = config_from_json(options)
    clients, labels = load_clients(config)
    if num_partitions != len(clients) or not 0 <= partition_id < len(clients):
        raise UsageError(
            f"node-config partition-id={partition_id} num-partitions={num_partitions} does not fit a run of "
            f"{len(clients)} clients",
            hint=f'start each SuperNode with --node-config "partition-id=i num-partitions={len(clients)}"',
        )
    model = build_model(config, labels)
    return LocalClient(partition_id, tokenize_client(model, clients[partition_id]), model, labels)


def _client_of(message: Message, context: Context) -> tuple[SimulationConfig, LocalClient]:
    options = str(message.content[CONFIG]["config"])
    node = context.node_config
    client = _local_client(options, int(node["partition-id"]), int(node["num-partitions"]))
    return config_from_json(options), client


client_app = ClientApp()


@client_app.query()
def introduce(message: Message, context: Context) -> Message:
    """Say who this client is: its name, place in client order, data sizes, task group and labels."""
    _, client = _client_of(message, context)
    data = client.data
    record = ConfigRecord(
        {
            "name": data.name,
            "index": client.index,
            "group": -1 if data.group is None else data.group,
            "train-examples": len(data.train),
            "test-examples": len(data.test),
            "labels": json.dumps(client.labels),
        }
    )
    return Message(RecordDict({CLIENT: record}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One local round from the state the server sent: the trained state and the mean loss."""
    config, client = _client_of(message, context)
    round_ = int(message.content[CONFIG]["server-round"])
    state, loss = train_client(
        client.model, config, client.data, from_record(message.content[ARRAYS]), round_, client.index
    )
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(client.data.train)})
    reply = RecordDict({ARRAYS: to_record(state), METRICS: metrics, CONFIG: _name(client)})
    return Message(reply, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Test accuracy of the state the server sent on this client's test sentences."""
    _, client = _client_of(message, context)
    accuracy = evaluate_client(client.model, client.data, from_record(message.content[ARRAYS]))
    metrics = MetricRecord({"test-accuracy": accuracy, "num-examples": len(client.data.test)})
    return Message(RecordDict({METRICS: metrics, CONFIG: _name(client)}), reply_to=message)


def _name(client: LocalClient) -> ConfigRecord:
    return ConfigRecord({"client": client.data.name})


# -- server --------------------------------------------------------------------------------------
def expected_clients(config: SimulationConfig) -> int:
    """How many clients (SuperNodes) the run has: ``clients``, or one per file of ``--data``."""
    return config.clients if config.data_dir is None else len(load_clients(config)[0])


def run_federation(
    grid: Grid,
    config: SimulationConfig,
    out: Path,
    *,
    overwrite: bool = False,
    round_timeout: float = DEFAULT_ROUND_TIMEOUT,
    min_train_nodes: int = 1,
) -> SimulationResult:
    """Every strategy of ``config`` over the clients on ``grid``, with ``simulate``'s outputs in ``out``.

    Waits (up to ``round_timeout``) until every client of the run is connected, so that the first
    round has everyone.
    """
    if config.attack != "none" or config.clip_norm is not None:
        raise UsageError(
            "attack and clip-norm are not wired to Flower", hint="run them with fedbip simulate in-process"
        )
    check_flower_strategies(config)
    out = Path(out)
    prepare_out(out, resume=False, overwrite=overwrite)
    roster = Roster(config)
    roster.discover(grid, wait_for=expected_clients(config), timeout=round_timeout)
    labels = roster.labels()
    model = build_model(config, labels)
    initial = model.initial_state()
    runs: list[StrategyRun] = []

    def on_round(run: StrategyRun, took_part: list[str]) -> None:
        _write_jsonl(out / METRICS_FILE, [row for r in [*runs, run] for row in r.metrics])
        log.info("%s round %d: %s took part", run.strategy, run.round, ", ".join(took_part) or "no client")

    for name in config.strategies:
        strategy = PersonalizedStrategy(
            config, name, roster, initial, min_train_nodes=min_train_nodes, on_round=on_round
        )
        strategy.start(grid, ArrayRecord(), num_rounds=config.rounds, timeout=round_timeout)
        runs.append(strategy.run)
    clients = [roster.members[n].info for n in roster.names]
    for run in runs:  # a client that joined during a later strategy: every run lists every client
        for name in roster.names:
            run.bar.setdefault(name, dict(initial))
    return write_outputs(config, out, model, clients, labels, runs, "cpu")


def options_from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_federation``'s keyword options from a Flower run config."""
    if not str(run_config.get("out", "")):
        raise UsageError("the Flower run config has no out", hint="pass --run-config \"out='/path/to/run'\"")
    return {
        "out": Path(str(run_config["out"])),
        "overwrite": bool(run_config.get("overwrite", False)),
        "round_timeout": float(run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT)),
        "min_train_nodes": int(run_config.get("min-train-nodes", 1)),
    }


server_app = ServerApp()


@server_app.main()
def federation(grid: Grid, context: Context) -> None:
    """The ServerApp of a deployment: options and ``out`` from the run config (``flwr run --run-config``)."""
    run_federation(grid, config_from_run_config(context.run_config), **options_from_run_config(context.run_config))


def make_server_app(
    config: SimulationConfig, out: Path, *, collect: Callable[[SimulationResult], None] | None = None, **options: Any
) -> ServerApp:
    """A ServerApp that runs ``config`` into ``out`` and hands the result to ``collect`` (for the
    Simulation Engine in this process, which passes no run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, config, out, **options)
        if collect is not None:
            collect(result)

    return app
