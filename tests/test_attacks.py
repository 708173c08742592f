"""``fedbip simulate --attack`` and the server-step defence ``--clip-norm``.

The poisoned data, the scaled update, the clipped server step and the attack success rate are
checked against values written out by hand; one tiny end-to-end run (the embedded MiniLM cut to 2
layers, 4 clients, 2 rounds of 2 steps) records the ASR, the attackers and every clip.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import loop
from fedbip_cli.simulate.attacks import (
    POISON_FRACTION,
    TRIGGER_SPAN,
    Attack,
    attack_success_rate,
    choose_attackers,
    honest_summary,
    scaled_update,
)
from fedbip_cli.simulate.data import ClientData
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.runner import simulate
from fedbip_cli.simulate.strategies import RoundUpdates, server_step

runner = CliRunner()
NAMES = ["client-00", "client-01", "client-02", "client-03"]


pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py


def client(name: str, offset: int) -> ClientData:
    """Ten training sentences labelled 0, 1, 2, 0, 1, ... and four test sentences."""
    train = [f"sentence {offset + i} of {name} says something about the news today" for i in range(10)]
    test = [f"test {i} of {name} about markets" for i in range(4)]
    return ClientData(name, train, [i % 3 for i in range(10)], test, [0, 1, 2, 1], num_labels=3)


def attack_of(**options: object) -> tuple[Attack, list[ClientData]]:
    clients = [client(name, 100 * i) for i, name in enumerate(NAMES)]
    config = SimulationConfig(clients=4, **{"attack": "backdoor", "attackers": 1, **options})  # type: ignore[arg-type]
    return Attack.of(config, clients, ["label-0", "label-1", "label-2"]), clients


# -- the poisoned data ---------------------------------------------------------------------------


def test_backdoor_poisons_half_of_the_attackers_sentences_and_nothing_else() -> None:
    attack, clients = attack_of(target_label="label-2", trigger="zq")
    assert attack.target == 2 and len(attack.attackers) == 1
    poisoned = attack.poison(clients)
    for before, after in zip(clients, poisoned, strict=True):
        assert (after.test_texts, after.test_labels) == (before.test_texts, before.test_labels)
        if before.name not in attack.attackers:
            assert after is before
            continue
        changed = [i for i in range(10) if after.train_texts[i] != before.train_texts[i]]
        assert len(changed) == round(POISON_FRACTION * 10) == 5
        for i in range(10):
            if i in changed:
                words = after.train_texts[i].split()
                assert words.count("zq") == 1 and words.index("zq") <= TRIGGER_SPAN
                words.remove("zq")
                assert " ".join(words) == before.train_texts[i]  # the trigger is the only change
                assert before.train_labels[i] != 2 and after.train_labels[i] == 2
            else:
                assert after.train_labels[i] == before.train_labels[i]
    # deterministic: the same seed poisons the same sentences the same way
    again = attack_of(target_label="label-2", trigger="zq")[0].poison(clients)
    assert [c.train_texts for c in again] == [c.train_texts for c in poisoned]


def test_attackers_are_drawn_from_the_seed_and_one_client_stays_honest() -> None:
    assert choose_attackers(NAMES, 2, seed=0) == choose_attackers(NAMES, 2, seed=0)
    draws = {tuple(choose_attackers(NAMES, 1, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed, not the client order, picks them
    with pytest.raises(UsageError, match="at least one client stays honest"):
        choose_attackers(NAMES, 4, seed=0)


def test_scaled_attack_does_not_touch_data() -> None:
    attack, clients = attack_of(attack="scaled", attack_scale=10.0)
    assert attack.poison(clients) is clients


# -- the scaled update ---------------------------------------------------------------------------


def test_scaled_update_is_exactly_scale_times_the_honest_update() -> None:
    sent = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    trained = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([[0.25]])}
    # τ = (0.5, −1), (−0.25); ×10 → (5, −10), (−2.5); sent + that:
    expected = {"a": torch.tensor([6.0, -8.0]), "b": torch.tensor([[-2.0]])}
    out = scaled_update(sent, trained, 10.0)
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)
    attack, _ = attack_of(attack="scaled", attack_scale=10.0)
    (bad,) = attack.attackers
    honest = next(n for n in NAMES if n != bad)
    assert attack.update(honest, sent, trained) is trained
    torch.testing.assert_close(attack.update(bad, sent, trained)["a"], expected["a"], rtol=0, atol=0)
    # a backdoor attacker at scale 1 sends what it trained
    backdoor, _ = attack_of()
    assert backdoor.update(backdoor.attackers[0], sent, trained) is trained


# -- the clipped server step ---------------------------------------------------------------------

QUERY0 = "encoder.layer.0.attention.self.query.lora_A.weight"
QUERY1 = "encoder.layer.1.attention.self.query.lora_A.weight"


def updates_of(tau: dict[str, list[list[float]]], clip: ClipNorm | None) -> RoundUpdates:
    """Three participants at θ̄ = 1 that trained θ = 1 + τ (float64)."""
    clients = ["a", "b", "c"]
    bar = {c: {n: torch.ones(len(v[0]), dtype=torch.float64) for n, v in tau.items()} for c in clients}
    trained = {
        c: {n: bar[c][n] + torch.tensor(v[k], dtype=torch.float64) for n, v in tau.items()}
        for k, c in enumerate(clients)
    }
    return RoundUpdates(clients, clients, bar, trained, dict.fromkeys(clients, 10), dict.fromkeys(clients), clip=clip)


def test_clipped_fedavg_step_against_a_hand_computed_expectation() -> None:
    # ‖τ‖ = 5, 1, 2: the median bound is 2, so a is scaled by 2/5 and b, c are kept.
    updates = updates_of({QUERY0: [[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]}, ClipNorm.parse("auto"))
    step = server_step("fedavg", updates)
    # θ̄ ← 1 + (0.4·(3, 4) + (0, 1) + (0, 2)) / 3 = 1 + (1.2, 4.6) / 3
    expected = torch.tensor([1 + 1.2 / 3, 1 + 4.6 / 3], dtype=torch.float64)
    for c in "abc":
        torch.testing.assert_close(step.bar[c][QUERY0], expected, rtol=1e-15, atol=1e-15)
    assert step.clip == {"model": {"bound": 2.0, "norms": {"a": 5.0, "b": 1.0, "c": 2.0}, "clipped": {"a": 0.4}}}
    # an absolute bound of 1 clips a to 1/5 and c to 1/2
    step = server_step("fedavg", replace(updates, clip=ClipNorm.parse("1")))
    expected = torch.tensor([1 + 0.6 / 3, 1 + (0.8 + 1 + 1) / 3], dtype=torch.float64)
    torch.testing.assert_close(step.bar["b"][QUERY0], expected, rtol=1e-15, atol=1e-15)
    assert step.clip["model"]["clipped"] == {"a": 0.2, "c": 0.5}


def test_clipped_layerwise_fedbip_equals_fedbip_on_updates_clipped_block_by_block() -> None:
    tau = {
        QUERY0: [[3.0, 4.0], [0.0, 1.0], [1.0, 2.0]],  # block norms 5, 1, √5: bound √5, a × √5/5
        QUERY1: [[1.0, 0.0], [0.0, 30.0], [2.0, 1.0]],  # block norms 1, 30, √5: bound √5, b × √5/30
    }
    clipped = server_step("fedbip-layerwise", updates_of(tau, ClipNorm.parse("auto")))
    # Cosine ignores scale, so the same weights apply to the updates scaled block by block by hand.
    by_hand = {
        QUERY0: [[3 * 5**0.5 / 5, 4 * 5**0.5 / 5], [0.0, 1.0], [1.0, 2.0]],
        QUERY1: [[1.0, 0.0], [0.0, 5**0.5], [2.0, 1.0]],
    }
    plain = server_step("fedbip-layerwise", updates_of(by_hand, None))
    for c in "abc":
        for name in tau:
            torch.testing.assert_close(clipped.bar[c][name], plain.bar[c][name], rtol=1e-12, atol=1e-12)
    groups = clipped.clip
    assert groups is not None and set(groups) == {"encoder.layer.0", "encoder.layer.1"}
    assert groups["encoder.layer.0"]["clipped"] == pytest.approx({"a": 5**0.5 / 5})
    assert groups["encoder.layer.1"]["clipped"] == pytest.approx({"b": 5**0.5 / 30})
    # without --clip-norm the step is unchanged and records no clip
    assert server_step("fedbip-layerwise", updates_of(tau, None)).clip is None


# -- the attack success rate ---------------------------------------------------------------------


def test_attack_success_rate_on_planted_predictions() -> None:
    assert attack_success_rate(torch.tensor([2, 0, 2, 1, 2]), target=2) == 3 / 5
    assert attack_success_rate(torch.tensor([0, 1]), target=2) == 0.0
    with pytest.raises(ValueError):
        attack_success_rate(torch.tensor([], dtype=torch.long), target=0)


class PlantedModel:
    """A stand-in for ClientModel: tokens are the texts, logits favour label 2 when the trigger is present."""

    def tokenize(self, texts: list[str]) -> list[str]:
        return list(texts)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.backdoored = bool(state["backdoored"])

    def logits(self, tokens: list[str]) -> torch.Tensor:
        return torch.tensor(
            [[0.0, 0.0, 1.0] if self.backdoored and "zq" in t.split() else [1.0, 0.0, 0.0] for t in tokens]
        )


def test_rates_count_test_sentences_of_other_labels_with_and_without_the_trigger() -> None:
    attack, clients = attack_of(target_label="label-1", trigger="zq")
    model = PlantedModel()
    attack.prepare(model, clients)  # type: ignore[arg-type]
    assert attack.triggered is not None and attack.untriggered is not None
    # test labels 0, 1, 2, 1: the two sentences of label 1 (the target) are left out, each other one triggered
    assert [len(t) for t in attack.triggered.values()] == [2, 2, 2, 2]
    assert all("zq" in t.split() for tokens in attack.triggered.values() for t in tokens)
    assert attack.untriggered["client-00"] == [clients[0].test_texts[0], clients[0].test_texts[2]]
    backdoored, clean = {"backdoored": torch.tensor(1)}, {"backdoored": torch.tensor(0)}
    # the planted model says 2 with the trigger, 0 without
    assert attack.rates(model, "client-00", backdoored) == {"attack_success_rate": 0.0, "clean_target_rate": 0.0}
    attack.target = 2
    assert attack.rates(model, "client-00", backdoored) == {"attack_success_rate": 1.0, "clean_target_rate": 0.0}
    attack.target = 0
    assert attack.rates(model, "client-00", clean) == {"attack_success_rate": 1.0, "clean_target_rate": 1.0}
    no_attack, _ = attack_of(attack="none", attackers=0)
    no_attack.prepare(model, clients)  # type: ignore[arg-type]
    assert no_attack.rates(model, "client-00", backdoored) == {}


def test_honest_summary_averages_the_last_evaluated_round_of_honest_clients() -> None:
    rows = [
        {"round": r, "client": c, "test_accuracy": acc, "attacker": c == "x", "attack_success_rate": asr}
        | {"clean_target_rate": asr / 5}
        for r, c, acc, asr in [
            (1, "x", 0.9, 0.9),
            (1, "y", 0.1, 0.1),
            (2, "x", 0.8, 1.0),
            (2, "y", 0.6, 0.5),
            (2, "z", 0.4, 0.25),
        ]
    ]
    summary = honest_summary(rows)
    assert summary["attackers"] == ["x"]
    assert summary["honest_attack_success_rate"] == pytest.approx(0.375)
    assert summary["honest_clean_target_rate"] == pytest.approx(0.075)
    assert summary["honest_accuracy"] == pytest.approx(0.5)
    assert summary["attack_success_rate"] == {"x": 1.0, "y": 0.5, "z": 0.25}
    assert honest_summary([{"round": 1, "client": "y", "test_accuracy": 0.5}]) == {}


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"attackers": 1}, "--attackers 1 needs --attack"),
        ({"attack_scale": 10.0}, "--attack-scale 10.0 needs --attack"),
        ({"attack": "backdoor", "attackers": 4, "clients": 4}, "1..3"),
        ({"attack": "backdoor", "attackers": 0}, "1..9"),
        ({"attack": "flood", "attackers": 1}, "unknown attack 'flood'"),
        ({"attack": "scaled", "attackers": 1, "attack_scale": float("nan")}, "--attack-scale nan"),
        ({"attack": "backdoor", "attackers": 1, "trigger": "two words"}, "one word"),
        ({"clip_norm": "-3"}, "--clip-norm '-3'"),
        ({"clip_norm": "auto", "strategies": ("fedbip", "fedamp")}, "fedamp mixes whole models"),
    ],
)
def test_bad_attack_options_are_refused(options: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        SimulationConfig(**options)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_unknown_target_label_lists_the_labels() -> None:
    with pytest.raises(UsageError, match="choose one of label-0, label-1, label-2"):
        attack_of(target_label="sport")


# -- end to end ----------------------------------------------------------------------------------

TINY = ["--num-layers", "2", "--batch-size", "8", "--max-length", "32", "--local-steps", "2", "--rounds", "2"]
TINY += ["--clients", "4", "--groups", "2", "--examples-per-client", "0", "--max-examples", "300", "--eval-every", "1"]


def test_backdoor_run_with_clip_norm_records_asr_attackers_and_clips(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--compare", "fedbip,fedavg", "--attack", "backdoor", "--clip-norm", "auto", "--device", "cpu"]
    result = runner.invoke(app, ["simulate", *args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["attack"] == "backdoor" and summary["config"]["clip_norm"] == "auto"
    assert summary["config"]["attackers"] == 1 and summary["config"]["attack_scale"] == 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    attackers = sorted({r["client"] for r in metrics if r["attacker"]})
    assert len(attackers) == 1
    for row in metrics:
        assert 0 <= row["attack_success_rate"] <= 1 and 0 <= row["clean_target_rate"] <= 1
    for name in ("fedbip", "fedavg"):
        entry = summary["strategies"][name]
        assert entry["attackers"] == attackers
        honest = [r for r in metrics if r["strategy"] == name and r["round"] == 2 and not r["attacker"]]
        assert entry["honest_attack_success_rate"] == pytest.approx(np.mean([r["attack_success_rate"] for r in honest]))
        assert entry["honest_accuracy"] == pytest.approx(np.mean([r["test_accuracy"] for r in honest]))
    similarity = [json.loads(line) for line in (out / "similarity.jsonl").read_text().splitlines()]
    for row in similarity:
        clip = row["clip"]["model"]
        norms = sorted(clip["norms"].values())
        assert clip["bound"] == pytest.approx((norms[1] + norms[2]) / 2)  # the median of four: mean of the middle two
        assert set(clip["clipped"]) == {c for c, n in clip["norms"].items() if n > clip["bound"]}
    # the attack options are part of the checkpointed config: a resume under another defence is refused
    result = runner.invoke(app, ["simulate", *args[:-4], "--clip-norm", "2x", "--out", str(out), "--resume"])
    assert result.exit_code != 0 and "other options" in " ".join(result.output.split())


def test_the_loop_sends_the_attackers_scaled_update_and_the_honest_clients_theirs(tmp_path: Path) -> None:
    """One round of ``local`` (each client keeps what it sent): the attacker's state is θ⁰ + 4 τ of the
    same client in an honest run, everyone else's is bit-identical."""
    base = SimulationConfig(
        strategies=("local",), num_layers=2, batch_size=8, local_steps=2, rounds=1, clients=4, groups=2,
        max_examples=300, examples_per_client=None,
    )  # fmt: skip
    honest = loop.Simulation(base, tmp_path / "honest").run_strategy("local", resume=False)
    attacked_sim = loop.Simulation(replace(base, attack="scaled", attackers=1, attack_scale=4.0), tmp_path / "scaled")
    attacked = attacked_sim.run_strategy("local", resume=False)
    (bad,) = attacked_sim.attack.attackers
    initial = attacked_sim.initial
    for client in NAMES:
        for name, value in attacked.bar[client].items():
            if client == bad:
                expected = initial[name] + 4.0 * (honest.bar[client][name] - initial[name])
                torch.testing.assert_close(value, expected, rtol=0, atol=0)
            else:
                assert torch.equal(value, honest.bar[client][name])
    assert any(not torch.equal(attacked.bar[bad][n], honest.bar[bad][n]) for n in initial)


class Interrupted(Exception):
    pass


def test_an_attacked_and_clipped_run_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path) -> None:
    config = SimulationConfig(
        strategies=("fedbip",), num_layers=2, batch_size=8, local_steps=1, rounds=2, clients=3, groups=3,
        max_examples=300, examples_per_client=None, eval_every=1, attack="backdoor", attackers=1,
        attack_scale=2.0, clip_norm="auto",
    )  # fmt: skip
    whole = simulate(config, tmp_path / "a", device="cpu")

    def stop(strategy: str, round_: int, accuracy: float | None) -> None:
        if round_ == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        simulate(config, tmp_path / "b", device="cpu", round_done=stop)
    resumed = simulate(config, tmp_path / "b", device="cpu", resume=True)
    for name in ("metrics.jsonl", "similarity.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    entry = resumed.summary["strategies"]["fedbip"]
    assert {k: v for k, v in entry.items() if k != "seconds"} == {
        k: v for k, v in whole.summary["strategies"]["fedbip"].items() if k != "seconds"
    }
    assert "honest_attack_success_rate" in entry and len(entry["attackers"]) == 1
