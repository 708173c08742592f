"""``simulate --select-on-validation`` (``simulate.selection``): the held-out split, the interpolation, what a
selecting client sends, the choice rule against float64 references written here, and whole runs at the
grid's two ends against the runs they must equal (λ = 1: the strategy itself; λ = 0: local training)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import checkpoint, loop, selection
from fedbip_cli.simulate.data import ClientData
from fedbip_cli.simulate.loop import Simulation, SimulationConfig

pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py

CONFIG = SimulationConfig(
    strategies=("fedbip",),
    num_layers=2,
    batch_size=8,
    local_steps=2,
    rounds=2,
    clients=4,
    groups=2,
    examples_per_client=16,
    eval_every=1,
    select_on_validation=0.25,
)


def client(name: str, count: int) -> ClientData:
    return ClientData(name, [f"{name} s{i}" for i in range(count)], [i % 3 for i in range(count)], ["t"], [0], 3)


def test_split_holds_out_a_seeded_share_and_keeps_every_sentence_once() -> None:
    clients = [client("a", 32), client("b", 5), client("c", 2)]
    before = [list(zip(c.train_texts, c.train_labels)) for c in clients]
    selection.split_validation(clients, 0.25, seed=7)
    for c, pairs, held in zip(clients, before, (8, 1, 1)):
        assert len(c.validation_texts) == held and len(c.train_texts) == len(pairs) - held
        together = list(zip(c.train_texts, c.train_labels)) + list(zip(c.validation_texts, c.validation_labels))
        assert sorted(together) == sorted(pairs)  # disjoint, nothing lost, labels stay with their sentence
        kept = [p for p in pairs if p[0] in c.train_texts]
        assert list(zip(c.train_texts, c.train_labels)) == kept  # the training split keeps its order
    again = [client("a", 32)]
    selection.split_validation(again, 0.25, seed=7)
    assert again[0].validation_texts == clients[0].validation_texts
    other = [client("a", 32)]
    selection.split_validation(other, 0.25, seed=8)
    assert other[0].validation_texts != clients[0].validation_texts
    with pytest.raises(UsageError, match="has 1 training sentence"):
        selection.split_validation([client("d", 1)], 0.25, seed=0)
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(UsageError, match="--validation-fraction"):
            selection.check_fraction(bad)


def test_interpolation_and_what_a_selecting_client_sends_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    own, merged, start = ({"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3))
    for weight in selection.GRID:
        mixed = selection.interpolate(own, merged, weight)
        for name in own:
            reference = (1 - weight) * own[name].double() + weight * merged[name].double()
            torch.testing.assert_close(mixed[name].double(), reference, rtol=0, atol=1e-6)
    assert all(torch.equal(selection.interpolate(own, merged, 0.0)[n], own[n]) for n in own)
    assert all(torch.equal(selection.interpolate(own, merged, 1.0)[n], merged[n]) for n in own)
    trained = {name: t + 0.1 * torch.randn(t.shape, generator=g) for name, t in start.items()}
    sent = selection.sent_state(merged, start, trained)
    for name in sent:  # the server's task vector θ_sent − θ̄ is the round's own update θ − start
        torch.testing.assert_close(
            sent[name].double() - merged[name].double(),
            trained[name].double() - start[name].double(),
            rtol=0,
            atol=1e-6,
        )


class LinearStub:
    """A model whose logits are ``x @ w``: enough to check the choice rule against a float64 reference."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.state["w"]).float()


def test_the_choice_is_the_best_validation_accuracy_then_loss_then_the_larger_weight() -> None:
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        x = torch.randn(9, 4, generator=g)
        labels = torch.randint(0, 3, (9,), generator=g)
        own, merged = {"w": torch.randn(4, 3, generator=g)}, {"w": torch.randn(4, 3, generator=g)}
        if trial % 5 == 0:
            merged = {"w": own["w"].clone()}  # every candidate equal: the tie goes to the merge
        choice = selection.select(LinearStub(), x, labels, own, merged)  # type: ignore[arg-type]
        scored = []
        for weight in selection.GRID:
            logits = x.double() @ ((1 - weight) * own["w"].double() + weight * merged["w"].double())
            accuracy = (logits.argmax(-1) == labels).double().mean().item()
            loss = torch.nn.functional.cross_entropy(logits, labels).item()
            scored.append((accuracy, -round(loss, 6), weight))
        best = max(scored)
        assert choice.weight == best[2] and choice.accuracy == pytest.approx(best[0])
        assert choice.loss == pytest.approx(-best[1], abs=1e-5)
        if trial % 5 == 0:
            assert choice.weight == 1.0


def final_states(sim: Simulation, strategy: str) -> dict[str, dict[str, torch.Tensor]]:
    run = sim.run_strategy(strategy, resume=False)
    return {name: run.personal(name) for name in sim.names}, run  # type: ignore[return-value]


@pytest.mark.parametrize(("weight", "reference"), [(1.0, "fedbip"), (0.0, "local")])
def test_the_grid_ends_are_the_strategy_and_local_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: float, reference: str
) -> None:
    """With λ = 1 only, a selecting FedBip is FedBip on the same training sentences; with λ = 0 only, each
    client keeps its own model: local training. Both to float32 rounding, round by round."""
    monkeypatch.setattr(selection, "GRID", (weight,))
    selecting = Simulation(CONFIG, tmp_path / "a")
    states, run = final_states(selecting, "fedbip")
    assert {row["selected_weight"] for row in run.metrics} == {weight}
    plain_config = replace(CONFIG, select_on_validation=None, strategies=(reference,))
    split = loop.load_clients  # the same held-out split, with no choosing

    def held_out(config: SimulationConfig):
        return split(replace(config, select_on_validation=CONFIG.select_on_validation))

    monkeypatch.setattr(loop, "load_clients", held_out)
    plain = Simulation(plain_config, tmp_path / "b")
    assert [len(d.train) for d in plain.data] == [len(d.train) for d in selecting.data] == [12] * 4
    expected, plain_run = final_states(plain, reference)
    for name in selecting.names:
        for tensor in states[name]:
            torch.testing.assert_close(states[name][tensor], expected[name][tensor], rtol=0, atol=2e-5)
    accuracy = {(r["round"], r["client"]): r["test_accuracy"] for r in run.metrics}
    assert accuracy == {(r["round"], r["client"]): r["test_accuracy"] for r in plain_run.metrics}


def test_the_kept_models_survive_a_checkpoint(tmp_path: Path) -> None:
    sim = Simulation(replace(CONFIG, rounds=1), tmp_path)
    run = sim.run_strategy("fedbip", resume=False)
    assert run.own.keys() == set(sim.names)
    loaded = sim.load_checkpoint("fedbip")
    assert loaded is not None and loaded.own.keys() == run.own.keys()
    for name in run.own:
        assert all(torch.equal(loaded.own[name][t], run.own[name][t]) for t in run.own[name])
    flat = checkpoint.StrategyRun("fedbip", 1, run.bar)
    assert flat.personal(sim.names[0]) is run.bar[sim.names[0]]


def test_the_command_line_exports_validation_refuses_flower_methods_and_bad_fractions(tmp_path: Path) -> None:
    small = ["--num-layers", "2", "--batch-size", "8", "--local-steps", "1", "--clients", "4", "--groups", "2"]
    common = [*small, "--rounds", "1", "--examples-per-client", "8", "--device", "cpu"]
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            *common,
            "--select-on-validation",
            "--out",
            str(tmp_path / "run"),
            "--export-data",
            str(tmp_path / "d"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["config"]["select_on_validation"] == 0.25
    assert summary["strategies"]["fedbip"]["selected_weight"] in selection.GRID
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["test", "train", "validation"]
    rows = [json.loads(line) for line in (tmp_path / "d" / "validation" / "client-00.jsonl").read_text().splitlines()]
    train = (tmp_path / "d" / "train" / "client-00.jsonl").read_text().splitlines()
    assert len(rows) == 2 and len(train) == 6  # 8 sentences: a quarter held out
    for args, needle in (
        (["--engine", "flower"], "not wired to --engine flower"),
        (["--strategy", "fedoa"], "not wired to the methods fedoa"),
        (["--validation-fraction", "1"], "--validation-fraction 1.0"),
    ):
        refused = CliRunner().invoke(
            app, ["simulate", *common, "--select-on-validation", *args, "--out", str(tmp_path / "x"), "--json"]
        )
        assert refused.exit_code == 2 and needle in json.loads(refused.stdout)["message"], refused.output


def test_the_server_receives_each_clients_own_round_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches the server step is θ̄ + (θ − start) for every participant: its task vector is the
    round's update even when the client trained from a model it kept (λ = 0: far from θ̄)."""
    monkeypatch.setattr(selection, "GRID", (0.0,))
    trained_from: dict[tuple[int, str], tuple[dict, dict]] = {}
    received: list[tuple[int, dict, dict]] = []
    train, step = loop.train_client, loop.server_round

    def recording_train(model, config, data, state, round_, index, *rest):
        start = {k: v.clone() for k, v in state.items()}
        out, loss = train(model, config, data, state, round_, index, *rest)
        trained_from[(round_, data.name)] = (start, out)
        return out, loss

    def recording_step(run, round_, chosen, trained, **kw):
        received.append((round_, {c: dict(run.bar[c]) for c in chosen}, dict(trained)))
        return step(run, round_, chosen, trained, **kw)

    monkeypatch.setattr(loop, "train_client", recording_train)
    monkeypatch.setattr(loop, "server_round", recording_step)
    sim = Simulation(replace(CONFIG, rounds=3), tmp_path)
    sim.run_strategy("fedbip", resume=False)
    assert [r for r, _, _ in received] == [1, 2, 3]
    for round_, bar, sent in received:
        for name in sent:
            start, out = trained_from[(round_, name)]
            if round_ > 1:
                assert any(not torch.allclose(start[t], bar[name][t]) for t in start)  # it kept its own model
            for t in sent[name]:
                torch.testing.assert_close(
                    sent[name][t].double() - bar[name][t].double(),
                    out[t].double() - start[t].double(),
                    rtol=0,
                    atol=1e-5,
                )
