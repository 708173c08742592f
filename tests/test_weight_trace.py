"""The weight traces of simulate: self-weight and own-group weight, checked against hand-computed rows."""

from __future__ import annotations

import pytest
import torch

from fedbip_cli.simulate.strategies import Plan, RoundUpdates, server_step
from fedbip_cli.simulate.weight_trace import weight_curves, weight_summary, weight_trace

CLIENTS = ["a", "b", "c", "d"]
GROUPS = {"a": 0, "b": 0, "c": 1, "d": 1}


def test_trace_of_hand_written_rows() -> None:
    """Rows over the participants a, b, c (d sat out): self is the diagonal entry, own group the
    sum over the receiver's group-mates that took part; the uniform reference |g ∩ participants| / K."""
    rows = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    head = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    plan = Plan(["a", "b", "c"], {"bert.encoder.layer.0": rows, "classifier": head})
    record = weight_trace(plan, ["a", "b", "c"], GROUPS)
    assert record is not None
    assert record["clients"] == ["a", "b", "c"]
    assert record["uniform_own_group"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    block = record["groups"]["bert.encoder.layer.0"]
    assert block["self"] == pytest.approx([0.5, 0.6, 0.5])
    assert block["own_group"] == pytest.approx([0.8, 0.7, 0.5])
    assert record["groups"]["classifier"]["own_group"] == pytest.approx([1.0, 0.0, 1.0])
    summary = weight_summary(record)
    assert summary["self_weight"] == pytest.approx(((0.5 + 0.6 + 0.5) / 3 + (1 + 0 + 1) / 3) / 2)
    assert summary["own_group_weight"] == pytest.approx(((0.8 + 0.7 + 0.5) / 3 + (1 + 0 + 1) / 3) / 2)
    assert summary["weights_by_group"]["classifier"]["own_group_weight"] == pytest.approx(2 / 3)
    assert summary["uniform_own_group"] == pytest.approx(5 / 9)


def test_receivers_outside_the_participants_and_unknown_groups() -> None:
    """FedAvg sends to every client, but only a participant has a self-weight; without true groups,
    or with rows over something else than the participants, there is no trace."""
    plan = Plan(CLIENTS, {"model": torch.full((4, 2), 0.5, dtype=torch.float64)})
    record = weight_trace(plan, ["a", "c"], GROUPS)
    assert record is not None and record["clients"] == ["a", "c"]
    assert record["groups"]["model"]["own_group"] == [0.5, 0.5]
    assert weight_trace(plan, ["a", "c"], {**GROUPS, "c": None}) is None
    wide = Plan(CLIENTS, {"model": torch.full((4, 3), 1 / 3, dtype=torch.float64)})
    assert weight_trace(wide, ["a", "c"], GROUPS) is None
    assert weight_summary(None) == {}


def _updates(directions: dict[str, list[float]]) -> RoundUpdates:
    zero = {"w": torch.zeros(3)}
    trained = {c: {"w": torch.tensor(v)} for c, v in directions.items()}
    return RoundUpdates(CLIENTS, CLIENTS, {c: dict(zero) for c in CLIENTS}, trained, dict.fromkeys(CLIENTS, 8), GROUPS)


@pytest.mark.parametrize(
    ("strategy", "own"),
    [
        ("local", [1.0, 1.0, 1.0, 1.0]),
        ("oracle", [1.0, 1.0, 1.0, 1.0]),
        ("fedavg", [0.5, 0.5, 0.5, 0.5]),
        # a ⟂ c, d; b = a; so S⁺ rows are a: [1, 1, 0, 0], c: [0, 0, 1, cos(c, d)] and all mass stays home
        ("fedbip", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_strategies_traced_through_the_server_step(strategy: str, own: list[float]) -> None:
    step = server_step(strategy, _updates({"a": [1, 0, 0], "b": [1, 0, 0], "c": [0, 1, 0], "d": [0, 1, 1]}))
    record = weight_trace(step.plan, CLIENTS, GROUPS)
    assert record is not None
    assert record["groups"]["model"]["own_group"] == pytest.approx(own)
    if strategy == "fedbip":
        cos = 1 / 2**0.5
        assert record["groups"]["model"]["self"] == pytest.approx([0.5, 0.5, 1 / (1 + cos), 1 / (1 + cos)])


def test_curves_split_blocks_and_head() -> None:
    record = {
        "clients": ["a", "c"],
        "uniform_own_group": [0.5, 0.5],
        "groups": {
            "bert.encoder.layer.0": {"self": [0.4, 0.6], "own_group": [0.6, 0.8]},
            "classifier": {"self": [1.0, 1.0], "own_group": [1.0, 1.0]},
        },
    }
    rows = [[{"strategy": "fedbip-layerwise", "round": 1, "weights": record}]]
    self_curves, own_curves, uniform = weight_curves(rows)
    assert uniform == 0.5
    assert own_curves["fedbip-layerwise blocks"] == [{1: pytest.approx(0.7)}]
    assert own_curves["fedbip-layerwise head"] == [{1: 1.0}]
    assert self_curves["fedbip-layerwise"] == [{1: pytest.approx(0.75)}]
