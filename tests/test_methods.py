"""The strategies of ``simulate.methods`` (issue 14): FedOA's client loss term and server step against
hand-computed values, its feature hook against the encoder's own pooled output, and tiny end-to-end
runs (2 encoder layers, 3 clients, 2 rounds, 2 local steps of batch 8, sequences of 32 tokens):
FedOA's global adapter follows FedAvg bit for bit, and an interrupted run resumes to the same end.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.checkpoint import StrategyRun
from fedbip_cli.simulate.fedmerge import fedmerge_step, merged
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.methods import GLOBAL, FedOA, feature_regularizer, fedavg_round
from fedbip_cli.simulate.model import ClientModel, embedded_model_dir
from fedbip_cli.simulate.runner import simulate
from fedbip_cli.simulate.strategies import RoundUpdates

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


def test_config_checks_the_lambda_and_refuses_attacks_with_methods() -> None:
    assert FedOA().weight == 0.5 == CONFIG.fedoa_lambda
    with pytest.raises(UsageError, match="fedoa-lambda"):
        replace(CONFIG, fedoa_lambda=-1.0)
    with pytest.raises(UsageError, match="not wired to fedoa"):
        replace(CONFIG, attack="scaled", attackers=1, attack_scale=10.0)


def test_cli_refuses_fedoa_on_flower_and_a_negative_lambda(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--strategy", "fedoa", "--engine", "flower", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output  # a usage error
    assert "does not run on --engine flower" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["simulate", "--strategy", "fedoa", "--fedoa-lambda", "-1", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "fedoa-lambda" in result.stderr
    assert not (tmp_path / "o").exists()


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
