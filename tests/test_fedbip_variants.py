"""The FedBip variants the paper's text allows, each against hand-computed weights."""

from __future__ import annotations

import pytest
import torch

from fedbip_cli.simulate.strategies import STRATEGIES, RoundUpdates, task_vectors

CLIENTS = ["a", "b"]
MODULE = "bert.encoder.layer.0.attention.self.query"


def updates(bar: dict[str, dict[str, torch.Tensor]], trained: dict[str, dict[str, torch.Tensor]]) -> RoundUpdates:
    return RoundUpdates(CLIENTS, CLIENTS, bar, trained, dict.fromkeys(CLIENTS, 8), dict.fromkeys(CLIENTS, 0))


def state(a: list[list[float]], b: list[list[float]], head: list[float]) -> dict[str, torch.Tensor]:
    return {
        f"{MODULE}.lora_A": torch.tensor(a, dtype=torch.float64),
        f"{MODULE}.lora_B": torch.tensor(b, dtype=torch.float64),
        "classifier.weight": torch.tensor([head], dtype=torch.float64),
    }


def expected_rows(cos: float) -> torch.Tensor:
    """FedBip's rows for two clients of cosine ``cos``: S⁺ row-normalised."""
    s = torch.tensor([[1.0, max(cos, 0.0)], [max(cos, 0.0), 1.0]], dtype=torch.float64)
    return s / s.sum(dim=1, keepdim=True)


def test_product_similarity_is_the_cosine_of_the_products_update() -> None:
    """Factors that differ (a rescaled pair B G, G⁻¹ A) but give the same product update have
    product cosine 1, while the factors' own cosine is below 1."""
    zero = state([[0.0, 0.0]], [[0.0], [0.0]], [0.0])
    one = state([[1.0, 2.0]], [[3.0], [1.0]], [0.0])
    other = state([[2.0, 4.0]], [[1.5], [0.5]], [0.0])  # B/2, 2A: the same product B A
    step = updates({"a": zero, "b": zero}, {"a": one, "b": other})
    product = STRATEGIES["fedbip-product"](step, task_vectors(step)).rows["model"]
    torch.testing.assert_close(product, expected_rows(1.0))
    factors = STRATEGIES["fedbip"](step, task_vectors(step)).rows["model"]
    flat = [torch.cat([t.flatten() for t in s.values()]) for s in (one, other)]
    cos = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert cos < 0.99
    torch.testing.assert_close(factors, expected_rows(cos))


def test_product_update_subtracts_the_sent_product() -> None:
    """τ in product space is B_t A_t − B̄ Ā, not (B_t − B̄)(A_t − Ā): dense float64 reference."""
    bar = state([[1.0, 0.0]], [[1.0], [0.0]], [0.0])
    a_trained = state([[1.0, 1.0]], [[1.0], [1.0]], [0.0])
    b_trained = state([[2.0, 0.0]], [[1.0], [-1.0]], [0.0])
    step = updates({"a": bar, "b": bar}, {"a": a_trained, "b": b_trained})
    deltas = [
        (t[f"{MODULE}.lora_B"] @ t[f"{MODULE}.lora_A"] - bar[f"{MODULE}.lora_B"] @ bar[f"{MODULE}.lora_A"]).flatten()
        for t in (a_trained, b_trained)
    ]
    cos = float(deltas[0] @ deltas[1] / (deltas[0].norm() * deltas[1].norm()))
    rows = STRATEGIES["fedbip-product"](step, task_vectors(step)).rows["model"]
    torch.testing.assert_close(rows, expected_rows(cos))


def test_nohead_leaves_the_head_out_of_the_similarity() -> None:
    """Orthogonal LoRA updates and identical head updates: with the head in the similarity the
    clients share weight; without it they keep their own; per block the head takes the LoRA rows."""
    zero = state([[0.0, 0.0]], [[0.0], [0.0]], [0.0])
    step = updates(
        {"a": zero, "b": zero},
        {"a": state([[1.0, 0.0]], [[0.0], [0.0]], [5.0]), "b": state([[0.0, 1.0]], [[0.0], [0.0]], [5.0])},
    )
    tau = task_vectors(step)
    assert STRATEGIES["fedbip"](step, tau).rows["model"][0, 1] > 0
    torch.testing.assert_close(STRATEGIES["fedbip-nohead"](step, tau).rows["model"], torch.eye(2, dtype=torch.float64))
    layerwise = STRATEGIES["fedbip-layerwise-nohead"](step, tau).rows
    assert set(layerwise) == {"bert.encoder.layer.0", "classifier"}
    torch.testing.assert_close(layerwise["classifier"], torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["fedbip-paper", "fedbip-layerwise-paper"])
def test_paper_weights_keep_negative_cosines(name: str) -> None:
    """cos = −0.5: the paper's cos / Σ cos gives rows [1, −0.5] / 0.5 = [2, −1]; FedBip clips to I."""
    zero = state([[0.0, 0.0]], [[0.0], [0.0]], [0.0])
    step = updates(
        {"a": zero, "b": zero},
        {"a": state([[1.0, 0.0]], [[0.0], [0.0]], [0.0]), "b": state([[-0.5, 3**0.5 / 2]], [[0.0], [0.0]], [0.0])},
    )
    tau = task_vectors(step)
    expected = torch.tensor([[2.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    checked = 0
    for rows in STRATEGIES[name](step, tau).rows.values():
        if rows[0, 0] != 1.0:  # the head's group has a zero update here: its rows are the fallback
            torch.testing.assert_close(rows, expected)
            checked += 1
    assert checked == 1
    torch.testing.assert_close(STRATEGIES["fedbip"](step, tau).rows["model"], torch.eye(2, dtype=torch.float64))
