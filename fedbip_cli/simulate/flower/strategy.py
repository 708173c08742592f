"""FedBip (and every strategy of ``fedbip simulate``) as a Flower strategy on the Message API.

Flower's own strategies keep one global model. This one keeps one personalized state θ̄_i per
client and sends each client its own: it subclasses Flower's ``FedAvg`` for its sampling limits and
reply checks, and overrides the three verbs that differ (``configure_train``, ``aggregate_train``,
``configure_evaluate``, plus ``aggregate_evaluate`` to close the round). The aggregation itself is
``loop.server_round``, the in-process loop's own server step.

Clients are known by the name they report (``Roster``), never by Flower's random node ids, so that a
client that reconnects under a new node id keeps its state. A client that fails or times out in a
round keeps its θ̄ and has no ``train_loss`` that round; one that joins late starts from θ⁰.

A method (``methods.METHODS``: server state, client state, a post-training phase) runs through the
same verbs: its server state is ``run.server`` here, its server step ``loop.server_round`` with the
method, its client verbs run on the clients, and ``carriage`` says how their states travel; the
post-training phase is one more message round after the last round's server step.
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

from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import loop
from fedbip_cli.simulate.data import load_bbc
from fedbip_cli.simulate.flower import FINISH
from fedbip_cli.simulate.flower.carriage import KEPT, KEPT_ROUND, server_records
from fedbip_cli.simulate.flower.clientdata import check_name
from fedbip_cli.simulate.flower.records import ARRAYS, CLIENT, CONFIG, METRICS, config_to_json, to_record
from fedbip_cli.simulate.flower.validation import Expected, LeftOut, check_train_reply, sender, state_of
from fedbip_cli.simulate.loop import (
    SILENT,
    SimulationConfig,
    StrategyRun,
    evaluates,
    load_clients,
    metric_rows,
    participants,
    state_bytes,
)
from fedbip_cli.simulate.methods import METHODS, Method, ServerContext
from fedbip_cli.simulate.model import ClientModel, Tokens
from fedbip_cli.simulate.partition import public_sentences
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
    """The clients the server knows, by name, the node each is reachable at now, and the run's labels.

    ``labels``: the label names every client's head is built for. Given (the run config's
    ``labels``), a client that knows a label outside them is refused; otherwise they are agreed at
    the first ``discover``: the sorted union of what the clients report, as ``fedbip simulate
    --data`` takes the sorted union over its client files.
    """

    config: SimulationConfig
    labels: list[str] | None = None
    members: dict[str, Member] = field(default_factory=dict)
    nodes: dict[int, str] = field(default_factory=dict)  # node id -> client name

    @property
    def names(self) -> list[str]:
        """Every known client, in client order."""
        return sorted(self.members, key=lambda n: self.members[n].index)

    def node_of(self, name: str, connected: set[int]) -> int | None:
        return next((node for node, n in self.nodes.items() if n == name and node in connected), None)

    def discover(self, grid: Grid, *, wait_for: int = 0, timeout: float = 3600, strict: bool = False) -> list[str]:
        """Ask every connected node not yet known who it is (after waiting up to ``timeout`` seconds
        until ``wait_for`` nodes are connected); return the names of clients not known before.

        A node that cannot say who it is, or whose client does not fit the run (a label outside the
        run's labels, a name that is not a plain name), is left out with a warning, or fails the
        run when ``strict`` (the first discovery, before any training).
        """
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
        found: dict[int, Member] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            try:
                found[node] = self._check(reply)
            except UsageError as exc:
                if strict:
                    raise
                log.warning("%s; left out", exc)
        self._place(found)
        if self.labels is None and (self.members or found):
            self.labels = sorted(
                {label for member in [*self.members.values(), *found.values()] for label in member.labels}
            )
        added = []
        for node, member in sorted(found.items(), key=lambda item: item[1].index):
            name = member.info.name
            outside = sorted(set(member.labels) - set(self.labels))
            if outside:
                problem = UsageError(
                    f"client {name} has label(s) {outside} that the run's labels {self.labels} lack",
                    where=f"node {node}",
                    hint="name every client's labels in the run config's labels, or fix that client's files",
                )
                if strict:
                    raise problem
                log.warning("%s; left out", problem)
                continue
            if name in self.members and self.members[name].index != member.index:
                raise UsageError(f"two nodes report client {name} with different partitions")
            if name not in self.members:
                added.append(name)
            self.members[name] = member
            self.nodes[node] = name
        return added

    def _check(self, reply: Message) -> Member:
        """The member a node's introduction describes, or a ``UsageError`` saying why it cannot join."""
        where = f"node {reply.metadata.src_node_id}"
        if reply.has_error():
            raise UsageError(f"the client cannot join: {reply.error.reason}", where=where, hint="see that SuperNode")
        try:
            member = _member(reply.content[CLIENT])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"the client's introduction is malformed ({exc})", where=where) from None
        check_name(member.info.name, where)
        return member

    def _place(self, found: dict[int, Member]) -> None:
        """Give clients with their own files (reported place -1) places after every known one, in
        name order: a federation of such clients is ordered by name, as ``--data``'s client files."""
        known = {m.info.name: m.index for m in self.members.values()}
        start = max([*known.values(), *(m.index for m in found.values()), -1]) + 1
        unplaced = sorted({m.info.name for m in found.values() if m.index < 0 and m.info.name not in known})
        places = {**known, **{name: start + i for i, name in enumerate(unplaced)}}
        for member in found.values():
            if member.index < 0:
                member.index = places[member.info.name]


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
        resumed: the run so far, from its checkpoint (``--resume``): Flower's rounds 1, 2, ... of
            ``start(num_rounds=rounds - resumed.round)`` are then the run's rounds after it.
        model: the run's model (a method's server step may run it: ``methods.ServerContext``).
        timeout: seconds to wait for the replies of a method's post-training phase.
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
        resumed: StrategyRun | None = None,
        model: ClientModel | None = None,
        timeout: float = 600.0,
    ) -> None:
        super().__init__(min_train_nodes=min_train_nodes, min_evaluate_nodes=0, min_available_nodes=1)
        self.config = config
        self.roster = roster
        self.initial = initial
        self.method: Method | None = METHODS[strategy](config) if strategy in METHODS else None
        self.run = resumed or StrategyRun(strategy, 0, {name: dict(initial) for name in roster.names})
        if self.method is not None and resumed is None:
            self.run.server = self.method.initial_server(initial, roster.names)
        self.done = self.run.round  # rounds done before this Flower run
        self.on_round = on_round
        self.model = model
        self.timeout = timeout
        self.public = self._public()
        # A method's client -> (the round it was made in, the kept state the client holds in its
        # context.state); a client not here is sent its kept state with its next message.
        self._held: dict[str, tuple[int, State]] = {}
        self._traffic: dict[str, tuple[int, int]] = {}
        self._losses: dict[str, float] = {}
        self._chosen: list[str] = []
        self._started = 0.0
        self._options = config_to_json(config)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client its own θ̄ (the sample: ``participants`` of the in-process loop,
        among the clients connected now)."""
        server_round += self.done
        for name in self.roster.discover(grid):
            if self.method is None:
                self.run.bar.setdefault(name, dict(self.initial))  # a late joiner starts from θ⁰
            else:  # a method's server state is made for the clients at its start (FedMerge's W)
                log.warning("%s joined after %s started; it waits for the next strategy", name, self.run.strategy)
        connected = set(grid.get_node_ids())
        sampled = participants(self.config, self.clients, server_round)
        self._chosen = [n for n in sampled if self.roster.node_of(n, connected) is not None]
        self._started = time.perf_counter()
        return [self._message(name, server_round, MessageType.TRAIN, connected) for name in self._chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step over the clients that replied; the others keep their θ̄."""
        server_round += self.done
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        trained: dict[str, State] = {}
        self._losses, self._traffic = {}, {}
        for name in self._chosen:  # sent its kept state again next time, unless it replies
            self._held.pop(name, None)
        expected = Expected(server_round, self.initial, self.run.bar, set(self._chosen), kept=self.method is not None)
        for reply in valid:
            try:
                got = check_train_reply(reply, self.roster.nodes, expected)
            except LeftOut as why:  # a broken or hostile client: this round goes on without it
                log.warning("round %d: %s", server_round, why)
                continue
            trained[got.client], self._losses[got.client] = got.state, got.loss
            self._traffic[got.client] = self._bytes(got.client, got.state, reply)
            if got.kept is not None:  # what a method's client keeps, as its round left it (``carriage``)
                self.run.bar[got.client] = got.kept
                self._held[got.client] = (server_round, got.kept)
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
            clip=ClipNorm.parse(self.config.clip_norm),
            method=self.method,
            context=None
            if self.model is None
            else ServerContext(self.model, self.public, server_round, self.config.seed),
        )
        self._drop_changed()
        self.run.seconds["server"] += time.perf_counter() - start
        return None, MetricRecord({"participants": len(took_part)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On evaluated rounds, send every connected client its own θ̄ to test."""
        server_round += self.done
        if server_round == self.config.rounds and self.method is not None and self.method.finish is not None:
            self._finish(grid, server_round)
        self._started = time.perf_counter()
        if not evaluates(self.config, server_round):
            return []
        connected = set(grid.get_node_ids())
        names = [n for n in self.clients if self.roster.node_of(n, connected) is not None]
        return [self._message(name, server_round, MessageType.EVALUATE, connected) for name in names]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Close the round: one metrics row per client, as the in-process loop writes them."""
        server_round += self.done
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
        rows = metric_rows(
            self.run.strategy, server_round, names, examples, self._losses, accuracy, traffic=self._traffic
        )
        self.run.metrics.extend(rows)
        self.run.round = server_round
        if self.on_round is not None:
            self.on_round(self.run, list(self._chosen))
        if not accuracy:
            return None
        return MetricRecord({"test-accuracy": sum(accuracy.values()) / len(accuracy)})

    def _message(self, name: str, server_round: int, kind: str, connected: set[int]) -> Message:
        # The options go with every message: a SuperNode may start a fresh ClientApp process for each.
        # The run's labels and the client's place: a client with its own files learns them here.
        record = ConfigRecord(
            {
                "server-round": server_round,
                "client": name,
                "config": self._options,
                "labels": json.dumps(self.roster.labels),
                "index": self.roster.members[name].index,
                "strategy": self.run.strategy,  # a method's client runs its verbs (``carriage``)
            }
        )
        content = RecordDict({CONFIG: record})
        if self.method is None or kind == MessageType.EVALUATE:
            content[ARRAYS] = to_record(self.run.bar[name])
        else:  # a method's round or post-training phase (``carriage``)
            record["clients"] = json.dumps(list(self.run.bar))
            held = self._held.get(name)
            record[KEPT_ROUND] = held[0] if held is not None else 0
            if held is None:
                content[KEPT] = to_record(self.run.bar[name])
            for key, value in server_records(self.run.server).items():
                content[key] = value
        return Message(content=content, message_type=kind, dst_node_id=self.roster.node_of(name, connected))

    @property
    def clients(self) -> list[str]:
        """The clients of this strategy's run, in client order: every known one, or for a method
        those it started with."""
        names = self.roster.names
        return names if self.method is None else [n for n in names if n in self.run.bar]

    def _public(self) -> Tokens | None:
        """The public unlabeled sentences a method's server step may need (``methods.ServerContext``),
        held out of the run's partition as the in-process loop holds them out."""
        if self.method is None or not self.method.needs_public or self.model is None:
            return None
        if self.config.data_dir is not None:
            raise UsageError(
                f"strategy {self.method.name} needs public unlabeled sentences, held out of the embedded corpus",
                hint="run it without --data",
            )
        clients, _ = load_clients(self.config)
        texts = public_sentences(load_bbc(), clients, self.config.public_examples, self.config.seed)
        return self.model.tokenize(texts)

    def _bytes(self, name: str, sent: State, reply: Message) -> tuple[int, int]:
        """(uplink, downlink) bytes of a participant's round as the in-process loop counts them: what
        it sent, and what the strategy sent it (its θ̄; for a method, what its client verb reports)."""
        if self.run.strategy in SILENT:
            return 0, 0
        if self.method is None:
            return state_bytes(sent), state_bytes(self.run.bar[name])
        try:
            return state_bytes(sent), int(reply.content[METRICS]["downlink-bytes"])
        except (KeyError, TypeError, ValueError):
            return state_bytes(sent), 0

    def _drop_changed(self) -> None:
        """Forget that a client holds its kept state when the server step changed it (FedMerge's and
        the universal expert's steps set every client's θ̄): it is sent the new one."""
        for name, (_, state) in list(self._held.items()):
            now = self.run.bar.get(name, {})
            if now.keys() != state.keys() or not all(torch.equal(now[k], state[k]) for k in state):
                del self._held[name]

    def _finish(self, grid: Grid, server_round: int) -> None:
        """The method's post-training phase on every connected client of its run, after the last
        round's server step; a client that fails it keeps its state."""
        start = time.perf_counter()
        connected = set(grid.get_node_ids())
        names = [n for n in self.clients if self.roster.node_of(n, connected) is not None]
        kind = f"{MessageType.TRAIN}.{FINISH}"
        messages = [self._message(name, server_round, kind, connected) for name in names]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            try:
                if reply.has_error():
                    raise LeftOut("a client", reply.error.reason)
                name = sender(reply, self.roster.nodes)
                kept = state_of(reply, KEPT, name, self.initial)
            except LeftOut as why:
                log.warning("post-training phase: %s; it keeps its state", why)
                continue
            self.run.bar[name] = kept
            self._held[name] = (self.config.rounds + 1, kept)
        self.run.seconds["train"] += time.perf_counter() - start

    def _sender(self, reply: Message) -> str | None:
        """The client a reply comes from (``validation.sender``); None, with a warning, when the node is
        unknown or names another client."""
        try:
            return sender(reply, self.roster.nodes)
        except LeftOut as why:
            log.warning("%s", why)
            return None
