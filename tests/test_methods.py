"""The strategies of ``simulate.methods`` (issue 14): FedOA's client loss term and server step against
hand-computed values, its feature hook against the encoder's own pooled output, and tiny end-to-end
runs (2 encoder layers, 3 clients, 2 rounds, 2 local steps of batch 8, sequences of 32 tokens):
FedOA's global adapter follows FedAvg bit for bit, and an interrupted run resumes to the same end.
FedMerge's step, distinct starts and W in the checkpoint; TAP's replacement rule, distillation loss and
post-training phase; the universal expert's cluster models, teacher targets and public sentences; the
bytes each client sends and receives; every method end to end, interrupted and resumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import AdapterError, UsageError
from fedbip_cli.simulate import checkpoint, tap
from fedbip_cli.simulate.checkpoint import StrategyRun
from fedbip_cli.simulate.clipping import clip_sent
from fedbip_cli.simulate.data import ClientData, TextDataset
from fedbip_cli.simulate.fedmerge import FedMerge, W, distinct_starts, fedmerge_step, merged, theta_key
from fedbip_cli.simulate.loop import SimulationConfig, state_bytes
from fedbip_cli.simulate.methods import GLOBAL, FedOA, feature_regularizer, fedavg_round
from fedbip_cli.simulate.model import ClientModel, embedded_model_dir
from fedbip_cli.simulate.partition import public_sentences
from fedbip_cli.simulate.runner import simulate
from fedbip_cli.simulate.seeds import cost_cells, pooled_cost
from fedbip_cli.simulate.strategies import RoundUpdates
from fedbip_cli.simulate.tap import TAP, components, kd_loss, kd_regularizer, replacements
from fedbip_cli.simulate.universal import cluster_models, cluster_rows, ensemble_targets

CONFIG = SimulationConfig(
    strategies=("fedoa",),
    num_layers=2,
    batch_size=8,
    max_length=32,
    local_steps=2,
    rounds=2,
    clients=3,
    groups=3,
    max_examples=300,
    examples_per_client=None,
    eval_every=1,
    public_examples=32,
    distill_steps=2,
    tap_kd_steps=2,
    global_models=3,
)
CLIENTS = ["client-00", "client-01", "client-02"]
SENTENCES = [
    "the striker scored twice as the team won the cup final",
    "the bank reported lower quarterly profits and shares fell",
    "tennis champion wins the open in straight sets",
    "the central bank raised interest rates again",
]


pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py


def test_feature_regularizer_is_lambda_times_the_mean_squared_distance_to_the_picked_targets() -> None:
    target = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]])
    features = torch.tensor([[2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    term = feature_regularizer(target, 0.5)(torch.tensor([2, 0]), features)
    # rows: (2,0)-(3,3) -> 1 + 9 = 10; (1,1)-(1,2) -> 0 + 1 = 1; mean 5.5; x 0.5
    assert term.item() == pytest.approx(2.75)
    term.backward()
    # d/dh of 0.5 * mean_b |h_b - t_b|^2 = 0.5 * 2 (h_b - t_b) / 2
    assert torch.allclose(features.grad, torch.tensor([[-0.5, -1.5], [0.0, -0.5]]))


def test_fedoa_server_step_averages_the_sent_adapters_by_examples_and_keeps_personal_ones() -> None:
    personal = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate(CLIENTS)}
    run = StrategyRun("fedoa", 0, dict(personal), server={GLOBAL: {"w": torch.tensor([1.0, 1.0])}})
    sent = {"client-00": {"w": torch.tensor([3.0, 1.0])}, "client-02": {"w": torch.tensor([-1.0, 5.0])}}
    updates = RoundUpdates(
        CLIENTS, ["client-00", "client-02"], run.bar, sent, {"client-00": 1, "client-01": 7, "client-02": 3}, {}
    )
    view, step = fedavg_round(run, updates, GLOBAL)
    # (1 * [3, 1] + 3 * [-1, 5]) / 4: client-01 did not take part, so its 7 examples do not count
    assert torch.allclose(run.server[GLOBAL]["w"], torch.tensor([0.0, 4.0]))
    assert all(step.bar[c]["w"] is personal[c]["w"] for c in CLIENTS)
    assert all(torch.equal(view.bar[c]["w"], torch.tensor([1.0, 1.0])) for c in CLIENTS)
    # the round's similarity is of the updates against the global adapter: [2, 0] and [-2, 4]
    cosine = step.similarity.groups["model"].similarity[0, 1].item()
    assert cosine == pytest.approx(-4 / (2 * 20**0.5))


@pytest.fixture(scope="module")
def model() -> ClientModel:
    return ClientModel(embedded_model_dir(), labels=["a", "b"], rank=2, max_length=32, seed=0, num_layers=2)


def test_features_are_the_pooled_output_and_the_regularizer_sees_them_in_training(model: ClientModel) -> None:
    tokens = model.tokenize(SENTENCES)
    labels = torch.tensor([0, 1, 0, 1])
    start = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in model.initial_state().items()
    }
    model.load_state(start)
    features = model.features(tokens)
    with torch.no_grad():  # BERT's head reads tanh(W h_[CLS] + b) of the last layer
        bert = model._model.get_base_model().bert
        hidden = bert(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        pooled = torch.tanh(bert.pooler.dense(hidden[:, 0]))
    assert features.shape == (4, 384)
    assert torch.allclose(features, pooled, atol=1e-5)

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        seen.append((index.clone(), batch.detach().clone()))
        return feature_regularizer(features, 0.0)(index, batch)

    def train(regularizer) -> dict[str, torch.Tensor]:
        model.load_state(start)
        generator = torch.Generator().manual_seed(5)
        model.train(tokens, labels, steps=1, batch_size=2, lr=1e-2, generator=generator, regularizer=regularizer)
        return model.state()

    plain = train(None)
    zero = train(record)
    ((index, batch),) = seen
    assert torch.allclose(batch, features[index], atol=1e-5)  # the head's input of the step's batch
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # a zero term leaves training bit for bit
    pulled = train(feature_regularizer(features + 1.0, 10.0))
    assert any(not torch.equal(plain[k], pulled[k]) for k in plain)


def test_fedoa_global_follows_fedavg_bit_for_bit_and_a_resumed_run_ends_the_same(tmp_path: Path) -> None:
    config = replace(CONFIG, strategies=("fedoa", "fedavg"))
    simulate(config, tmp_path / "a", device="cpu")
    a = load_file(tmp_path / "a" / "checkpoints" / "fedoa.safetensors")
    fedavg = load_file(tmp_path / "a" / "checkpoints" / "fedavg.safetensors")
    names = [k.split("/", 2)[2] for k in a if k.startswith("server/global/")]
    assert names
    # each client trains the received global adapter with FedAvg's batches: the same global model
    for name in names:
        for client in CLIENTS:
            assert torch.equal(a[f"server/global/{name}"], fedavg[f"bar/{client}/{name}"]), name
    # the personal adapters, trained with the feature term, are the clients' own
    head = "classifier.weight"
    assert not torch.equal(a[f"bar/client-00/{head}"], a[f"bar/client-01/{head}"])
    assert not torch.equal(a[f"bar/client-00/{head}"], a[f"server/global/{head}"])
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in metrics if r["strategy"] == "fedoa"]
    assert [(r["round"], r["client"]) for r in rows] == [(r, c) for r in (1, 2) for c in CLIENTS]
    assert all(0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0 for r in rows)

    class Interrupted(KeyboardInterrupt):
        pass

    def stop(strategy: str, round_: int, accuracy: float | None) -> None:
        if (strategy, round_) == ("fedoa", 1):
            raise Interrupted

    b = tmp_path / "b"
    with pytest.raises(Interrupted):
        simulate(config, b, device="cpu", round_done=stop)
    simulate(config, b, device="cpu", resume=True)
    for name in ("metrics.jsonl", "similarity.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (b / name).read_bytes(), name
    resumed = load_file(b / "checkpoints" / "fedoa.safetensors")
    assert resumed.keys() == a.keys() and all(torch.equal(resumed[k], a[k]) for k in a)


def test_config_checks_the_lambda_and_takes_attacks_and_clipping_with_methods() -> None:
    assert FedOA().weight == 0.5 == CONFIG.fedoa_lambda
    with pytest.raises(UsageError, match="fedoa-lambda"):
        replace(CONFIG, fedoa_lambda=-1.0)
    defended = replace(CONFIG, attack="scaled", attackers=1, attack_scale=10.0, clip_norm="auto")
    assert defended.attack == "scaled" and defended.clip_norm == "auto"


def test_clip_sent_against_float64() -> None:
    """r_k + c_k (θ_k − r_k), c_k = min(1, bound / ‖θ_k − r_k‖), the bound the median norm (or K× it):
    by hand in float64, with one reference shared (FedOA) and one per client (FedMerge)."""
    g = torch.Generator().manual_seed(5)
    clients = ["a", "b", "c", "d"]
    shared = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(4, generator=g)}
    for references in (
        {c: shared for c in clients},
        {c: {k: torch.randn(v.shape, generator=g) for k, v in shared.items()} for c in clients},
    ):
        trained = {
            c: {
                k: references[c][k] + (10.0 if c == "c" else 1.0) * torch.randn(v.shape, generator=g)
                for k, v in shared.items()
            }
            for c in clients
        }
        for spec, multiple in (("auto", 1.0), ("2x", 2.0)):
            clipped, record = clip_sent(trained, references, clients, ClipNorm.parse(spec))
            norms = [
                math.sqrt(sum(float(((trained[c][k].double() - references[c][k].double()) ** 2).sum()) for k in shared))
                for c in clients
            ]
            ordered = sorted(norms)
            bound = multiple * (ordered[1] + ordered[2]) / 2  # the median of four
            assert record["model"]["bound"] == pytest.approx(bound, rel=1e-12)
            assert record["model"]["norms"] == pytest.approx(dict(zip(clients, norms)), rel=1e-12)
            for c, norm in zip(clients, norms):
                scale = min(1.0, bound / norm)
                for k in shared:
                    want = references[c][k].double() + scale * (trained[c][k].double() - references[c][k].double())
                    torch.testing.assert_close(clipped[c][k].double(), want, rtol=0, atol=1e-6)
                if scale == 1.0:
                    assert clipped[c] is trained[c]  # an unclipped update is passed on untouched
                else:
                    assert record["model"]["clipped"][c] == pytest.approx(scale, rel=1e-12)
            assert "c" in record["model"]["clipped"]


def test_fedoa_clipped_before_aggregation_equals_clipped_fedavg_weights() -> None:
    """FedOA's FedAvg is linear in the sent states, so clipping them before it (``clip_sent``) equals
    clipping inside FedAvg's weights (``clip_plan``'s column scaling): two mechanisms, one result."""
    g = torch.Generator().manual_seed(9)
    clients = ["a", "b", "c"]
    initial = {"w": torch.randn(4, 2, generator=g)}
    trained = {c: {"w": initial["w"] + (8.0 if c == "b" else 1.0) * torch.randn(4, 2, generator=g)} for c in clients}
    examples = {"a": 10, "b": 20, "c": 30}
    clip = ClipNorm.parse("auto")
    run = StrategyRun("fedoa", 0, {c: dict(initial) for c in clients}, server={GLOBAL: dict(initial)})
    sent, _ = clip_sent(trained, FedOA().sent_from(run, clients), clients, clip)
    plain = RoundUpdates(clients, clients, run.bar, sent, examples, {c: None for c in clients}, initial)
    fedavg_round(run, plain, GLOBAL)
    inside = StrategyRun("fedoa", 0, {c: dict(initial) for c in clients}, server={GLOBAL: dict(initial)})
    weighted = RoundUpdates(
        clients, clients, inside.bar, trained, examples, {c: None for c in clients}, initial, clip=clip
    )
    fedavg_round(inside, weighted, GLOBAL)
    torch.testing.assert_close(run.server[GLOBAL]["w"], inside.server[GLOBAL]["w"], rtol=0, atol=1e-6)
    assert not torch.allclose(
        run.server[GLOBAL]["w"], initial["w"] + sum(t["w"] - initial["w"] for t in trained.values()) / 3
    )


def test_cli_refuses_a_negative_lambda(tmp_path: Path) -> None:
    """(The methods run on --engine flower: tests/test_flower.py compares them with in-process.)"""
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--strategy", "fedoa", "--fedoa-lambda", "-1", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "fedoa-lambda" in result.stderr


def test_fedmerge_step_by_hand() -> None:
    """Θ_1 = [1, 0], Θ_2 = [0, 1], W = 0: both clients receive [0.5, 0.5]; client 1 trains toward
    Θ_1 (g_1 = [-1, 0]), client 2 (three times the examples) toward Θ_1 too, less (g_2 = [0, 0.5])."""
    theta = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    trained = {"x": torch.tensor([[1.5, 0.5], [0.5, 0.0]])}
    w, new = fedmerge_step(torch.zeros(2, 2, dtype=torch.float64), theta, trained, torch.tensor([1.0, 3.0]), 0.3)
    # ∂/∂W_ij = n_i S_ij <Θ_j − θ_i, g_i>: client 1: 0.25 * 0.5 * [-0.5, 0.5]; client 2: 0.75 * 0.5 * [-0.25, 0.25];
    # the largest entry, 0.09375, moves by 0.3
    assert torch.allclose(w, torch.tensor([[0.2, -0.2], [0.3, -0.3]], dtype=torch.float64))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  softmax([a, -a])_1 = sigmoid(2a)
    s = [[sigmoid(0.4), 1 - sigmoid(0.4)], [sigmoid(0.6), 1 - sigmoid(0.6)]]
    n = [0.25, 0.75]
    column = [n[0] * s[0][j] + n[1] * s[1][j] for j in range(2)]
    share = [[n[i] * s[i][j] / column[j] for j in range(2)] for i in range(2)]
    # Θ_j − (share_1j g_1 + share_2j g_2)
    expected = [[1 + share[0][0], -0.5 * share[1][0]], [share[0][1], 1 - 0.5 * share[1][1]]]
    assert torch.allclose(new["x"], torch.tensor(expected), atol=1e-6)
    # clients that send back what they received (g = 0) leave W where it is; θ_i = Σ_j S_ij Θ_j
    still, _ = fedmerge_step(torch.zeros(2, 2), theta, {"x": torch.full((2, 2), 0.5)}, torch.ones(2), 0.3)
    assert torch.equal(still, torch.zeros(2, 2))
    received = merged(theta, torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(received["x"], torch.tensor([[0.25, 0.75]]))


def test_fedmerge_starts_are_the_initial_adapter_and_seeded_permutations_of_it() -> None:
    initial = {"m.lora_A": torch.arange(6.0).reshape(2, 3), "m.lora_B": torch.zeros(3, 2)}
    first, second, third = distinct_starts(initial, 3, seed=0)
    assert all(torch.equal(first[k], initial[k]) for k in initial)
    for start in (second, third):  # the same entries in another order; zeros stay zero
        assert torch.equal(start["m.lora_A"].flatten().sort().values, torch.arange(6.0))
        assert not torch.equal(start["m.lora_A"], initial["m.lora_A"])
        assert torch.equal(start["m.lora_B"], torch.zeros(3, 2))
    assert not torch.equal(second["m.lora_A"], third["m.lora_A"])
    again = distinct_starts(initial, 3, seed=0)[1]
    assert torch.equal(again["m.lora_A"], second["m.lora_A"])
    assert not torch.equal(distinct_starts(initial, 3, seed=1)[1]["m.lora_A"], second["m.lora_A"])


def test_fedmerge_server_round_steps_the_participants_rows_and_sends_every_client_its_merge() -> None:
    """Three clients, two taking part: their rows of W and Θ move by ``fedmerge_step``; the absent
    client's row of W stays; every client's θ̄ is its merge under the new W and Θ."""
    initial = {"m.lora_A": torch.tensor([[1.0, -2.0, 0.5]]), "head.bias": torch.tensor([0.25, -1.0])}
    method = FedMerge(global_models=2, lr_w=0.3, seed=0)
    run = StrategyRun("fedmerge", 0, {c: dict(initial) for c in CLIENTS})
    run.server = method.initial_server(initial, CLIENTS)
    assert run.server[W]["weights"].shape == (3, 2) and run.server[W]["weights"].dtype == torch.float64
    run.server[W]["weights"][1] = torch.tensor([0.5, -0.5], dtype=torch.float64)  # the absent client's row
    received = method.received(run, [0, 2])
    trained = {
        "client-00": {k: v + 0.1 for k, v in received[0].items()},
        "client-02": {k: v * 2 for k, v in received[1].items()},
    }
    examples = {"client-00": 1, "client-01": 5, "client-02": 3}
    theta = {k: torch.stack([run.server[theta_key(j)][k] for j in range(2)]) for k in initial}
    stacked = {k: torch.stack([trained[c][k] for c in ("client-00", "client-02")]) for k in initial}
    want_w, want_theta = fedmerge_step(
        run.server[W]["weights"][[0, 2]], theta, stacked, torch.tensor([1.0, 3.0], dtype=torch.float64), 0.3
    )
    updates = RoundUpdates(CLIENTS, ["client-00", "client-02"], run.bar, trained, examples, {})
    view, step = method.server_round(run, updates, None)  # FedMerge's server needs no context
    weights = run.server[W]["weights"]
    assert torch.equal(weights[[0, 2]], want_w)
    assert torch.equal(weights[1], torch.tensor([0.5, -0.5], dtype=torch.float64))
    for j in range(2):
        assert all(torch.equal(run.server[theta_key(j)][k], want_theta[k][j]) for k in initial)
    for i, client in enumerate(CLIENTS):
        merge = merged(want_theta, torch.softmax(weights[[i]], dim=1))
        assert all(torch.equal(step.bar[client][k], merge[k][0]) for k in initial)
    # the round's updates are measured from what each participant received
    assert all(torch.equal(view.bar["client-00"][k], received[0][k]) for k in initial)


def test_tap_components_and_replacement_rule_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {
        "enc.query.lora_A": torch.ones(1),
        "enc.query.lora_B": torch.ones(1),
        "enc.value.lora_A": torch.ones(1),
        "enc.value.lora_B": torch.ones(1),
        "classifier.weight": torch.ones(1),
        "classifier.bias": torch.ones(1),
    }
    assert components(state) == {
        "enc.query": ["enc.query.lora_A", "enc.query.lora_B"],
        "enc.value": ["enc.value.lora_A", "enc.value.lora_B"],
        "classifier": ["classifier.weight", "classifier.bias"],
    }
    # replaced when the swapped loss + margin is below the own loss: 0.99 + 0.005 < 1; 0.996 + 0.005 is not
    assert replacements(1.0, {"a": 0.99, "b": 0.996, "c": 1.2}, 0.005) == ["a"]
    assert replacements(1.0, {"a": 1.0}, 0.0) == []  # an equal loss never replaces
    # a local loss that is the sum of every entry: the federated query pair lowers it by 2 (replaced),
    # its head by 0.002 (< margin, kept), its value pair raises it (kept)
    monkeypatch.setattr(tap, "local_loss", lambda model, data, s: float(sum(t.sum() for t in s.values())))
    received = dict(state)
    received.update({"enc.query.lora_A": torch.zeros(1), "enc.query.lora_B": torch.zeros(1)})
    received.update({"enc.value.lora_A": torch.full((1,), 3.0), "classifier.weight": torch.full((1,), 0.998)})
    personal = TAP(margin=0.005).replace(None, None, state, received)
    assert {k: v.item() for k, v in personal.items()} == {
        **{k: 1.0 for k in state},
        "enc.query.lora_A": 0.0,
        "enc.query.lora_B": 0.0,
    }


def test_kd_loss_by_hand() -> None:
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # row 1: KL([3/4, 1/4] || [1/2, 1/2]); row 2: KL([1/2, 1/2] || [3/4, 1/4]); mean over the batch
    one = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    two = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx((one + two) / 2)
    # T = 2: the teacher's first row softens to p = [√3, 1] / (√3 + 1); T² = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    soft_one = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    soft_two = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * (soft_one + soft_two) / 2)
    assert kd_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_tap_finish_distils_the_personal_model_from_the_final_global_one(model: ClientModel) -> None:
    tokens = model.tokenize(SENTENCES)
    data = type("Data", (), {"train": tokens, "train_labels": torch.tensor([0, 1, 0, 1])})()
    noise = torch.Generator().manual_seed(3)
    personal = {k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in model.initial_state().items()}
    final = {k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in model.initial_state().items()}
    run = StrategyRun("tap", 2, {"client-00": personal}, server={GLOBAL: final})
    calls = []

    def fit(state, term, steps=None):
        calls.append((state, term, steps))
        return {k: v + 1 for k, v in state.items()}, 0.0

    TAP(kd_steps=3, kd_weight=0.5, temperature=2.0).finish(model, run, "client-00", data, fit)
    ((state, term, steps),) = calls
    assert steps == 3 and state is personal
    assert torch.equal(run.bar["client-00"]["classifier.bias"], personal["classifier.bias"] + 1)
    model.load_state(final)
    teacher = model.logits(tokens)
    model.load_state(personal)  # as fit does before training: the head is the student's
    features = model.features(tokens)
    index = torch.tensor([2, 0])
    features = features.clone()  # out of inference mode, for the head's forward
    student = features[index] @ personal["classifier.weight"].T + personal["classifier.bias"]
    assert term(index, features[index]).item() == pytest.approx(
        0.5 * kd_loss(student, teacher[index], 2.0).item(), rel=1e-5
    )
    assert torch.allclose(model.head_logits(features), model.logits(tokens), atol=1e-5)
    assert kd_regularizer(model.head_logits, teacher, 0.0, 1.0)(index, features[index]).item() == 0.0


def test_universal_expert_cluster_models_and_teacher_by_hand() -> None:
    rows = cluster_rows([[0, 2], [1]], torch.tensor([1.0, 3.0, 2.0]))
    assert torch.allclose(rows, torch.tensor([[1 / 3, 0, 2 / 3], [0, 1, 0]], dtype=torch.float64))
    trained = {"x": torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 3.0]])}
    first, second = cluster_models(trained, rows)
    assert torch.allclose(first["x"], torch.tensor([1.0, 2.0])) and torch.equal(second["x"], torch.tensor([1.0, 1.0]))
    # softmax([0, 0]) = [1/2, 1/2] and softmax([ln 3, 0]) = [3/4, 1/4]: each cluster counts once
    targets = ensemble_targets([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])])
    assert torch.allclose(targets, torch.tensor([[0.625, 0.375]]))


def test_public_sentences_are_held_by_no_client_and_seeded() -> None:
    texts = [f"sentence number {i:02d}" for i in range(20)]
    data = TextDataset(texts=texts, labels=[i % 2 for i in range(20)], label_names=["a", "b"])
    clients = [
        ClientData("client-00", texts[:5], [0] * 5, texts[5:8], [0] * 3, 2),
        ClientData("client-01", texts[8:12], [0] * 4, texts[12:14], [0] * 2, 2),
    ]
    public = public_sentences(data, clients, 4, seed=0)
    assert len(public) == len(set(public)) == 4 and set(public) <= set(texts[14:])
    assert public == public_sentences(data, clients, 4, seed=0)
    assert sorted(public_sentences(data, clients, 6, seed=0)) == texts[14:]
    with pytest.raises(UsageError, match="6 sentences are held by no client"):
        public_sentences(data, clients, 7, seed=0)


def test_methods_end_to_end_with_exact_traffic_and_resume_identically(tmp_path: Path) -> None:
    """FedMerge, TAP and the universal expert, with FedAvg and local beside them: each runs, records
    the bytes each client sent and received, and resumes to the same end after an interruption in
    its own first round."""
    strategies = ("fedmerge", "tap", "universal-expert", "fedavg", "local")
    config = replace(CONFIG, strategies=strategies)
    whole = simulate(config, tmp_path / "a", device="cpu")
    a = tmp_path / "a"
    fedavg = load_file(a / "checkpoints" / "fedavg.safetensors")
    model_bytes = sum(4 * t.numel() for k, t in fedavg.items() if k.startswith("bar/client-00/"))
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    sizes = {
        s: {
            (r["uplink_bytes"], r["downlink_bytes"]) for r in rows if r["strategy"] == s and r["train_loss"] is not None
        }
        for s in strategies
    }
    assert sizes == {
        "fedmerge": {(model_bytes, model_bytes)},
        "tap": {(model_bytes, model_bytes)},
        "universal-expert": {(model_bytes, 2 * model_bytes)},  # the expert and the client's cluster model
        "fedavg": {(model_bytes, model_bytes)},
        "local": {(0, 0)},
    }
    assert model_bytes == state_bytes(load_file(a / "adapters" / "fedavg" / "client-00" / "adapter_model.safetensors"))
    for name in strategies:
        cost = whole.summary["strategies"][name]["cost"]
        assert cost["client_rounds"] == 6
        assert cost["uplink_bytes_per_client_round"] == min(sizes[name])[0]
    timings = [json.loads(line) for line in (a / "timings.jsonl").read_text().splitlines()]
    assert [(t["strategy"], t["round"]) for t in timings] == [(s, r) for s in strategies for r in (1, 2)]
    assert all(set(t["client_seconds"]) == set(CLIENTS) and t["server_seconds"] >= 0 for t in timings)

    merge = load_file(a / "checkpoints" / "fedmerge.safetensors")
    assert merge["server/w/weights"].shape == (3, 3) and merge["server/w/weights"].dtype == torch.float64
    assert not torch.equal(merge["server/w/weights"], torch.zeros(3, 3, dtype=torch.float64))
    assert {k.split("/")[1] for k in merge if k.startswith("server/")} == {"w", "theta-0", "theta-1", "theta-2"}
    initial = {k.split("/", 2)[2]: v for k, v in merge.items() if k.startswith("bar/client-00/")}
    wrong = {"w": {"weights": torch.zeros(4, 3, dtype=torch.float64)}, **{f"theta-{j}": initial for j in range(3)}}
    with pytest.raises(AdapterError, match="server/w/weights"):  # a W of another shape is refused
        options = json.loads(json.dumps(asdict(config)))
        checkpoint.load(a / "checkpoints" / "fedmerge.safetensors", "fedmerge", options, CLIENTS, initial, wrong)

    class Interrupted(KeyboardInterrupt):
        pass

    b = tmp_path / "b"
    for method in ("fedmerge", "tap", "universal-expert"):

        def stop(strategy: str, round_: int, accuracy: float | None, method: str = method) -> None:
            if (strategy, round_) == (method, 1):
                raise Interrupted

        with pytest.raises(Interrupted):
            simulate(config, b, device="cpu", resume=b.exists(), round_done=stop)
    simulate(config, b, device="cpu", resume=True)
    for name in ("metrics.jsonl", "similarity.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for strategy in strategies:
        want = load_file(a / "checkpoints" / f"{strategy}.safetensors")
        got = load_file(b / "checkpoints" / f"{strategy}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), strategy
        for client in CLIENTS:
            path = Path("adapters") / strategy / client / "adapter_model.safetensors"
            assert (a / path).read_bytes() == (b / path).read_bytes()


def test_cost_per_round_cells_and_pooling_over_seeds_by_hand() -> None:
    one = {"client_rounds": 6, "uplink_bytes_per_client_round": 1000.0, "downlink_bytes_per_client_round": 2000.0}
    two = {"client_rounds": 2, "uplink_bytes_per_client_round": 3000.0, "downlink_bytes_per_client_round": 2000.0}
    # (6 * 1000 + 2 * 3000) / 8 = 1500 up; 2000 down
    assert pooled_cost([one, two]) == {
        "client_rounds": 8,
        "uplink_bytes_per_client_round": 1500.0,
        "downlink_bytes_per_client_round": 2000.0,
    }
    entry = {"cost": one, "rounds": 2, "seconds": {"train": 3.0, "server": 0.5, "eval": 1.0}}
    assert cost_cells(entry) == ("0.50", "0.250", "1/2")  # 3 s over 6 client-rounds; 0.5 s over 2 rounds
    assert cost_cells({"seconds": {"train": 1.0}}) == ("n/a", "n/a", "n/a")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--global-models", "0", "--global-models must be at least 1"),
        ("--public-examples", "0", "--public-examples must be at least 1"),
        ("--fedmerge-lr-w", "0", "--fedmerge-lr-w 0.0 must be positive"),
        ("--tap-temperature", "0", "--tap-temperature 0.0 must be positive"),
        ("--tap-margin", "-1", "--tap-margin -1.0 must be a non-negative number"),
        ("--tap-kd-steps", "-1", "--tap-kd-steps -1 must be a non-negative number"),
        ("--tap-kd-weight", "-0.5", "--tap-kd-weight -0.5 must be a non-negative number"),
        ("--distill-steps", "-2", "--distill-steps -2 must be a non-negative number"),
    ],
)
def test_cli_checks_the_methods_options_before_any_work(tmp_path: Path, option: str, value: str, message: str) -> None:
    result = CliRunner().invoke(
        app, ["simulate", "--strategy", "fedmerge", option, value, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output  # a usage error
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "o").exists()


def test_the_methods_defaults_are_the_papers_and_codes() -> None:
    config = SimulationConfig()
    assert (config.global_models, config.fedmerge_lr_w) == (5, 0.01)  # FedMerge's num_shared, learning_rate_W
    assert (config.tap_margin, config.tap_kd_steps, config.tap_kd_weight, config.tap_temperature) == (
        0.005,
        13,
        0.05,
        1.0,
    )
    assert (config.public_examples, config.distill_steps) == (256, 16)


def test_a_checkpoint_written_before_an_option_existed_resumes_only_at_its_default(tmp_path: Path) -> None:
    reference = {"w": torch.zeros(2)}
    run = StrategyRun("fedavg", 1, {c: {"w": torch.ones(2)} for c in CLIENTS})
    options = json.loads(json.dumps(asdict(replace(CONFIG, global_models=5))))
    path = tmp_path / "fedavg.safetensors"
    checkpoint.save(path, run, {k: v for k, v in options.items() if k != "global_models"})
    defaults = json.loads(json.dumps(asdict(SimulationConfig())))
    assert checkpoint.load(path, "fedavg", options, CLIENTS, reference, defaults=defaults).round == 1
    with pytest.raises(UsageError, match="other options"):  # the option now differs from its default
        checkpoint.load(path, "fedavg", {**options, "global_models": 3}, CLIENTS, reference, defaults=defaults)
    with pytest.raises(UsageError, match="other options"):  # without the defaults nothing is assumed
        checkpoint.load(path, "fedavg", options, CLIENTS, reference)
