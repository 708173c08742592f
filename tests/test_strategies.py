"""Server steps of the federated simulation, against expectations worked out by hand.

Each test builds one round's updates from tiny tensors with small integer values, so that every
task vector, cosine and weight row below can be checked on paper: θ̄ is the server's adapter of a
client before the step, θ = θ̄ + τ what the client trained, and the step sets θ̄ ← θ̄ + Σ_k P_rk τ_k.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.strategies import (
    EMA_DECAY,
    STRATEGIES,
    RoundUpdates,
    State,
    check_strategies,
    parameter_groups,
    server_step,
)

A0 = "bert.encoder.layer.0.attention.self.query.lora_A"  # (r=1, in=2)
B1 = "bert.encoder.layer.1.attention.self.query.lora_B"  # (out=2, r=1)
W = "classifier.weight"  # (labels=1, hidden=2)
BIAS = "classifier.bias"  # (1,)
SHAPES = {A0: (1, 2), B1: (2, 1), W: (1, 2), BIAS: (1,)}
CLIENTS = ["a", "b", "c", "d"]


def state(a0: list[float], b1: list[float], w: list[float], bias: float) -> State:
    """One client's tensors from their flat values (the order of ``flat`` below)."""
    values = {A0: a0, B1: b1, W: w, BIAS: [bias]}
    return {name: torch.tensor(values[name], dtype=torch.float32).reshape(SHAPES[name]) for name in SHAPES}


def flat(s: State) -> np.ndarray:
    return np.concatenate([s[name].numpy().reshape(-1) for name in SHAPES]).astype(np.float64)


def add(x: State, y: State) -> State:
    return {name: x[name] + y[name] for name in x}


INITIAL = state([0.5, -0.5], [0.25, 0.0], [0.0, 1.0], 0.5)  # θ⁰, the shared initial adapter

# Every client starts the round from a θ̄ of its own (all entries equal to its index), so that a
# step that mixed up θ̄ and θ, or θ̄ of two clients, would show.
BAR = {c: state([i, i], [i, i], [i, i], i) for i, c in enumerate(CLIENTS)}


def updates(
    tau: dict[str, State],
    *,
    examples: dict[str, int] | None = None,
    groups: dict[str, int | None] | None = None,
) -> RoundUpdates:
    """The round in which the clients of ``tau`` took part, each training θ̄ to θ̄ + τ."""
    return RoundUpdates(
        clients=list(CLIENTS),
        participants=[c for c in CLIENTS if c in tau],
        bar=BAR,
        trained={c: add(BAR[c], t) for c, t in tau.items()},
        examples=examples or {c: 1 for c in CLIENTS},
        groups=groups or {c: None for c in CLIENTS},
        initial=INITIAL,
    )


def assert_state(actual: State, expected: State) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


def f64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# Whole-model task vectors (flat order A0, B1, W, bias) with rational cosines:
# a = (1,0,...), b = 2a, c = (-1,0,...,1), d = (3,4,0,...):
# S_ab = 1, S_ad = S_bd = 3/5, S_ac = S_bc = -1/√2, S_cd = -3/(5√2).
TAU_MODEL = {
    "a": state([1, 0], [0, 0], [0, 0], 0),
    "b": state([2, 0], [0, 0], [0, 0], 0),
    "c": state([-1, 0], [0, 0], [0, 0], 1),
    "d": state([3, 4], [0, 0], [0, 0], 0),
}


def test_local_keeps_each_participants_own_update() -> None:
    tau = {c: TAU_MODEL[c] for c in ("a", "c")}
    step = server_step("local", updates(tau))
    assert step.plan.receivers == ["a", "c"]
    torch.testing.assert_close(step.plan.rows["model"], torch.eye(2, dtype=torch.float64))
    for c in ("a", "c"):
        assert_state(step.bar[c], add(BAR[c], tau[c]))  # θ̄ = θ
    for c in ("b", "d"):
        assert_state(step.bar[c], BAR[c])  # did not take part: unchanged
    # the server's previous states are not modified in place
    assert_state(BAR["a"], state([0, 0], [0, 0], [0, 0], 0))


def test_fedavg_sends_the_sample_weighted_mean_to_every_client() -> None:
    tau = {c: TAU_MODEL[c] for c in ("a", "b", "c")}
    # weights 1/4, 1/4, 1/2: mean = (1 + 2 - 2)/4 on A0[0] and 1/2 on the bias
    step = server_step("fedavg", updates(tau, examples={"a": 1, "b": 1, "c": 2, "d": 100}))
    assert step.plan.receivers == CLIENTS
    torch.testing.assert_close(step.plan.rows["model"], f64([[0.25, 0.25, 0.5]] * 4))
    mean = state([0.25, 0], [0, 0], [0, 0], 0.5)
    for c in CLIENTS:  # d did not train but receives the global update too
        assert_state(step.bar[c], add(BAR[c], mean))


def test_oracle_averages_within_true_groups() -> None:
    groups = {"a": 0, "b": 0, "c": 1, "d": 1}
    tau = {c: TAU_MODEL[c] for c in ("a", "b", "c")}
    step = server_step("oracle", updates(tau, examples={"a": 1, "b": 3, "c": 5, "d": 7}, groups=groups))
    assert step.plan.receivers == CLIENTS  # d did not train, but its group did
    torch.testing.assert_close(
        step.plan.rows["model"],
        f64([[0.25, 0.75, 0], [0.25, 0.75, 0], [0, 0, 1], [0, 0, 1]]),
    )
    group0 = state([1.75, 0], [0, 0], [0, 0], 0)  # (1·1 + 3·2) / 4
    for c in ("a", "b"):
        assert_state(step.bar[c], add(BAR[c], group0))
    for c in ("c", "d"):
        assert_state(step.bar[c], add(BAR[c], TAU_MODEL["c"]))


def test_oracle_leaves_inactive_groups_unchanged() -> None:
    groups = {"a": 0, "b": 0, "c": 1, "d": 1}
    step = server_step("oracle", updates({c: TAU_MODEL[c] for c in ("a", "b")}, groups=groups))
    assert step.plan.receivers == ["a", "b"]
    for c in ("c", "d"):
        assert_state(step.bar[c], BAR[c])
    assert_state(step.bar["a"], add(BAR["a"], state([1.5, 0], [0, 0], [0, 0], 0)))


def test_oracle_needs_known_groups() -> None:
    with pytest.raises(UsageError, match="task groups") as info:
        server_step("oracle", updates(TAU_MODEL, groups={"a": 0, "b": 0, "c": 1, "d": None}))
    assert info.value.hint is not None and "--partition task-shift" in info.value.hint


def test_fedbip_weights_are_clipped_row_normalised_cosines() -> None:
    step = server_step("fedbip", updates(TAU_MODEL))
    # the recorded similarity is the cosine of the flattened whole update
    s = step.similarity.groups["model"].similarity
    assert step.similarity.clients == CLIENTS and list(step.similarity.groups) == ["model"]
    r2 = math.sqrt(2)
    expected_s = f64(
        [
            [1, 1, -1 / r2, 0.6],
            [1, 1, -1 / r2, 0.6],
            [-1 / r2, -1 / r2, 1, -3 / (5 * r2)],
            [0.6, 0.6, -3 / (5 * r2), 1],
        ]
    )
    torch.testing.assert_close(s, expected_s, rtol=0, atol=1e-12)
    # P = S⁺ / row sums: negative similarity gets weight 0, so c keeps only its own update.
    # Row a: (1, 1, 0, 3/5) / (13/5); row d: (3/5, 3/5, 0, 1) / (11/5).
    expected_p = f64(
        [[5 / 13, 5 / 13, 0, 3 / 13], [5 / 13, 5 / 13, 0, 3 / 13], [0, 0, 1, 0], [3 / 11, 3 / 11, 0, 5 / 11]]
    )
    torch.testing.assert_close(step.plan.rows["model"], expected_p, rtol=0, atol=1e-12)
    # a receives 5/13·(1,0) + 5/13·(2,0) + 3/13·(3,4) on A0, d 3/11·(1,0) + 3/11·(2,0) + 5/11·(3,4)
    assert step.plan.receivers == CLIENTS
    assert_state(step.bar["a"], add(BAR["a"], state([24 / 13, 12 / 13], [0, 0], [0, 0], 0)))
    assert_state(step.bar["b"], add(BAR["b"], state([24 / 13, 12 / 13], [0, 0], [0, 0], 0)))
    assert_state(step.bar["c"], add(BAR["c"], TAU_MODEL["c"]))
    assert_state(step.bar["d"], add(BAR["d"], state([24 / 11, 20 / 11], [0, 0], [0, 0], 0)))


def test_fedbip_matches_a_numpy_reference_for_participants_only() -> None:
    """Dense random-ish integer updates, b sitting out: S, P and θ̄ from numpy on the flat τ's."""
    tau = {
        "a": state([1, -2], [3, 0], [1, 1], -1),
        "c": state([2, -1], [1, 1], [0, 2], 0),
        "d": state([-1, 2], [-3, 1], [1, -1], 2),
    }
    step = server_step("fedbip", updates(tau))
    x = np.stack([flat(tau[c]) for c in tau])
    s = np.array([[cosine(u, v) for v in x] for u in x])
    p = np.clip(s, 0, None)
    p /= p.sum(axis=1, keepdims=True)
    assert s[0, 2] < 0 and p[0, 2] == 0  # the case under test: a negative similarity
    assert step.similarity.clients == ["a", "c", "d"]
    np.testing.assert_allclose(step.similarity.groups["model"].similarity.numpy(), s, atol=1e-12)
    np.testing.assert_allclose(step.plan.rows["model"].numpy(), p, atol=1e-12)
    for i, c in enumerate(tau):
        np.testing.assert_allclose(flat(step.bar[c]), flat(BAR[c]) + p[i] @ x, rtol=1e-6)
    assert_state(step.bar["b"], BAR["b"])


def test_cumulative_variant_weighs_by_whole_trajectories() -> None:
    """fedbip-cumulative: S from θ_k − θ⁰ (here θ̄ + τ − θ⁰), while the round's τ is what is merged."""
    tau = {
        "a": state([1, -2], [3, 0], [1, 1], -1),
        "c": state([2, -1], [1, 1], [0, 2], 0),
        "d": state([-1, 2], [-3, 1], [1, -1], 2),
    }
    step = server_step("fedbip-cumulative", updates(tau))
    x = np.stack([flat(tau[c]) for c in tau])
    whole = np.stack([flat(BAR[c]) + flat(tau[c]) - flat(INITIAL) for c in tau])
    s = np.array([[cosine(u, v) for v in whole] for u in whole])
    p = np.clip(s, 0, None)
    p /= p.sum(axis=1, keepdims=True)
    update_s = np.array([[cosine(u, v) for v in x] for u in x])
    assert not np.allclose(s, update_s)  # the two bases really differ here
    np.testing.assert_allclose(step.plan.rows["model"].numpy(), p, atol=1e-12)
    for i, c in enumerate(tau):
        np.testing.assert_allclose(flat(step.bar[c]), flat(BAR[c]) + p[i] @ x, rtol=1e-6)
    no_initial = updates(tau)
    no_initial.initial = None
    with pytest.raises(UsageError, match="initial adapter"):
        server_step("fedbip-cumulative", no_initial)


def test_parameter_groups_put_the_head_in_one_group() -> None:
    names = [W, B1, "bert.encoder.layer.10.attention.self.query.lora_A", BIAS, A0, A0.replace("lora_A", "lora_B")]
    assert parameter_groups(names, "block") == {
        "classifier": [BIAS, W],
        "bert.encoder.layer.0": [A0, A0.replace("lora_A", "lora_B")],
        "bert.encoder.layer.1": [B1],
        "bert.encoder.layer.10": ["bert.encoder.layer.10.attention.self.query.lora_A"],
    }
    assert parameter_groups(names, "model") == {
        "model": [A0, A0.replace("lora_A", "lora_B"), B1, "bert.encoder.layer.10.attention.self.query.lora_A", BIAS, W]
    }


def test_fedbip_layerwise_has_one_weight_matrix_per_block() -> None:
    # Per block the cosines are: layer.0 S_ab = 1, c orthogonal; layer.1 S_ac = 1, b orthogonal;
    # head (weight and bias together) a = (1,0,0), b = (3,0,4), c = (0,1,0): S_ab = 3/5.
    # Had weight and bias been separate groups, the weight rows would be (1/2, 1/2, 0) instead.
    tau = {
        "a": state([1, 0], [1, 0], [1, 0], 0),
        "b": state([2, 0], [0, 1], [3, 0], 4),
        "c": state([0, 1], [1, 0], [0, 1], 0),
    }
    step = server_step("fedbip-layerwise", updates(tau))
    rows = step.plan.rows
    assert set(rows) == {"bert.encoder.layer.0", "bert.encoder.layer.1", "classifier"}
    torch.testing.assert_close(rows["bert.encoder.layer.0"], f64([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]))
    torch.testing.assert_close(rows["bert.encoder.layer.1"], f64([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]))
    torch.testing.assert_close(rows["classifier"], f64([[5 / 8, 3 / 8, 0], [3 / 8, 5 / 8, 0], [0, 0, 1]]))
    assert_state(step.bar["a"], add(BAR["a"], state([1.5, 0], [1, 0], [1.75, 0], 1.5)))
    assert_state(step.bar["b"], add(BAR["b"], state([1.5, 0], [0, 1], [2.25, 0], 2.5)))
    assert_state(step.bar["c"], add(BAR["c"], state([0, 1], [1, 0], [0, 1], 0)))
    assert_state(step.bar["d"], BAR["d"])
    # the recorded similarity is still the whole model's:
    # a = (1,0,1,0,1,0,0), b = (2,0,0,1,3,0,4), c = (0,1,1,0,0,1,0)
    s = step.similarity.groups["model"].similarity
    assert s[0, 1].item() == pytest.approx(5 / math.sqrt(90), abs=1e-12)
    assert s[0, 2].item() == pytest.approx(1 / 3, abs=1e-12)
    assert s[1, 2].item() == pytest.approx(0, abs=1e-12)


# The paper's weights as written keep negative cosines: not a convex combination (tests/test_fedbip_variants.py).
SIGNED = ("fedbip-paper", "fedbip-layerwise-paper")


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - set(SIGNED)))
def test_every_weight_row_sums_to_one(strategy: str) -> None:
    groups = {"a": 0, "b": 1, "c": 0, "d": 1}
    step = server_step(strategy, updates(TAU_MODEL, examples={"a": 2, "b": 3, "c": 5, "d": 7}, groups=groups))
    for rows in step.plan.rows.values():
        assert rows.shape == (len(step.plan.receivers), 4)
        torch.testing.assert_close(rows.sum(dim=1), torch.ones(rows.shape[0], dtype=torch.float64))
        assert (rows >= 0).all()


def test_check_strategies_lists_the_valid_names() -> None:
    assert check_strategies(["fedavg", "fedbip"]) == ["fedavg", "fedbip"]
    with pytest.raises(
        UsageError,
        match="unknown strategy fedprox; choose from fedbip, fedbip-layerwise, fedamp, uniform, fedavg, local, oracle, "
        "fedbip-cumulative, fedbip-layerwise-cumulative, fedbip-ema, fedbip-layerwise-ema",
    ):
        check_strategies(["fedbip", "fedprox"])
    with pytest.raises(UsageError, match=r"\(none\)"):
        check_strategies([])


def test_uniform_adds_the_plain_mean_update_to_each_participant_only() -> None:
    tau = {c: TAU_MODEL[c] for c in ("a", "b", "d")}
    step = server_step("uniform", updates(tau, examples={"a": 1, "b": 50, "c": 1, "d": 9}))
    assert step.plan.receivers == ["a", "b", "d"]
    torch.testing.assert_close(step.plan.rows["model"], torch.full((3, 3), 1 / 3, dtype=torch.float64))
    # mean τ = ((1 + 2 + 3)/3, 4/3, 0, ...) = (2, 4/3, 0, ...), whatever the examples
    mean = state([2, 4 / 3], [0, 0], [0, 0], 0)
    for c in ("a", "b", "d"):
        assert_state(step.bar[c], add(BAR[c], mean))
    assert_state(step.bar["c"], BAR["c"])


def test_fedamp_weights_and_models_on_three_clients_worked_by_hand() -> None:
    # Trained models differ in A0[0] only: a = 0, b = 1, c = -2 (other entries 7 in all three),
    # so the squared distances are d_ab = 1, d_ac = 4, d_bc = 9. σ = the lower median of the six
    # off-diagonal distances (1, 1, 4, 4, 9, 9) = 4, α = σ/(K-1) = 2, and
    # ξ_ij = α e^{-d/σ}/σ = e^{-d/4}/2 for j ≠ i, ξ_ii = 1 - Σ_{j≠i} ξ_ij.
    models = {c: state([x, 7], [7, 7], [7, 7], 7) for c, x in (("a", 0), ("b", 1), ("c", -2))}
    e = math.exp
    expected = f64(
        [
            [1 - (e(-1 / 4) + e(-1)) / 2, e(-1 / 4) / 2, e(-1) / 2],
            [e(-1 / 4) / 2, 1 - (e(-1 / 4) + e(-9 / 4)) / 2, e(-9 / 4) / 2],
            [e(-1) / 2, e(-9 / 4) / 2, 1 - (e(-1) + e(-9 / 4)) / 2],
        ]
    )
    round_ = RoundUpdates(
        clients=list(CLIENTS),
        participants=["a", "b", "c"],
        bar=BAR,
        trained=models,
        examples={c: 1 for c in CLIENTS},
        groups={c: None for c in CLIENTS},
    )
    step = server_step("fedamp", round_)
    assert step.plan.receivers == ["a", "b", "c"] and step.plan.mix_models
    torch.testing.assert_close(step.plan.rows["model"], expected, rtol=0, atol=1e-12)
    # Each receiver gets the ξ-weighted model u_i = Σ_j ξ_ij w_j, not θ̄_i plus an update:
    # u_a's A0[0] = 0·ξ_aa + 1·ξ_ab - 2·ξ_ac = e^{-1/4}/2 - e^{-1}; the shared entries stay 7.
    assert step.bar["a"][A0][0, 0].item() == pytest.approx(e(-1 / 4) / 2 - e(-1), abs=1e-6)
    # u_c's A0[0] = 0·ξ_ca + 1·ξ_cb - 2·ξ_cc = e^{-9/4}/2 - 2 + e^{-1} + e^{-9/4}
    assert step.bar["c"][A0][0, 0].item() == pytest.approx(e(-9 / 4) / 2 - 2 + e(-1) + e(-9 / 4), abs=1e-6)
    for c in ("a", "b", "c"):
        torch.testing.assert_close(step.bar[c][W], torch.full((1, 2), 7.0))
    assert_state(step.bar["d"], BAR["d"])


def test_fedamp_with_identical_models_is_the_plain_mean() -> None:
    same = {c: state([1, 2], [3, 4], [5, 6], 7) for c in ("a", "b")}
    round_ = RoundUpdates(list(CLIENTS), ["a", "b"], BAR, same, {c: 1 for c in CLIENTS}, {c: None for c in CLIENTS})
    torch.testing.assert_close(
        server_step("fedamp", round_).plan.rows["model"], torch.full((2, 2), 0.5, dtype=torch.float64)
    )


def test_ema_memory_and_fedbip_ema_weights_against_a_dense_reference() -> None:
    # Round 2 of a run: a and b have a memory from round 1, d has none (its memory starts as τ_d).
    previous = {"a": state([0, 5], [0, 0], [0, 0], 0), "b": state([-4, 0], [0, 0], [1, 0], 0)}
    round_ = updates({c: TAU_MODEL[c] for c in ("a", "b", "d")})
    round_.memory = {c: dict(m) for c, m in previous.items()}
    step = server_step("fedbip-ema", round_)
    expected = {
        "a": EMA_DECAY * flat(previous["a"]) + (1 - EMA_DECAY) * flat(TAU_MODEL["a"]),
        "b": EMA_DECAY * flat(previous["b"]) + (1 - EMA_DECAY) * flat(TAU_MODEL["b"]),
        "d": flat(TAU_MODEL["d"]),
    }
    for c, vector in expected.items():
        np.testing.assert_allclose(flat(step.memory[c]), vector, rtol=1e-6, atol=1e-7)
    assert "c" not in step.memory
    vectors = [expected[c] for c in ("a", "b", "d")]
    s = np.array([[cosine(x, y) for y in vectors] for x in vectors])
    positive = np.maximum(s, 0)
    torch.testing.assert_close(step.plan.rows["model"], torch.tensor(positive / positive.sum(axis=1, keepdims=True)))
    # the merge itself adds this round's τ (not the EMA) with those weights
    tau = np.stack([flat(TAU_MODEL[c]) for c in ("a", "b", "d")])
    merged = (positive / positive.sum(axis=1, keepdims=True)) @ tau
    np.testing.assert_allclose(flat(step.bar["b"]), flat(BAR["b"]) + merged[1], rtol=1e-6, atol=1e-6)


def test_uniform_is_fedavg_when_every_client_takes_part_with_equal_data_from_one_start() -> None:
    """With full participation, equal example counts and one shared θ̄ (as every run starts),
    the paper's uniform ablation and FedAvg give every client the same state, bit for bit: both add
    the plain mean τ to the same θ̄. (So in the --examples-per-client regimes they coincide.)"""
    shared = {c: INITIAL for c in CLIENTS}
    round_ = RoundUpdates(
        clients=list(CLIENTS),
        participants=list(CLIENTS),
        bar=shared,
        trained={c: add(INITIAL, TAU_MODEL[c]) for c in CLIENTS},
        examples={c: 64 for c in CLIENTS},
        groups={c: None for c in CLIENTS},
    )
    uniform, fedavg = server_step("uniform", round_), server_step("fedavg", round_)
    for c in CLIENTS:
        for name in SHAPES:
            assert torch.equal(uniform.bar[c][name], fedavg.bar[c][name])
    # unequal data breaks the identity: FedAvg weights by examples, uniform does not
    skewed = server_step("fedavg", replace(round_, examples={"a": 1, "b": 1, "c": 1, "d": 97}))
    assert not torch.equal(skewed.bar["a"][A0], uniform.bar["a"][A0])
