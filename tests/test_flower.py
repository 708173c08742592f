"""``fedbip simulate`` on Flower: the strategy's aggregation by hand, then the same tiny run on
Flower's Deployment Engine (a SuperLink and 3 SuperNodes as processes on 127.0.0.1) and Simulation
Engine against the in-process loop, and a client stopped between rounds.

Offline: no telemetry, no update check, no runtime dependency installation, a private FLWR_HOME.
Every process started here runs in its own session and is stopped by its process group, whatever
the test's outcome.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

# First: it makes Flower offline (no telemetry, no update check) before flwr is imported.
from fedbip_cli.simulate.flower import OFFLINE_ENV  # isort: skip

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict  # isort: skip
from flwr.supercore.task_identity import TaskIdentity  # isort: skip

from fedbip_cli.cli import app
from fedbip_cli.errors import FedbipError, SourceError, UsageError
from fedbip_cli.simulate.attacks import choose_attackers, scaled_update
from fedbip_cli.simulate.flower.apps import client_app, expected_clients, introduce, run_federation
from fedbip_cli.simulate.flower.carriage import KEPT, client_view, kept_state, server_from, store_kept
from fedbip_cli.simulate.flower.clientdata import own_files, relabel
from fedbip_cli.simulate.flower.credentials import write_credentials
from fedbip_cli.simulate.flower.engine import simulate_on_flower
from fedbip_cli.simulate.flower.local import APP, LocalFederation
from fedbip_cli.simulate.flower.records import (
    ARRAYS,
    CLIENT,
    CONFIG,
    METRICS,
    config_from_json,
    config_from_run_config,
    config_to_json,
    from_record,
    run_config_from,
    to_record,
)
from fedbip_cli.simulate.flower.strategy import Member, PersonalizedStrategy, Roster
from fedbip_cli.simulate.flower.validation import Expected, LeftOut, check_train_reply
from fedbip_cli.simulate.loop import SimulationConfig, load_clients
from fedbip_cli.simulate.methods import METHODS
from fedbip_cli.simulate.runner import ClientInfo, simulate

CLIENTS = ["client-00", "client-01", "client-02"]
# The issue's tiny run: a 2-layer slice, 3 clients, 2 rounds of 2 local steps, batch 8, 32 tokens.
TINY = SimulationConfig(
    strategies=("fedbip", "fedbip-layerwise"),
    num_layers=2,
    batch_size=8,
    max_length=32,
    local_steps=2,
    rounds=2,
    clients=3,
    groups=3,
    eval_every=2,  # evaluated after the last round only: each message costs a SuperNode a new ClientApp process
)
OFFLINE = {
    **OFFLINE_ENV,
    "HF_HUB_OFFLINE": "1",
    # One thread per process, as in the in-process reference: the sums inside a matmul then run
    # in the same order everywhere, and three ClientApps do not fight over two cores.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def quick(bbc_once: None) -> Iterator[None]:
    """Flower offline for every process of this module, and the BBC corpus read once (``bbc_once``)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run in-process: what every engine must reproduce."""
    out = tmp_path_factory.mktemp("inprocess")
    simulate(TINY, out, overwrite=True, device="cpu")
    return out


# The run over clients with their own files: one strategy, 3 clients, 2 rounds.
OWN_RUN = replace(TINY, strategies=("fedbip",), examples_per_client=10)


@pytest.fixture(scope="module")
def reference_own(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedbip simulate --data`` in-process over the clients' files put in one directory."""
    root = tmp_path_factory.mktemp("own-inprocess")
    data, _ = own_dirs(root)
    out = root / "out"
    simulate(replace(OWN_RUN, data_dir=str(data)), out, device="cpu")
    return out


# -- the strategy, by hand, without a Flower runtime ---------------------------------------------
@pytest.fixture
def identity() -> Iterator[None]:
    """Messages need a task identity, which Flower's runtimes set; set one for building them here."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def tiny_roster(config: SimulationConfig) -> Roster:
    roster = Roster(config)
    for index, name in enumerate(CLIENTS):
        roster.members[name] = Member(ClientInfo(name, index, 10, 5), index, ["a", "b"])
        roster.nodes[100 + index] = name
    roster.labels = ["a", "b"]
    return roster


def reply(node: int, name: str, state: dict[str, torch.Tensor], loss: float, server_round: int = 1) -> Message:
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    content = {
        ARRAYS: to_record(state),
        METRICS: MetricRecord({"train-loss": loss}),
        CONFIG: ConfigRecord({"client": name, "server-round": server_round}),
    }
    return Message(RecordDict(content), reply_to=sent)


class FakeGrid:
    """What the strategy asks of a grid: the connected nodes, and who a new node is (``newcomers``:
    node id -> the client record it answers with)."""

    def __init__(self, nodes: list[int], newcomers: dict[int, ConfigRecord] | None = None) -> None:
        self.nodes = nodes
        self.newcomers = newcomers or {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        assert all(m.metadata.message_type == MessageType.QUERY for m in messages)
        return [Message(RecordDict({CLIENT: self.newcomers[m.metadata.dst_node_id]}), reply_to=m) for m in messages]


def test_aggregation_by_hand(identity: None) -> None:
    """client-02 fails in the round: FedBip over the other two, worked out by hand in float64;
    client-02 keeps its state, and the round's metrics say who trained."""
    config = replace(TINY, strategies=("fedbip",), rounds=1)
    initial = {"w": torch.zeros(2)}
    strategy = PersonalizedStrategy(config, "fedbip", tiny_roster(config), initial)
    strategy.run.bar = {
        "client-00": {"w": torch.tensor([0.5, 0.5])},
        "client-01": {"w": torch.tensor([0.0, 0.0])},
        "client-02": {"w": torch.tensor([3.0, 3.0])},
    }
    sent = list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([100, 101, 102])))
    assert sorted(m.metadata.dst_node_id for m in sent) == [100, 101, 102]
    for message in sent:  # each client is sent its own θ̄, not a global model
        name = str(message.content[CONFIG]["client"])
        assert torch.equal(from_record(message.content[ARRAYS])["w"], strategy.run.bar[name]["w"])
        assert config_from_json(str(message.content[CONFIG]["config"])) == config

    failed = Message(Error(code=5, reason="node unavailable"), reply_to=sent[2])
    replies = [
        reply(100, "client-00", {"w": torch.tensor([1.5, 0.5])}, 0.25),  # τ_0 = (1, 0)
        reply(101, "client-01", {"w": torch.tensor([1.0, 1.0])}, 0.75),  # τ_1 = (1, 1)
        failed,
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["participants"] == 2

    # S_01 = cos(τ_0, τ_1) = 1/√2; row i of P is S_i / Σ_j S_ij (self term 1).
    s = 1 / math.sqrt(2)
    expected = {
        "client-00": [0.5 + (1 + s) / (1 + s), 0.5 + s / (1 + s)],
        "client-01": [(s + 1) / (1 + s), 1 / (1 + s)],
        "client-02": [3.0, 3.0],
    }
    for name, values in expected.items():
        got = strategy.run.bar[name]["w"].double()
        assert torch.allclose(got, torch.tensor(values, dtype=torch.float64), atol=1e-6), (name, got)
    assert strategy.run.similarity[-1]["clients"] == ["client-00", "client-01"]

    strategy.aggregate_evaluate(1, [])
    rows = {r["client"]: r for r in strategy.run.metrics}
    assert [rows[c]["train_loss"] for c in CLIENTS] == [0.25, 0.75, None]
    assert all(rows[c]["test_accuracy"] is None for c in CLIENTS)


def test_a_late_client_starts_from_the_initial_state(identity: None) -> None:
    """A node that connects after round 1 says who it is, joins the roster with θ⁰, is sent θ⁰ to
    train, and has a metrics row from then on."""
    config = replace(TINY, strategies=("fedbip",), rounds=2)
    roster = tiny_roster(config)
    del roster.members["client-02"], roster.nodes[102]
    initial = {"w": torch.zeros(2)}
    strategy = PersonalizedStrategy(config, "fedbip", roster, initial)
    list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([100, 101])))
    strategy.aggregate_train(
        1,
        [
            reply(100, "client-00", {"w": torch.tensor([1.0, 0.0])}, 0.1),
            reply(101, "client-01", {"w": torch.ones(2)}, 0.2),
        ],
    )
    strategy.aggregate_evaluate(1, [])
    assert [r["client"] for r in strategy.run.metrics] == CLIENTS[:2]

    late = ConfigRecord(
        {"name": "client-02", "index": 2, "group": 2, "train-examples": 10, "test-examples": 5, "labels": '["a", "b"]'}
    )
    sent = list(strategy.configure_train(2, None, ConfigRecord(), FakeGrid([100, 101, 107], {107: late})))
    to_late = [m for m in sent if m.metadata.dst_node_id == 107]
    assert len(sent) == 3 and len(to_late) == 1
    assert torch.equal(from_record(to_late[0].content[ARRAYS])["w"], initial["w"])
    assert not torch.equal(strategy.run.bar["client-00"]["w"], initial["w"])
    strategy.aggregate_train(2, [reply(107, "client-02", {"w": torch.ones(2)}, 0.3, server_round=2)])
    strategy.aggregate_evaluate(2, [])
    assert [(r["round"], r["client"], r["train_loss"]) for r in strategy.run.metrics[2:]] == [
        (2, "client-00", None),
        (2, "client-01", None),
        (2, "client-02", 0.3),
    ]


def test_reply_naming_another_client_is_left_out(identity: None) -> None:
    """client-00's node replies as client-01: that reply is not taken for either client."""
    config = replace(TINY, strategies=("fedbip",), rounds=1)
    strategy = PersonalizedStrategy(config, "fedbip", tiny_roster(config), {"w": torch.zeros(2)})
    list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([100, 101, 102])))
    replies = [reply(100, "client-01", {"w": torch.ones(2)}, 0.1), reply(102, "client-02", {"w": torch.ones(2)}, 0.2)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["participants"] == 1
    assert torch.equal(strategy.run.bar["client-00"]["w"], torch.zeros(2))
    assert torch.equal(strategy.run.bar["client-01"]["w"], torch.zeros(2))
    assert torch.equal(strategy.run.bar["client-02"]["w"], torch.ones(2))


@pytest.mark.parametrize(
    "bad", [{"w": torch.tensor([float("nan"), 0.0])}, {"w": torch.ones(3)}, {"w": torch.ones(2), "x": torch.ones(1)}]
)
def test_a_state_that_does_not_fit_is_left_out(identity: None, bad: dict[str, torch.Tensor]) -> None:
    """A reply whose state has NaNs, another shape or other names: that client is left out of the
    round and keeps its state; the others are merged as if it had not replied."""
    config = replace(TINY, strategies=("fedbip",), rounds=1)
    strategy = PersonalizedStrategy(config, "fedbip", tiny_roster(config), {"w": torch.zeros(2)})
    list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([100, 101, 102])))
    replies = [
        reply(100, "client-00", {"w": torch.tensor([1.0, 0.0])}, 0.1),
        reply(101, "client-01", {"w": torch.tensor([1.0, 0.0])}, 0.2),
        reply(102, "client-02", bad, 0.3),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["participants"] == 2
    assert torch.equal(strategy.run.bar["client-02"]["w"], torch.zeros(2))
    assert torch.allclose(strategy.run.bar["client-00"]["w"], torch.tensor([1.0, 0.0]))


# -- hostile replies: the validator as a pure function ---------------------------------------------
SENT = {"w": torch.tensor([3.0, 4.0])}  # norm 5: a reply's state may have a norm up to 100 × (1 + 5)
ROUND3 = Expected(3, {"w": torch.zeros(2)}, {"client-00": SENT}, {"client-00"})


def hostile(**change: Any) -> Message:
    """client-00's train reply from node 100 for round 3, with ``change``: ``state``, ``loss``, ``name``,
    ``round``, ``node`` or ``content`` (a function editing the RecordDict)."""
    message = reply(
        change.get("node", 100),
        change.get("name", "client-00"),
        change.get("state", {"w": torch.tensor([3.5, 4.0])}),
        change.get("loss", 0.5),
        change.get("round", 3),
    )
    if "content" in change:
        change["content"](message.content)
    return message


HOSTILE = {
    "nan": ({"state": {"w": torch.tensor([float("nan"), 0.0])}}, "tensor w holds NaN or Inf"),
    "inf": ({"state": {"w": torch.tensor([float("inf"), 0.0])}}, "tensor w holds NaN or Inf"),
    "shape": ({"state": {"w": torch.ones(3)}}, "tensor w is torch.float32 (3,), the model's torch.float32 (2,)"),
    "dtype": ({"state": {"w": torch.ones(2, dtype=torch.float64)}}, "tensor w is torch.float64 (2,)"),
    "names": ({"state": {"w": torch.ones(2), "x": torch.ones(1)}}, "other tensor names than the model's (x)"),
    "huge-norm": ({"state": {"w": torch.tensor([600.1, 0.0])}}, "norm 600 is over 100 × (1 + 5"),
    "other-name": (
        {"name": "client-01"},
        "client-00 left out: its reply from node 100 names another client, 'client-01'",
    ),
    "unknown-node": ({"node": 999}, "node 999 left out: it is not a client of this run"),
    "not-asked": ({"node": 101, "name": "client-01"}, "client-01 left out: it was not asked to train this round"),
    "stale-round": ({"round": 2}, "is for round 2, not round 3 (stale)"),
    "no-round": ({"content": lambda c: c[CONFIG].pop("server-round")}, "names no round"),
    "nan-loss": ({"loss": float("nan")}, "its train loss is nan"),
    "no-state": ({"content": lambda c: c.pop(ARRAYS)}, "its reply has no 'arrays' state"),
    "too-many-bytes": (
        {"content": lambda c: c.__setitem__("extra", to_record({"x": torch.zeros(20_000)}))},
        "bytes of arrays, more than the",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_every_hostile_reply_is_left_out_saying_why(identity: None, case: str) -> None:
    change, why = HOSTILE[case]
    with pytest.raises(LeftOut) as caught:
        check_train_reply(hostile(**change), {100: "client-00", 101: "client-01"}, ROUND3)
    assert why in str(caught.value)


def test_an_honest_reply_passes_up_to_the_norm_bound(identity: None) -> None:
    got = check_train_reply(hostile(), {100: "client-00"}, ROUND3)
    assert (got.client, got.loss, got.kept) == ("client-00", 0.5, None)
    assert torch.equal(got.state["w"], torch.tensor([3.5, 4.0]))
    at_bound = hostile(state={"w": torch.tensor([600.0, 0.0])})  # exactly 100 × (1 + 5)
    assert check_train_reply(at_bound, {100: "client-00"}, ROUND3).state["w"][0] == 600.0


def test_a_hostile_reply_is_one_log_line_and_enters_no_model(identity: None, caplog: pytest.LogCaptureFixture) -> None:
    """The strategy over 3 clients: client-02's huge state is left out with one line naming it and why;
    the other two are merged as if it had not replied, and it keeps its state."""
    config = replace(TINY, strategies=("fedbip",), rounds=1)
    strategy = PersonalizedStrategy(config, "fedbip", tiny_roster(config), {"w": torch.zeros(2)})
    list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([100, 101, 102])))
    replies = [
        reply(100, "client-00", {"w": torch.tensor([1.0, 0.0])}, 0.1),
        reply(101, "client-01", {"w": torch.tensor([1.0, 0.0])}, 0.2),
        reply(102, "client-02", {"w": torch.tensor([1e6, 1.0])}, 0.3),
    ]
    with caplog.at_level("WARNING"):
        _, metrics = strategy.aggregate_train(1, replies)
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert lines == ["round 1: client-02 left out: its state's norm 1e+06 is over 100 × (1 + 0, the state it was sent)"]
    assert metrics["participants"] == 2
    assert torch.equal(strategy.run.bar["client-02"]["w"], torch.zeros(2))
    for name in ("client-00", "client-01"):
        assert torch.equal(strategy.run.bar[name]["w"], torch.tensor([1.0, 0.0]))


def test_run_config_round_trip_and_app_defaults() -> None:
    """The app's [tool.flwr.app.config] holds every option of simulate, with simulate's defaults."""
    import tomllib

    assert config_from_run_config(run_config_from(TINY)) == TINY
    assert config_from_json(config_to_json(TINY)) == TINY
    table = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(run_config_from(SimulationConfig())) <= set(table)
    assert config_from_run_config(table) == SimulationConfig()


# -- clients that hold their own files (--node-config "data-dir=...") -------------------------------
# Three clients' own examples; the run's labels are the union (3), which no single client holds.
OWN = {
    "alice": [("sport", "the match ended in a draw after extra time"), ("tech", "the new chip doubles battery life")],
    "bob": [("tech", "a software update fixes the phone's camera"), ("politics", "the vote was delayed by a week")],
    "carol": [("sport", "the runner broke the national record"), ("politics", "ministers met to discuss the budget")],
}


def write_rows(path: Path, rows: list[tuple[str, str]], copies: int = 8) -> None:
    """``copies`` numbered variants of each (label, text) row as a --data file."""
    lines = [{"text": f"{text} ({i})", "label": label} for i in range(copies) for label, text in rows]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def own_dirs(root: Path) -> tuple[Path, dict[str, Path]]:
    """The same clients as a --data directory and as one directory per client (train.jsonl each)."""
    (root / "data").mkdir(parents=True)
    dirs = {}
    for name, rows in OWN.items():
        write_rows(root / "data" / f"{name}.jsonl", rows)
        dirs[name] = root / "clients" / name
        dirs[name].mkdir(parents=True)
        write_rows(dirs[name] / "train.jsonl", rows)
    return root / "data", dirs


def test_own_files_are_the_clients_of_data(tmp_path: Path) -> None:
    """A client's own train.jsonl, at its place in name order, is --data's client from the same file:
    the same train/test split and (renumbered into the union of labels) the same labels."""
    data, dirs = own_dirs(tmp_path)
    config = replace(TINY, examples_per_client=10)
    reference, union = load_clients(replace(config, data_dir=str(data)))
    assert union == ["politics", "sport", "tech"]
    for index, (name, directory) in enumerate(dirs.items()):
        own, labels = own_files(directory, name, config, index)
        assert labels == sorted({label for label, _ in OWN[name]})
        got, want = relabel(own, labels, union), reference[index]
        assert (got.name, got.train_texts, got.test_texts) == (want.name, want.train_texts, want.test_texts)
        assert (got.train_labels, got.test_labels, got.num_labels) == (want.train_labels, want.test_labels, 3)
    with pytest.raises(UsageError, match=r"client alice has label\(s\) \['tech'\] that the run's labels"):
        relabel(*own_files(dirs["alice"], "alice", config, 0), ["politics", "sport"])


def test_own_test_file_and_bad_files(tmp_path: Path) -> None:
    """With test.jsonl every train row trains and every test row tests; a bad row, two train files or
    a name that is not a plain name fail with one clear error naming the file."""
    directory = tmp_path / "alice"
    directory.mkdir()
    write_rows(directory / "train.jsonl", OWN["alice"], copies=3)
    write_rows(directory / "test.jsonl", [("chess", "a quiet opening")], copies=2)
    client, labels = own_files(directory, "alice", replace(TINY, examples_per_client=None), 0)
    assert labels == ["chess", "sport", "tech"] and len(client.train_texts) == 6
    assert client.test_texts == ["a quiet opening (0)", "a quiet opening (1)"] and client.test_labels == [0, 0]
    assert sorted(client.train_texts) == sorted(f"{t} ({i})" for i in range(3) for _, t in OWN["alice"])

    (directory / "train.jsonl").write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n')
    with pytest.raises(SourceError, match=r"train.jsonl:2: row has no 'label' field"):
        own_files(directory, "alice", TINY, 0)
    (directory / "train.csv").write_text("text,label\nx,a\n")
    with pytest.raises(SourceError, match="both train.jsonl and train.csv"):
        own_files(directory, "alice", TINY, 0)
    with pytest.raises(UsageError, match="not a plain name"):
        own_files(directory, "../alice", TINY, 0)
    with pytest.raises(SourceError, match="no train.jsonl or train.csv"):
        own_files(tmp_path, "x", TINY, 0)


def test_a_client_that_cannot_join_replies_one_clear_error(identity: None, tmp_path: Path) -> None:
    """introduce on a SuperNode whose data-dir has a bad row replies fedbip's one-line error (not
    Flower's exception text), and the server's first discovery fails the run with it."""
    directory = tmp_path / "alice"
    directory.mkdir()
    (directory / "train.jsonl").write_text('{"text": "fine", "label": "a"}\n{"text": 3, "label": "a"}\n')
    request = Message(
        RecordDict({CONFIG: ConfigRecord({"config": config_to_json(TINY)})}),
        message_type=MessageType.QUERY,
        dst_node_id=1,
    )
    context = Context(1, 7, {"data-dir": str(directory)}, RecordDict(), {})
    answer = introduce(request, context)
    assert answer.has_error() and answer.error.reason.startswith(f"{directory / 'train.jsonl'}:2: 'text' is 3")

    grid = FakeGrid([100], {})
    grid.send_and_receive = lambda messages, timeout: [Message(answer.error, reply_to=messages[0])]
    with pytest.raises(UsageError, match=r"node 100: the client cannot join: .*train.jsonl:2: 'text' is 3"):
        Roster(TINY).discover(grid, strict=True)
    assert Roster(TINY).discover(grid) == []  # after the first round: left out, with a warning


def introduction(name: str, labels: list[str], index: int = -1) -> ConfigRecord:
    return ConfigRecord(
        {
            "name": name,
            "index": index,
            "group": -1,
            "train-examples": 8,
            "test-examples": 2,
            "labels": json.dumps(labels),
        }
    )


def test_roster_agrees_on_labels_and_places_own_clients_by_name(identity: None) -> None:
    """Clients with their own files are placed in name order, whatever order their nodes answer in;
    the labels are the sorted union, or the run's own list, outside which a client cannot join."""
    newcomers = {7: introduction("carol", ["b"]), 8: introduction("alice", ["c", "a"]), 9: introduction("bob", ["a"])}
    roster = Roster(TINY)
    assert sorted(roster.discover(FakeGrid([7, 8, 9], newcomers), strict=True)) == ["alice", "bob", "carol"]
    assert roster.names == ["alice", "bob", "carol"] and roster.labels == ["a", "b", "c"]
    late = {**newcomers, 5: introduction("aaron", ["b"])}
    assert roster.discover(FakeGrid([5, 7, 8, 9], late)) == ["aaron"]
    assert roster.names == ["alice", "bob", "carol", "aaron"]  # a late joiner comes after the others
    assert roster.discover(FakeGrid([5, 6, 7, 8, 9], {**late, 6: introduction("dan", ["z"])})) == []

    pinned = Roster(TINY, ["a", "b"])
    with pytest.raises(UsageError, match=r"node 8: client alice has label\(s\) \['c'\] that the run's labels"):
        pinned.discover(FakeGrid([7, 8, 9], newcomers), strict=True)
    with pytest.raises(UsageError, match="not a plain name"):
        Roster(TINY).discover(FakeGrid([7], {7: introduction("../etc", ["a"])}), strict=True)


def test_a_data_directory_has_one_supernode_per_file(tmp_path: Path) -> None:
    """With --data, the run has one client per file whatever --clients says: that many SuperNodes."""
    data = tmp_path / "clients"
    data.mkdir()
    for name in ("alpha", "beta", "gamma", "delta"):
        rows = [{"text": f"{name} sentence number {i} of the test", "label": i % 2} for i in range(10)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert expected_clients(replace(TINY, data_dir=str(data))) == 4
    assert expected_clients(TINY) == 3


# -- engines --------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter(out: Path, strategy: str, client: str) -> dict[str, torch.Tensor]:
    folder = out / "adapters" / strategy if (out / "adapters" / strategy).is_dir() else out / "adapters"
    return load_file(folder / client / "adapter_model.safetensors")


def assert_same_run(got: Path, want: Path, strategies: tuple[str, ...], clients: list[str] = CLIENTS) -> float:
    """Same metrics (losses within 1e-6, accuracies equal) and adapters within 1e-6; returns the
    largest adapter difference."""
    rows, expected = read_jsonl(got / "metrics.jsonl"), read_jsonl(want / "metrics.jsonl")
    assert [(r["strategy"], r["round"], r["client"]) for r in rows] == [
        (r["strategy"], r["round"], r["client"]) for r in expected
    ]
    for row, ref in zip(rows, expected):
        assert row["test_accuracy"] == ref["test_accuracy"] and row["examples"] == ref["examples"], (row, ref)
        assert row["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6), (row, ref)
        assert (row.get("uplink_bytes"), row.get("downlink_bytes")) == (ref["uplink_bytes"], ref["downlink_bytes"])
    worst = 0.0
    for strategy in strategies:
        for client in clients:
            a, b = adapter(got, strategy, client), adapter(want, strategy, client)
            assert a.keys() == b.keys()
            worst = max(worst, *((a[k] - b[k]).abs().max().item() for k in a))
    assert worst <= 1e-6
    summary = json.loads((got / "summary.json").read_text())
    assert [c["name"] for c in summary["clients"]] == clients
    return worst


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LocalFederation]:
    """A SuperLink and 3 SuperNodes on 127.0.0.1; every process stopped whatever the test's outcome."""
    with LocalFederation(tmp_path / "federation", env=OFFLINE) as fed:
        fed.start_superlink()
        for index in range(3):
            fed.start_supernode(index, 3)
        yield fed


def wait_run(fed: LocalFederation, run: subprocess.Popen, timeout: float) -> None:
    code = run.wait(timeout=timeout)  # on a timeout, the fixture stops the run with the rest
    assert code == 0, fed.log("flwr-run")


def test_deployment_engine_equals_inprocess(federation: LocalFederation, reference: Path, tmp_path: Path) -> None:
    """SuperLink + 3 SuperNodes: fedbip and fedbip-layerwise give in-process simulate's adapters and metrics."""
    out = tmp_path / "deployment"
    start = time.perf_counter()
    wait_run(federation, federation.start_run(TINY, out), timeout=900)
    assert (out / "summary.json").is_file(), federation.log("superlink")
    worst = assert_same_run(out, reference, TINY.strategies)
    print(f"deployment engine: {time.perf_counter() - start:.1f} s, worst adapter difference {worst:.3g}")


class Interrupted(Exception):
    """Stops an in-process run after its first round (a user's Ctrl-C)."""


def stop_after_first_round(strategy: str, round_: int, accuracy: float | None) -> None:
    raise Interrupted


def test_simulation_engine_through_the_cli_resumes(reference: Path, tmp_path: Path) -> None:
    """``fedbip simulate --engine flower --resume`` (Flower's Simulation Engine) finishes a run the
    in-process loop left after fedbip's round 1: fedbip from its checkpoint, fedbip-layerwise from
    the start; the result is the uninterrupted in-process run."""
    out = tmp_path / "simulation"
    with pytest.raises(Interrupted):
        simulate(TINY, out, device="cpu", round_done=stop_after_first_round)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["fedbip.safetensors"]
    args = ["simulate", "--engine", "flower", "--compare", ",".join(TINY.strategies), "--out", out, "--resume"]
    args += ["--num-layers", 2, "--batch-size", 8, "--local-steps", 2, "--rounds", 2, "--clients", 3]
    args += ["--groups", 3, "--eval-every", 2, "--device", "cpu"]
    start = time.perf_counter()
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    worst = assert_same_run(out, reference, TINY.strategies)
    print(f"simulation engine: {time.perf_counter() - start:.1f} s, worst adapter difference {worst:.3g}")


def test_simulation_engine_seeds_and_clip_norm(tmp_path: Path) -> None:
    """``--seeds 0,1 --clip-norm auto`` on Flower: one Flower run per seed, each the in-process seed's
    run (the updates clipped in the shared server step), and the same summary over seeds."""
    config = replace(TINY, strategies=("fedbip",), rounds=1, clip_norm="auto")
    want = simulate(config, tmp_path / "inprocess", seed_list=[0, 1], device="cpu").summary
    out = tmp_path / "flower"
    args = ["simulate", "--engine", "flower", "--seeds", "0,1", "--clip-norm", "auto", "--out", out]
    args += ["--num-layers", 2, "--batch-size", 8, "--local-steps", 2, "--rounds", 1, "--clients", 3]
    args += ["--groups", 3, "--eval-every", 2, "--device", "cpu"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        assert_same_run(out / f"seed-{seed}", tmp_path / "inprocess" / f"seed-{seed}", config.strategies)
        assert all("clip" in row for row in read_jsonl(out / f"seed-{seed}" / "similarity.jsonl"))
    got = json.loads((out / "summary.json").read_text())
    assert got["seeds"] == [0, 1] and got["strategies"].keys() == want["strategies"].keys()
    for name, entry in got["strategies"].items():  # every measure over seeds; seconds are the runs' own
        assert {k: v for k, v in entry.items() if k != "seconds"} == {
            k: v for k, v in want["strategies"][name].items() if k != "seconds"
        }


# Every method of methods.METHODS, tiny: FedMerge with 2 global models, TAP's and the universal
# expert's phases of 2 steps on 16 public sentences; 2 rounds, so that kept client state crosses one.
METHOD_RUN = replace(
    TINY,
    strategies=tuple(METHODS),
    global_models=2,
    tap_kd_steps=2,
    public_examples=16,
    distill_steps=2,
)


def test_every_method_on_the_simulation_engine_equals_inprocess(tmp_path: Path) -> None:
    """Each method's verbs run on Flower through the same code (server state in the strategy, what a
    client keeps in its SuperNode's context.state, TAP's post-training phase as a last message round):
    the same adapters, losses, accuracies and bytes per round as in-process."""
    reference = tmp_path / "inprocess"
    simulate(METHOD_RUN, reference, device="cpu")
    out = tmp_path / "flower"
    start = time.perf_counter()
    simulate_on_flower(METHOD_RUN, out)
    worst = assert_same_run(out, reference, METHOD_RUN.strategies)
    print(f"methods on the simulation engine: {time.perf_counter() - start:.1f} s, worst difference {worst:.3g}")


def test_a_method_client_without_its_kept_state_says_so(identity: None) -> None:
    """A method's client told to use the state it kept after round 1, which its SuperNode no longer
    holds (restarted), replies with one clear error; sent that state, it keeps it in context.state."""
    context = Context(1, 7, {}, RecordDict(), {})
    content = RecordDict()
    with pytest.raises(FedbipError, match="does not hold its fedoa state of round 1"):
        kept_state(content, context, "client-00", "fedoa", 1)
    store_kept(context, "fedoa", {"w": torch.ones(2)}, 1)
    assert torch.equal(kept_state(content, context, "client-00", "fedoa", 1)["w"], torch.ones(2))
    with pytest.raises(FedbipError, match="round 2"):
        kept_state(content, context, "client-00", "fedoa", 2)
    content[KEPT] = to_record({"w": torch.zeros(2)})
    assert torch.equal(kept_state(content, context, "client-00", "fedoa", 2)["w"], torch.zeros(2))
    view = client_view("fedoa", 3, CLIENTS, "client-01", {"w": torch.ones(2)}, {})
    assert list(view.bar) == CLIENTS and view.bar["client-00"] == {} and view.round == 2


def test_engine_flower_refuses_an_unknown_engine(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--engine", "ray", "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "inprocess" in result.stderr, result.output


def test_supernode_stopped_between_rounds(federation: LocalFederation, tmp_path: Path) -> None:
    """client-02's SuperNode stops after round 1: round 2 goes on with the other two, client-02
    keeps its round-1 state (the in-process run of one round), and the metrics say who trained."""
    config = replace(TINY, strategies=("fedbip",))
    one_round = tmp_path / "one-round"
    simulate(replace(config, rounds=1), one_round, device="cpu")
    out = tmp_path / "dropped"
    run = federation.start_run(config, out, **{"round-timeout": 120.0})
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file():  # written when round 1 ends
        assert time.monotonic() < deadline and run.poll() is None, federation.log("flwr-run")
        time.sleep(0.05)
    federation.stop("supernode-2")
    wait_run(federation, run, timeout=900)

    rows = {(r["round"], r["client"]): r for r in read_jsonl(out / "metrics.jsonl")}
    assert all(rows[1, c]["train_loss"] is not None for c in CLIENTS)
    assert rows[2, "client-02"]["train_loss"] is None and rows[2, "client-02"]["test_accuracy"] is None
    assert all(rows[2, c]["train_loss"] is not None for c in CLIENTS[:2])
    similarity = read_jsonl(out / "similarity.jsonl")
    assert [s["clients"] for s in similarity] == [CLIENTS, CLIENTS[:2]]
    kept, after_one = (
        load_file(out / "adapters" / "client-02" / "adapter_model.safetensors"),
        load_file(one_round / "adapters" / "client-02" / "adapter_model.safetensors"),
    )
    assert max((kept[k] - after_one[k]).abs().max().item() for k in kept) <= 1e-6
    moved = load_file(out / "adapters" / "client-00" / "adapter_model.safetensors")
    before = load_file(one_round / "adapters" / "client-00" / "adapter_model.safetensors")
    assert max((moved[k] - before[k]).abs().max().item() for k in moved) > 1e-4


def test_deployment_with_clients_that_hold_their_own_files(reference_own: Path, tmp_path: Path) -> None:
    """SuperNodes started with --node-config "data-dir=..." (each its own train.jsonl): a run whose
    labels leave one out fails at once with one clear error; the run with agreed labels gives
    ``fedbip simulate --data`` over the same files, in-process."""
    _, dirs = own_dirs(tmp_path)
    with LocalFederation(tmp_path / "federation", env=OFFLINE) as fed:
        fed.start_superlink()
        for index, directory in enumerate(dirs.values()):
            fed.start_supernode(index, len(dirs), node_config=f'data-dir="{directory}"')  # a string value: quoted
        refused = tmp_path / "refused"
        fed.start_run(OWN_RUN, refused, labels="politics,sport").wait(timeout=600)  # flwr run exits 0 all the same
        message = "client alice has label(s) ['tech'] that the run's labels ['politics', 'sport'] lack"
        assert message in fed.log("flwr-run", tail=20000), fed.log("flwr-run")
        assert not refused.exists()

        out = tmp_path / "own"
        wait_run(fed, fed.start_run(OWN_RUN, out), timeout=900)
    worst = assert_same_run(out, reference_own, OWN_RUN.strategies, clients=list(OWN))
    print(f"deployment engine, own files: worst adapter difference {worst:.3g}")


def test_local_federation_leaves_no_process(tmp_path: Path) -> None:
    """Whatever happens inside it, a LocalFederation stops every process group it started."""
    groups = []
    with pytest.raises(KeyboardInterrupt), LocalFederation(tmp_path, env=OFFLINE) as fed:
        fed.start_superlink()
        fed.start_supernode(0, 1)
        groups = [p.pid for p in fed.processes.values()]
        raise KeyboardInterrupt  # as a user's Ctrl-C, or pytest stopping a test
    assert len(groups) == 2
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


def test_attacks_are_refused_on_flower(tmp_path: Path) -> None:
    """--attack is not wired to Flower: the ServerApp refuses it before it waits for anyone."""
    with pytest.raises(UsageError, match="attack is not wired to Flower"):
        run_federation(None, replace(TINY, attack="scaled", attackers=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- an authenticated deployment: TLS and SuperNode authentication --------------------------------
# 2 clients, 1 round of one strategy: the deployment's cost is a ClientApp process per message.
SECURE_RUN = replace(TINY, strategies=("fedbip",), clients=2, groups=2, rounds=1, eval_every=1)


def test_authenticated_deployment_runs_registered_supernodes_only(tmp_path: Path) -> None:
    """A TLS SuperLink with --enable-supernode-auth and two registered SuperNodes gives in-process
    simulate's adapters; a SuperNode with an unregistered key (posing as client 1) and a plaintext one
    (posing as client 0) are refused, and the run goes on without them."""
    made = write_credentials(tmp_path / "secrets", ["alice", "bob", "mallory"])
    reference = tmp_path / "inprocess"
    simulate(SECURE_RUN, reference, device="cpu")
    out = tmp_path / "secure"
    with LocalFederation(tmp_path / "federation", env=OFFLINE, credentials=made) as fed:
        fed.start_superlink()
        for name in ("alice", "bob"):
            fed.register(made.supernodes[name].with_suffix(".pub"))
        fed.start_supernode(2, 2, node_config="partition-id=1 num-partitions=2", key=made.supernodes["mallory"])
        fed.start_supernode(3, 2, node_config="partition-id=0 num-partitions=2", insecure=True)
        fed.start_supernode(0, 2, key=made.supernodes["alice"])
        fed.start_supernode(1, 2, key=made.supernodes["bob"])
        wait_run(fed, fed.start_run(SECURE_RUN, out), timeout=900)
        superlink, unregistered, plaintext = (
            fed.log(n, tail=100_000) for n in ("superlink", "supernode-2", "supernode-3")
        )
    assert_same_run(out, reference, SECURE_RUN.strategies, clients=CLIENTS[:2])  # the two registered clients only
    assert "Failed to activate SuperNode" in unregistered  # Flower's exit code 305
    assert "No SuperNode found with the given public key" in superlink
    assert "Connection attempt failed" in plaintext
    for log in (unregistered, plaintext):
        assert "Received successfully" not in log  # no message ever reached either


# -- hostile ClientApps, end to end through the ServerApp -----------------------------------------
Corrupt = Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


class InProcessGrid:
    """A grid whose SuperNodes are calls of a ClientApp in this process (node 100 + i: partition i of
    n): the ServerApp's and the ClientApp's code end to end, without Flower's transport or Ray."""

    def __init__(self, app: Callable[[Message, Context], Message], clients: int) -> None:
        self.app = app
        self.contexts = {
            100 + i: Context(1, 100 + i, {"partition-id": i, "num-partitions": clients}, RecordDict(), {})
            for i in range(clients)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def sent_to(message: Message, name: str) -> dict[str, torch.Tensor]:
    """The state the server sent client ``name`` in a train message, which its reply updates: θ̄, or for
    a method what its verbs make of the server state it carries (``Method.sent_from``)."""
    if ARRAYS in message.content.array_records:
        return from_record(message.content[ARRAYS])
    config = message.content[CONFIG]
    method = METHODS[str(config["strategy"])](replace(METHOD_RUN, strategies=(str(config["strategy"]),)))
    clients = json.loads(str(config["clients"]))
    view = client_view(
        str(config["strategy"]), int(config["server-round"]), clients, name, {}, server_from(message.content)
    )
    return method.sent_from(view, [name])[name]


def hostile_client_app(corrupt: Corrupt) -> Callable[[Message, Context], Message]:
    """fedbip's ClientApp, except that a train reply carries ``corrupt(client, state sent, state trained)``
    instead of the trained state, where that is not None."""

    def serve(message: Message, context: Context) -> Message:
        answer = client_app(message, context)
        if message.metadata.message_type == MessageType.TRAIN and not answer.has_error():
            name = str(answer.content[CONFIG]["client"])
            changed = corrupt(name, sent_to(message, name), from_record(answer.content[ARRAYS]))
            if changed is not None:
                answer.content[ARRAYS] = to_record(changed)
        return answer

    return serve


def test_a_nan_client_is_left_out_and_the_run_goes_on(
    identity: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """client-02's ClientApp replies with NaN: the ServerApp logs one line naming it and why, finishes the
    run, and no other client's adapter holds a NaN; client-02 has no train loss that round."""
    config = replace(TINY, strategies=("fedbip",), rounds=1, eval_every=1)

    def nan(name: str, sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict | None:
        return {k: torch.full_like(v, float("nan")) for k, v in trained.items()} if name == "client-02" else None

    with caplog.at_level("WARNING", logger="fedbip_cli"):
        run_federation(InProcessGrid(hostile_client_app(nan), 3), config, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("round 1: client-02 left out: tensor "), lines
    assert lines[0].endswith("holds NaN or Inf")
    rows = {r["client"]: r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")}
    assert rows["client-02"]["train_loss"] is None and rows["client-00"]["train_loss"] is not None
    for client in CLIENTS:
        assert all(bool(torch.isfinite(t).all()) for t in adapter(tmp_path / "out", "fedbip", client).values())


@pytest.mark.parametrize("strategy", ["fedbip", *METHODS])
def test_clip_norm_bounds_a_scaled_update_on_flower_bitwise_as_in_process(
    identity: None, tmp_path: Path, strategy: str
) -> None:
    """A ClientApp that sends its update ×10 (``attacks.scaled_update``) with --clip-norm auto gives, through
    the ServerApp, bit for bit the adapters of in-process ``--attack scaled --attack-scale 10 --clip-norm auto``,
    for FedBip and for every method (whose sent states are clipped before it aggregates them)."""
    config = replace(METHOD_RUN, strategies=(strategy,), rounds=1 if strategy == "fedbip" else 2, clip_norm="auto")
    simulate(replace(config, attack="scaled", attackers=1, attack_scale=10.0), tmp_path / "inprocess", device="cpu")
    (attacker,) = choose_attackers(CLIENTS, 1, config.seed)

    def scaled(name: str, sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict | None:
        return scaled_update(sent, trained, 10.0) if name == attacker else None

    run_federation(InProcessGrid(hostile_client_app(scaled), 3), config, tmp_path / "flower")
    for client in CLIENTS:
        got, want = adapter(tmp_path / "flower", strategy, client), adapter(tmp_path / "inprocess", strategy, client)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), client
    clipped = read_jsonl(tmp_path / "flower" / "similarity.jsonl")[0]["clip"]
    assert clipped == read_jsonl(tmp_path / "inprocess" / "similarity.jsonl")[0]["clip"]
    assert all(attacker in group["clipped"] for group in clipped.values())  # the ×10 update was scaled down


def test_the_serverapps_overwrite_keeps_the_old_run_until_the_new_one_is_complete(
    identity: None, tmp_path: Path
) -> None:
    """run_federation(overwrite=True), as a deployment's ServerApp runs it: while the new run trains, the
    old run is still whole in OUT (staged beside it, swapped through merge's journal); a run that fails
    mid-way leaves the old run as it was; a finished one replaces it and leaves nothing beside it."""
    config = replace(TINY, strategies=("fedbip",), rounds=1)
    out = tmp_path / "run"
    run_federation(InProcessGrid(client_app, 3), config, out)
    old = (out / "summary.json").read_bytes()
    seen: list[bool] = []

    def watching(message: Message, context: Context) -> Message:
        seen.append((out / "summary.json").read_bytes() == old)
        return client_app(message, context)

    def failing(message: Message, context: Context) -> Message:
        if message.metadata.message_type == MessageType.TRAIN:
            raise KeyboardInterrupt  # a kill in the middle of the new run
        return client_app(message, context)

    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(failing, 3), replace(config, seed=1), out, overwrite=True)
    assert (out / "summary.json").read_bytes() == old
    run_federation(InProcessGrid(watching, 3), replace(config, seed=1), out, overwrite=True)
    assert seen and all(seen)
    assert (out / "summary.json").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_relay_clientapp_keeps_one_worker_per_supernode(
    identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment's ClientApp (``relay``) imports no torch and hands each message to a long-lived worker:
    two messages of one SuperNode are answered by the same worker process, with fedbip's ClientApp's
    replies (the same as calling it here); another SuperNode gets its own worker; a bad client's error
    comes back as fedbip's one line; the worker stops (socket removed) when asked."""
    import signal

    from fedbip_cli.simulate.flower import relay
    from fedbip_cli.simulate.flower.worker import socket_path

    check = subprocess.run(
        [sys.executable, "-c", "import sys, fedbip_cli.simulate.flower.relay; print('torch' in sys.modules)"],
        capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=120,
    )  # fmt: skip
    assert check.stdout.strip() == "False", check.stderr
    monkeypatch.setenv("FEDBIP_FLOWER_WORKER_IDLE", "60")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)

    def ask(node: dict[str, Any]) -> tuple[Message, Context]:
        request = Message(
            RecordDict({CONFIG: ConfigRecord({"config": config_to_json(TINY)})}),
            message_type=MessageType.QUERY,
            dst_node_id=1,
        )
        return request, Context(1, 7, node, RecordDict(), {})

    workers = set()
    caplog.set_level("DEBUG", logger="fedbip_cli.simulate.flower.relay")
    try:
        answers = []
        for node in (
            {"partition-id": 0, "num-partitions": 3},
            {"partition-id": 0, "num-partitions": 3},
            {"partition-id": 1, "num-partitions": 3},
        ):
            request, context = ask(node)
            answers.append(relay.forward(request, context))
            workers.add(socket_path(node))
            expected = introduce(*ask(node))
            assert dict(answers[-1].content[CLIENT]) == dict(expected.content[CLIENT])
        assert len(workers) == 2 and all(path.exists() for path in workers)
        pids = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("worker ")]
        assert len(pids) == 3 and pids[0] == pids[1] != pids[2], pids  # the first SuperNode's worker, twice
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "train.jsonl").write_text('{"text": 3, "label": "a"}\n')
        failed = relay.forward(*ask({"data-dir": str(bad)}))
        workers.add(socket_path({"data-dir": str(bad)}))
        assert failed.has_error() and "train.jsonl:1" in failed.error.reason
    finally:
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-f", "fedbip_cli.simulate.flower.worker"], capture_output=True, text=True
            ).stdout.split()
        ]
        for path in workers:
            for pid in pids:
                if str(path) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(path.exists() for path in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not any(path.exists() for path in workers)
