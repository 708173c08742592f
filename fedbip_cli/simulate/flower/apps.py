"""The Flower apps: ``client_app`` (one client's local rounds) and ``server_app`` (the federation).

Point Flower at them (``[tool.flwr.app.components]`` of ``fedbip_cli/simulate/flower/app``) or, for
the Simulation Engine inside ``fedbip simulate --engine flower``, see ``engine.py``.

A client is what its SuperNode's ``--node-config`` names (``clientdata``): a partition of the run's
data (``partition-id=i num-partitions=N``: exactly the data and seeds of the in-process client i)
or its own files (``data-dir=...``). It first says who it is (``introduce``: its name and the labels
it knows); every later message names the run's agreed labels and the client's place in client order,
so every client builds the same head and seeds its batches as the in-process loop does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedbip_cli.errors import FedbipError, UsageError
from fedbip_cli.outdir import Outputs, recover
from fedbip_cli.simulate import checkpoint
from fedbip_cli.simulate.flower import FINISH
from fedbip_cli.simulate.flower.carriage import (
    KEPT,
    KEPT_ROUND,
    client_view,
    kept_state,
    server_from,
    store_kept,
)
from fedbip_cli.simulate.flower.clientdata import client_data, relabel
from fedbip_cli.simulate.flower.records import (
    ARRAYS,
    CLIENT,
    CONFIG,
    METRICS,
    config_from_json,
    config_from_run_config,
    config_to_json,
    from_record,
    to_record,
)
from fedbip_cli.simulate.flower.strategy import PersonalizedStrategy, Roster
from fedbip_cli.simulate.loop import (
    CHECKPOINTS,
    UNRECORDED,
    ClientTokens,
    SimulationConfig,
    StrategyRun,
    build_model,
    check_out,
    evaluate_client,
    foreign_entries,
    load_clients,
    local_fit,
    prepare_out,
    state_bytes,
    tokenize_client,
    train_client,
)
from fedbip_cli.simulate.loop import METRICS as METRICS_FILE
from fedbip_cli.simulate.methods import METHODS, check_flower_strategies
from fedbip_cli.simulate.model import ClientModel
from fedbip_cli.simulate.runner import BASE, SimulationResult, _write_jsonl, write_outputs

log = logging.getLogger(__name__)

# Seconds the server waits for a round's replies before going on with those it has.
DEFAULT_ROUND_TIMEOUT = 600.0

Handler = Callable[[Message, Context], Message]


# -- client --------------------------------------------------------------------------------------
@dataclass
class LocalClient:
    """What a client holds: its place in client order, its tokenized data and the model."""

    index: int
    data: ClientTokens
    model: ClientModel


NodeItems = tuple[tuple[str, str], ...]


def _node(context: Context) -> NodeItems:
    """The SuperNode's --node-config as a hashable value."""
    return tuple(sorted((str(key), str(value)) for key, value in context.node_config.items()))


@functools.lru_cache(maxsize=2)
def _local_client(options: str, node: NodeItems, labels: str, index: int) -> LocalClient:
    """The client ``node`` names in the run ``options``, with the run's ``labels`` (a JSON list) and
    at place ``index`` (cached: a ClientApp process that serves several messages of one run loads its
    data and model once)."""
    config = config_from_json(options)
    data, names = client_data(config, dict(node), index)
    agreed = json.loads(labels)
    model = build_model(config, agreed)
    return LocalClient(index, tokenize_client(model, relabel(data, names, agreed)), model)


def _client_of(message: Message, context: Context) -> tuple[SimulationConfig, LocalClient]:
    record = message.content[CONFIG]
    options = str(record["config"])
    client = _local_client(options, _node(context), str(record["labels"]), int(record["index"]))
    return config_from_json(options), client


def _clear_errors(handler: Handler) -> Handler:
    """Reply to a message that the client cannot serve (bad files, a label the run lacks...) with
    fedbip's one-line error and its hint, instead of Flower's exception text."""

    @functools.wraps(handler)
    def serve(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except FedbipError as exc:
            reason = f"{exc} ({exc.hint})" if exc.hint else str(exc)
            log.error("%s", reason)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    return serve


client_app = ClientApp()


@client_app.query()
@_clear_errors
def introduce(message: Message, context: Context) -> Message:
    """Say who this client is: its name, its place in client order (-1 for a client with its own
    files: the server assigns it), data sizes, task group and the label names it knows."""
    config = config_from_json(str(message.content[CONFIG]["config"]))
    node = dict(_node(context))
    index = -1 if "data-dir" in node else int(node.get("partition-id", -1))
    data, labels = client_data(config, node, max(index, 0))  # sizes do not depend on the place
    record = ConfigRecord(
        {
            "name": data.name,
            "index": index,
            "group": -1 if data.group is None else data.group,
            "train-examples": len(data.train_texts),
            "test-examples": len(data.test_texts),
            "labels": json.dumps(labels),
        }
    )
    return Message(RecordDict({CLIENT: record}), reply_to=message)


@client_app.train()
@_clear_errors
def train(message: Message, context: Context) -> Message:
    """One local round from the state the server sent: the trained state and the mean loss (a
    method's round, ``method_round``, for the strategies that are one)."""
    config, client = _client_of(message, context)
    round_ = int(message.content[CONFIG]["server-round"])
    if str(message.content[CONFIG]["strategy"]) in METHODS:
        return method_round(message, context, config, client, finish=False)
    state, loss = train_client(
        client.model, config, client.data, from_record(message.content[ARRAYS]), round_, client.index
    )
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(client.data.train)})
    reply = RecordDict({ARRAYS: to_record(state), METRICS: metrics, CONFIG: _name(client, round_)})
    return Message(reply, reply_to=message)


@client_app.train(FINISH)
@_clear_errors
def finish(message: Message, context: Context) -> Message:
    """A method's post-training phase, after the last round (``Method.finish``)."""
    config, client = _client_of(message, context)
    return method_round(message, context, config, client, finish=True)


def method_round(
    message: Message, context: Context, config: SimulationConfig, client: LocalClient, *, finish: bool
) -> Message:
    """A method's client verb on this client (``carriage``): its round (``client_round``: what it
    sends, its loss and the bytes the method counts as received) or its post-training phase
    (``finish``, with the batches of round ``rounds + 1`` as in the in-process loop), from the state
    it kept and the server state; what it keeps now goes to ``context.state`` and back to the server."""
    record = message.content[CONFIG]
    strategy, name, round_ = str(record["strategy"]), client.data.name, int(record["server-round"])
    kept = kept_state(message.content, context, name, strategy, int(record[KEPT_ROUND]))
    clients = json.loads(str(record["clients"]))
    view = client_view(strategy, round_, clients, name, kept, server_from(message.content))
    method = METHODS[strategy](config)
    made_in = config.rounds + 1 if finish else round_
    fit = local_fit(client.model, config, client.data, made_in, client.index)
    reply = RecordDict({CONFIG: _name(client, round_)})
    if finish:
        method.finish(client.model, view, name, client.data, fit)
    else:
        result = method.client_round(client.model, view, name, client.data, fit)
        reply[ARRAYS] = to_record(result.sent)
        reply[METRICS] = MetricRecord(
            {
                "train-loss": result.loss,
                "num-examples": len(client.data.train),
                "downlink-bytes": state_bytes(*result.received),
            }
        )
    store_kept(context, strategy, view.bar[name], made_in)
    reply[KEPT] = to_record(view.bar[name])
    return Message(reply, reply_to=message)


@client_app.evaluate()
@_clear_errors
def evaluate(message: Message, context: Context) -> Message:
    """Test accuracy of the state the server sent on this client's test sentences."""
    _, client = _client_of(message, context)
    accuracy = evaluate_client(client.model, client.data, from_record(message.content[ARRAYS]))
    metrics = MetricRecord({"test-accuracy": accuracy, "num-examples": len(client.data.test)})
    return Message(RecordDict({METRICS: metrics, CONFIG: _name(client)}), reply_to=message)


def _name(client: LocalClient, server_round: int | None = None) -> ConfigRecord:
    """Who replies, and to a train message the round it answers (``validation`` checks both)."""
    record = ConfigRecord({"client": client.data.name})
    if server_round is not None:
        record["server-round"] = server_round
    return record


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
    resume: bool = False,
    round_timeout: float = DEFAULT_ROUND_TIMEOUT,
    min_train_nodes: int = 1,
    labels: list[str] | None = None,
    base_path: Path | None = None,
) -> SimulationResult:
    """Every strategy of ``config`` over the clients on ``grid``, with ``simulate``'s outputs in ``out``.

    Waits (up to ``round_timeout``) until every client of the run is connected, so that the first
    round has everyone, and asks each who it is; a client that cannot join then fails the run.
    ``labels``: the label names of every client's head (default: the sorted union of the labels the
    clients report). ``base_path``: where ``out/base`` will be once ``out`` is in its final place
    (``runner.write_outputs``). Each strategy's run is checkpointed after every round in the
    in-process loop's format (``checkpoint``), and ``resume`` continues each from its checkpoint,
    whichever engine wrote it.
    """
    if config.attack != "none":  # attackers are simulated clients; a real federation's are not configured
        raise UsageError("attack is not wired to Flower", hint="run it with fedbip simulate in-process")
    if config.select_on_validation is not None:  # the ClientApp keeps no model of its own between rounds
        raise UsageError("--select-on-validation is not wired to Flower", hint="run it with fedbip simulate in-process")
    check_flower_strategies(config)
    out = Path(out)
    replace_old = check_out(out, resume=resume, overwrite=overwrite)
    roster = Roster(config, labels)
    roster.discover(grid, wait_for=expected_clients(config), timeout=round_timeout, strict=True)
    # Once every client has joined, so that a failure leaves no trace: an old run that --overwrite
    # replaces is swapped out only when the new one is complete (``outdir.Outputs``, merge's journal).
    federate = functools.partial(
        _federate, grid, config, roster, resume=resume, round_timeout=round_timeout, min_train_nodes=min_train_nodes
    )
    if replace_old:
        with Outputs() as outputs:
            work = outputs.directory(out, overwrite=True, owner=foreign_entries, why=UNRECORDED)
            return federate(work, base_path or out / BASE)
    recover(out)  # what a killed --overwrite run left beside ``out``
    prepare_out(out, resume=resume, overwrite=False)
    return federate(out, base_path)


def _federate(
    grid: Grid,
    config: SimulationConfig,
    roster: Roster,
    out: Path,
    base_path: Path | None,
    *,
    resume: bool,
    round_timeout: float,
    min_train_nodes: int,
) -> SimulationResult:
    """``run_federation``'s rounds, every strategy's, with the clients of ``roster``, written into ``out``."""
    labels = roster.labels or []
    model = build_model(config, labels)
    initial = model.initial_state()
    runs: list[StrategyRun] = []

    options = json.loads(config_to_json(config))

    def on_round(run: StrategyRun, took_part: list[str]) -> None:
        checkpoint.save(out / CHECKPOINTS / f"{run.strategy}.safetensors", run, options)
        _write_jsonl(out / METRICS_FILE, [row for r in [*runs, run] for row in r.metrics])
        log.info("%s round %d: %s took part", run.strategy, run.round, ", ".join(took_part) or "no client")

    for name in config.strategies:
        path = out / CHECKPOINTS / f"{name}.safetensors"
        server = METHODS[name](config).initial_server(initial, roster.names) if name in METHODS else None
        resumed = (
            checkpoint.load(path, name, options, roster.names, initial, server) if resume and path.is_file() else None
        )
        strategy = PersonalizedStrategy(
            config,
            name,
            roster,
            initial,
            min_train_nodes=min_train_nodes,
            on_round=on_round,
            resumed=resumed,
            model=model,
            timeout=round_timeout,
        )
        if strategy.done < config.rounds:
            strategy.start(grid, ArrayRecord(), num_rounds=config.rounds - strategy.done, timeout=round_timeout)
        runs.append(strategy.run)
    clients = [roster.members[n].info for n in roster.names]
    for run in runs:  # a client that joined during a later strategy: every run lists every client
        for name in roster.names:
            run.bar.setdefault(name, dict(initial))
    return write_outputs(config, out, model, clients, labels, runs, "cpu", base_path)


def options_from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_federation``'s keyword options from a Flower run config."""
    if not str(run_config.get("out", "")):
        raise UsageError("the Flower run config has no out", hint="pass --run-config \"out='/path/to/run'\"")
    return {
        "out": Path(str(run_config["out"])),
        "overwrite": bool(run_config.get("overwrite", False)),
        "resume": bool(run_config.get("resume", False)),
        "round_timeout": float(run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT)),
        "min_train_nodes": int(run_config.get("min-train-nodes", 1)),
        "labels": [part.strip() for part in str(run_config.get("labels", "")).split(",") if part.strip()] or None,
    }


server_app = ServerApp()


@server_app.main()
def federation(grid: Grid, context: Context) -> None:
    """The ServerApp of a deployment: options and ``out`` from the run config (``flwr run --run-config``)."""
    run_federation(grid, config_from_run_config(context.run_config), **options_from_run_config(context.run_config))


def make_server_app(
    config: SimulationConfig, out: Path, outcome: list[SimulationResult | FedbipError], **options: Any
) -> ServerApp:
    """A ServerApp that runs ``config`` into ``out`` and appends its result, or the error that ended
    it, to ``outcome`` (for the Simulation Engine in this process, which passes no run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.append(run_federation(grid, config, out, **options))
        except FedbipError as exc:  # raised again by the caller, in its own thread
            outcome.append(exc)

    return app
