"""FedBip (and every strategy of ``fedbip simulate``) as a Flower strategy on the Message API.

Flower's own strategies keep one global model. This one keeps one personalized state θ̄_i per
client and sends each client its own: it subclasses Flower's ``FedAvg`` for its sampling limits and
reply checks, and overrides the three verbs that differ (``configure_train``, ``aggregate_train``,
``configure_evaluate``, plus ``aggregate_evaluate`` to close the round). The aggregation itself is
``loop.server_round``, the in-process loop's own server step.

Clients are known by the name they report (``Roster``), never by Flower's random node ids, so that a
client that reconnects under a new node id keeps its state. A client that fails or times out in a
round keeps its θ̄ and has no ``train_loss`` that round; one that joins late starts from θ⁰.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import loop
from fedbip_cli.simulate.flower.records import ARRAYS, CLIENT, CONFIG, METRICS, config_to_json, from_record, to_record
from fedbip_cli.simulate.loop import (
    SimulationConfig,
    StrategyRun,
    evaluates,
    metric_rows,
    participants,
)
from fedbip_cli.simulate.runner import ClientInfo
from fedbip_cli.simulate.strategies import State

log = logging.getLogger(__name__)

# on_round(the run after the round, the clients that took part)
RoundHook = Callable[[StrategyRun, list[str]], None]


@dataclass
class Member:
    """One client as it reported itself: its place in client order (which seeds its batches) and data sizes."""

    info: ClientInfo
    index: int
    labels: list[str]


@dataclass
class Roster:
    """The clients the server knows, by name, and the node each is reachable at now."""

    config: SimulationConfig
    members: dict[str, Member] = field(default_factory=dict)
    nodes: dict[int, str] = field(default_factory=dict)  # node id -> client name

    @property
    def names(self) -> list[str]:
        """Every known client, in client order."""
        return sorted(self.members, key=lambda n: self.members[n].index)

    def node_of(self, name: str, connected: set[int]) -> int | None:
        return next((node for node, n in self.nodes.items() if n == name and node in connected), None)

    def discover(self, grid: Grid, *, wait_for: int = 0, timeout: float = 3600) -> list[str]:
        """Ask every connected node not yet known who it is (after waiting up to ``timeout`` seconds
        until ``wait_for`` nodes are connected); return the names of clients not known before."""
        deadline = time.monotonic() + timeout
        while (connected := len(list(grid.get_node_ids()))) < wait_for:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"only {connected} of {wait_for} SuperNodes connected within {timeout:g} s",
                    hint="start one SuperNode per client, or lower clients in the run config",
                )
            time.sleep(0.2)
        unknown = [node for node in grid.get_node_ids() if node not in self.nodes]
        if not unknown:
            return []
        request = ConfigRecord({"config": config_to_json(self.config)})
        messages = [
            Message(content=RecordDict({CONFIG: request}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in unknown
        ]
        added = []
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                log.warning("node %d did not say who it is: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            member = _member(reply.content[CLIENT])
            name = member.info.name
            if name in self.members and self.members[name].index != member.index:
                raise UsageError(f"two nodes report client {name} with different partitions")
            if name not in self.members:
                added.append(name)
            self.members[name] = member
            self.nodes[reply.metadata.src_node_id] = name
        return added

    def labels(self) -> list[str]:
        """The label names every client reported (they must agree)."""
        found = {json.dumps(m.labels) for m in self.members.values()}
        if len(found) != 1:
            raise UsageError(f"clients report different label sets: {sorted(found)}")
        return json.loads(found.pop())


def _trained(reply: Message, sent: State) -> tuple[State | None, float]:
    """The state and loss of a train reply, or None when the state is not one of finite tensors of
    the names and shapes the client was sent (a broken or hostile client is left out of the round)."""
    try:
        state = from_record(reply.content[ARRAYS])
        loss = float(reply.content[METRICS]["train-loss"])
    except (KeyError, TypeError, ValueError):
        return None, 0.0
    fits = state.keys() == sent.keys() and all(
        state[k].shape == sent[k].shape and bool(torch.isfinite(state[k]).all()) for k in sent
    )
    return (state if fits else None), loss


def _member(record: ConfigRecord) -> Member:
    group = int(record["group"])
    info = ClientInfo(
        str(record["name"]), None if group < 0 else group, int(record["train-examples"]), int(record["test-examples"])
    )
    return Member(info, int(record["index"]), json.loads(str(record["labels"])))


class PersonalizedStrategy(FedAvg):
    """One ``fedbip simulate`` strategy on Flower: a personalized state per client, each sent its own.

    Args:
        config: the run's options (rounds, participation, evaluation schedule, seeds...).
        strategy: a name of ``strategies.STRATEGIES``.
        roster: the clients known so far (new ones are asked who they are each round).
        initial: θ⁰, the shared initial state, given to every client that joins.
        min_train_nodes: the fewest replies for which the round's server step is done; with fewer,
            every client keeps its state.
        on_round: called after each round with the run and the round's participants.
    """

    def __init__(
        self,
        config: SimulationConfig,
        strategy: str,
        roster: Roster,
        initial: State,
        *,
        min_train_nodes: int = 1,
        on_round: RoundHook | None = None,
    ) -> None:
        super().__init__(min_train_nodes=min_train_nodes, min_evaluate_nodes=0, min_available_nodes=1)
        self.config = config
        self.roster = roster
        self.initial = initial
        self.run = StrategyRun(strategy, 0, {name: dict(initial) for name in roster.names})
        self.on_round = on_round
        self._losses: dict[str, float] = {}
        self._chosen: list[str] = []
        self._started = 0.0
        self._options = config_to_json(config)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client its own θ̄ (the sample: ``participants`` of the in-process loop,
        among the clients connected now)."""
        for name in self.roster.discover(grid):
            self.run.bar.setdefault(name, dict(self.initial))  # a late joiner starts from θ⁰
        connected = set(grid.get_node_ids())
        sampled = participants(self.config, self.roster.names, server_round)
        self._chosen = [n for n in sampled if self.roster.node_of(n, connected) is not None]
        self._started = time.perf_counter()
        return [self._message(name, server_round, MessageType.TRAIN, connected) for name in self._chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step over the clients that replied; the others keep their θ̄."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        trained: dict[str, State] = {}
        self._losses = {}
        for reply in valid:
            name = self._sender(reply)
            if name is None or name not in self._chosen:
                continue
            state, loss = _trained(reply, self.run.bar[name])
            if state is None:
                log.warning(
                    "round %d: %s replied with a state that does not fit its model; left out", server_round, name
                )
                continue
            trained[name], self._losses[name] = state, loss
        self.run.seconds["train"] += time.perf_counter() - self._started
        took_part = [n for n in self.roster.names if n in trained]
        if len(took_part) < max(1, self.min_train_nodes):
            log.warning(
                "round %d: %d replies, fewer than %d; no client changes",
                server_round,
                len(took_part),
                self.min_train_nodes,
            )
            self._chosen = []
            return None, MetricRecord({"participants": 0})
        self._chosen = took_part
        start = time.perf_counter()
        members = self.roster.members
        loop.server_round(
            self.run,
            server_round,
            took_part,
            trained,
            clients=self.roster.names,
            examples={n: members[n].info.train_examples for n in self.roster.names},
            groups={n: members[n].info.group for n in self.roster.names},
            initial=self.initial,
        )
        self.run.seconds["server"] += time.perf_counter() - start
        return None, MetricRecord({"participants": len(took_part)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On evaluated rounds, send every connected client its own θ̄ to test."""
        self._started = time.perf_counter()
        if not evaluates(self.config, server_round):
            return []
        connected = set(grid.get_node_ids())
        names = [n for n in self.roster.names if self.roster.node_of(n, connected) is not None]
        return [self._message(name, server_round, MessageType.EVALUATE, connected) for name in names]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Close the round: one metrics row per client, as the in-process loop writes them."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        accuracy: dict[str, float] = {}
        for reply in valid:
            name = self._sender(reply)
            try:
                value = float(reply.content[METRICS]["test-accuracy"])
            except (KeyError, TypeError, ValueError):
                value = float("nan")
            if name is not None and 0 <= value <= 1:
                accuracy[name] = value
        if evaluates(self.config, server_round):
            self.run.seconds["eval"] += time.perf_counter() - self._started
        names = self.roster.names
        examples = {n: self.roster.members[n].info.train_examples for n in names}
        self.run.metrics.extend(metric_rows(self.run.strategy, server_round, names, examples, self._losses, accuracy))
        self.run.round = server_round
        if self.on_round is not None:
            self.on_round(self.run, list(self._chosen))
        if not accuracy:
            return None
        return MetricRecord({"test-accuracy": sum(accuracy.values()) / len(accuracy)})

    def _message(self, name: str, server_round: int, kind: str, connected: set[int]) -> Message:
        # The options go with every message: a SuperNode may start a fresh ClientApp process for each.
        record = ConfigRecord({"server-round": server_round, "client": name, "config": self._options})
        content = RecordDict({ARRAYS: to_record(self.run.bar[name]), CONFIG: record})
        return Message(content=content, message_type=kind, dst_node_id=self.roster.node_of(name, connected))

    def _sender(self, reply: Message) -> str | None:
        """The client a reply comes from: the node's reported name, which the reply must repeat.
        None (the reply is left out, with a warning) when the node is unknown or names another client."""
        name = self.roster.nodes.get(reply.metadata.src_node_id)
        try:
            repeated = str(reply.content[CONFIG]["client"])
        except KeyError:
            repeated = None
        if name is None or repeated != name:
            log.warning(
                "a reply from node %d does not match the client it reported; left out", reply.metadata.src_node_id
            )
            return None
        return name
