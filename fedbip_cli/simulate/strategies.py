"""Server steps of the federated simulation.

Every strategy is the same two verbs: choose weight rows over the participants' task vectors
τ_k = θ_k − θ̄_k (and which clients receive them), then θ̄_r ← θ̄_r + Σ_k P_rk τ_k. Similarities,
weights and the merge itself are the library's own (``similarity``, ``weights``, ``merge``);
strategies differ only in how P is chosen. FedAMP mixes whole models instead, θ̄_r ← Σ_k P_rk θ_k.

The server also keeps one memory per client, an exponential moving average of its past updates
(``EMA_DECAY``), which the ``-ema`` variants compare instead of the single round's τ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import UsageError
from fedbip_cli.merge import weighted_sum
from fedbip_cli.similarity import SimilarityResult, dense_inner_products, similarity_from_inner
from fedbip_cli.simulate.clipping import clip_plan
from fedbip_cli.taskvec import block_of, natural_key
from fedbip_cli.weights import WeightOptions, personalized_weights

State = dict[str, torch.Tensor]

# m_k ← β m_k + (1 − β) τ_k: a half-life of ln 0.5 / ln 0.8 ≈ 3.1 rounds, long enough to average
# out a few rounds of minibatch noise, short enough to follow the task. Chosen a priori, not tuned.
EMA_DECAY = 0.8


@dataclass
class RoundUpdates:
    """What the server sees after local training in one round."""

    clients: list[str]  # every client, in order
    participants: list[str]  # those that trained this round, in client order
    bar: dict[str, State]  # θ̄ for every client, before this round's step
    trained: dict[str, State]  # θ for each participant
    examples: dict[str, int]  # training examples per client
    groups: dict[str, int | None]  # true task groups; only the oracle may look
    initial: State | None = None  # the shared initial adapter θ⁰ (for similarity of whole trajectories)
    memory: dict[str, State] | None = None  # the server's EMA of each client's past updates (see EMA_DECAY)
    clip: ClipNorm | None = None  # --clip-norm: bound each update's norm (``clipping.clip_plan``)


@dataclass
class Plan:
    """Weight rows per parameter group: receivers[r] gets Σ_k rows[g][r, k] τ_k (k over participants)."""

    receivers: list[str]
    rows: dict[str, torch.Tensor]
    # The whole-model similarity of this round's τ, when the plan already computed it.
    similarity: SimilarityResult | None = None
    # False: θ̄_r ← θ̄_r + Σ_k P_rk τ_k (task vectors). True: θ̄_r ← Σ_k P_rk θ_k (whole models, FedAMP).
    mix_models: bool = False


@dataclass
class ServerStep:
    bar: dict[str, State]  # θ̄ for every client after the step
    similarity: SimilarityResult  # of the participants' task vectors (whole model)
    plan: Plan
    memory: dict[str, State]  # the EMA of each client's updates, this round's included
    clip: dict[str, Any] | None = None  # per group: the bound, the norms and each clipped client's scale


def parameter_groups(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Group trainable tensors: all together (``model``) or by transformer block (``block``).

    A tensor outside any block (the classification head) groups with its own module, so the
    head's weight and bias form one group.
    """
    ordered = sorted(names, key=natural_key)
    if granularity == "model":
        return {"model": ordered}
    groups: dict[str, list[str]] = {}
    for name in ordered:
        groups.setdefault(block_of(name.rsplit(".", 1)[0]), []).append(name)
    return groups


def task_vectors(updates: RoundUpdates) -> dict[str, torch.Tensor]:
    """τ_k = θ_k − θ̄_k per tensor name, stacked over participants on dim 0."""
    names = list(updates.bar[updates.clients[0]])
    return {
        name: torch.stack([updates.trained[c][name] - updates.bar[c][name] for c in updates.participants])
        for name in names
    }


def cumulative_vectors(updates: RoundUpdates) -> dict[str, torch.Tensor]:
    """θ_k − θ⁰ per tensor name: each participant's whole trajectory so far, stacked on dim 0."""
    if updates.initial is None:
        raise UsageError("cumulative similarity needs the initial adapter")
    return {
        name: torch.stack([updates.trained[c][name] - initial for c in updates.participants])
        for name, initial in updates.initial.items()
    }


def ema_memory(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> dict[str, State]:
    """m_k ← β m_k + (1 − β) τ_k for each participant (m_k = τ_k on its first round); others keep m_k."""
    memory = dict(updates.memory or {})
    for k, client in enumerate(updates.participants):
        previous = memory.get(client)
        memory[client] = {
            name: t[k].clone() if previous is None else EMA_DECAY * previous[name] + (1 - EMA_DECAY) * t[k]
            for name, t in tau.items()
        }
    return memory


def ema_vectors(updates: RoundUpdates) -> dict[str, torch.Tensor]:
    """Each participant's EMA of its updates (this round's included), stacked on dim 0."""
    if updates.memory is None:
        raise UsageError("EMA similarity needs the server's memory of past updates")
    names = list(updates.memory[updates.participants[0]])
    return {name: torch.stack([updates.memory[c][name] for c in updates.participants]) for name in names}


def update_similarity(participants: list[str], tau: dict[str, torch.Tensor], granularity: str) -> SimilarityResult:
    """Exact cosine similarity of the participants' task vectors at ``granularity``."""
    inner = {name: dense_inner_products(list(t)) for name, t in tau.items()}
    return similarity_from_inner(participants, granularity, parameter_groups(list(tau), granularity), inner)


def _uniform_rows(updates: RoundUpdates, receivers: list[str], same: Callable[[str, str], bool]) -> torch.Tensor:
    """Sample-weighted rows: receiver r averages the participants k with same(r, k)."""
    rows = torch.zeros(len(receivers), len(updates.participants), dtype=torch.float64)
    for r, receiver in enumerate(receivers):
        for k, sender in enumerate(updates.participants):
            if same(receiver, sender):
                rows[r, k] = updates.examples[sender]
    return rows / rows.sum(dim=1, keepdim=True)


def plan_local(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
    """No communication: each participant keeps its own update (P = I)."""
    return Plan(list(updates.participants), {"model": torch.eye(len(updates.participants), dtype=torch.float64)})


def plan_fedavg(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
    """FedAvg / FedIT: one global model, the sample-weighted mean of the updates, sent to everyone."""
    return Plan(list(updates.clients), {"model": _uniform_rows(updates, updates.clients, lambda r, k: True)})


def plan_oracle(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
    """Upper reference: FedAvg within each true task group (every member of a group that took part)."""
    if any(updates.groups[c] is None for c in updates.clients):
        raise UsageError("the oracle strategy needs known task groups", hint="use --partition task-shift or tasks")
    active = {updates.groups[c] for c in updates.participants}
    receivers = [c for c in updates.clients if updates.groups[c] in active]
    same = lambda r, k: updates.groups[r] == updates.groups[k]  # noqa: E731
    return Plan(receivers, {"model": _uniform_rows(updates, receivers, same)})


def plan_uniform(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
    """The paper's ablation: FedBip's personalized step with every weight 1/K over the K participants."""
    count = len(updates.participants)
    return Plan(list(updates.participants), {"model": torch.full((count, count), 1 / count, dtype=torch.float64)})


def fedamp_weights(models: dict[str, torch.Tensor]) -> torch.Tensor:
    """FedAMP's attention-inducing weights over K models stacked on dim 0 of each tensor.

    Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data" (AAAI 2021), eq. for
    ξ, as PFLlib's ``serveramp.py`` computes it: ξ_ij = α·A'(‖w_i − w_j‖²) for j ≠ i with
    A'(x) = e^{−x/σ}/σ, and ξ_ii = 1 − Σ_{j≠i} ξ_ij. The paper leaves σ and α to the user (PFLlib's
    defaults α = σ = 1 give negative self-weights at the scale of LoRA adapters); here σ is the
    median of the K(K−1) squared distances of the round, so that the weights do not depend on the
    parameters' scale, and α = σ/(K−1), the largest α that keeps every ξ_ii ≥ 0 whatever the
    distances: ξ_ij = e^{−d_ij/σ}/(K−1).

    Returns:
        (K, K) float64 rows that sum to 1.
    """
    flat = torch.cat([t.reshape(t.shape[0], -1).to(torch.float64) for t in models.values()], dim=1)
    count = flat.shape[0]
    if count == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    squared = torch.cdist(flat, flat).square()
    off = ~torch.eye(count, dtype=torch.bool)
    sigma = squared[off].median().item()
    if not sigma > 0:  # at least half the pairs identical: treat every pair as identical
        return torch.full((count, count), 1 / count, dtype=torch.float64)
    xi = torch.exp(-squared / sigma) / (count - 1) * off
    return xi + torch.diag(1 - xi.sum(dim=1))


def plan_fedamp(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
    """FedAMP: each participant's next model is u_i = Σ_j ξ_ij w_j over the trained models w_j
    (``fedamp_weights``); the client then trains from u_i, as in the paper's algorithm. PFLlib's
    client keeps training its own model and adds a proximal term computed on detached tensors
    (no gradient); the paper's proximal term is left out here too."""
    models = {name: torch.stack([updates.trained[c][name] for c in updates.participants]) for name in tau}
    return Plan(list(updates.participants), {"model": fedamp_weights(models)}, mix_models=True)


LORA_FACTORS = (".lora_A", ".lora_B")


def product_vectors(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The round's update of each LoRA product, B_k A_k (trained) − B̄_k Ā_k (sent), under the name
    ``<module>.product``, stacked over participants; every other tensor's τ as it is. (LoRA's scale
    is the same for every client, so it does not change a cosine and is left out.)"""
    vectors: dict[str, torch.Tensor] = {}
    for name, stacked in tau.items():
        if name.endswith(".lora_A") and f"{name.removesuffix('.lora_A')}.lora_B" in tau:
            continue
        module = name.removesuffix(".lora_B")
        a, b = f"{module}.lora_A", name
        if not name.endswith(".lora_B") or a not in tau:  # not a LoRA pair: its own τ
            vectors[name] = stacked
            continue
        vectors[f"{module}.product"] = torch.stack(
            [
                updates.trained[c][b] @ updates.trained[c][a] - updates.bar[c][b] @ updates.bar[c][a]
                for c in updates.participants
            ]
        )
    return vectors


# What FedBip's similarity compares: the round's τ (the paper), whole trajectories, EMAs, the LoRA
# products' updates, or the LoRA factors' τ alone (the head left out).
_BASES: dict[str, Callable[[RoundUpdates, dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "update": lambda updates, tau: tau,
    "cumulative": lambda updates, tau: cumulative_vectors(updates),
    "ema": lambda updates, tau: ema_vectors(updates),
    "product": product_vectors,
    "lora": lambda updates, tau: {name: t for name, t in tau.items() if name.endswith(LORA_FACTORS)},
}


def _fedbip(
    granularity: str, basis: str = "update", negative: str = "clip"
) -> Callable[[RoundUpdates, dict[str, torch.Tensor]], Plan]:
    """FedBip weights from the cosine of this round's updates τ (the paper), of each participant's
    whole trajectory θ_k − θ⁰ (``cumulative``), of the EMA of its updates (``ema``), of its LoRA
    products' update (``product``) or of its LoRA factors alone (``lora``); ``negative`` ``keep``
    takes the paper's cos / Σ cos as written, negative cosines included. In every case the round's
    updates τ are what is merged; a parameter group the similarity leaves out (the head under
    ``lora``, per block) takes the whole-model weights of the same vectors."""
    options = WeightOptions(negative=negative)

    def plan(updates: RoundUpdates, tau: dict[str, torch.Tensor]) -> Plan:
        vectors = _BASES[basis](updates, tau)
        similarity = update_similarity(updates.participants, vectors, granularity)
        rows = {name: personalized_weights(g.similarity, options) for name, g in similarity.groups.items()}
        missing = set(parameter_groups(list(tau), granularity)) - set(rows)
        if missing:
            whole = update_similarity(updates.participants, vectors, "model").groups["model"].similarity
            rows.update(dict.fromkeys(missing, personalized_weights(whole, options)))
        reusable = basis == "update" and granularity == "model"
        return Plan(list(updates.participants), rows, similarity if reusable else None)

    plan.__doc__ = f"FedBip at {granularity} granularity, similarity of the {basis} vectors, negatives {negative}."
    return plan


STRATEGIES: dict[str, Callable[[RoundUpdates, dict[str, torch.Tensor]], Plan]] = {
    "fedbip": _fedbip("model"),
    "fedbip-layerwise": _fedbip("block"),
    "fedamp": plan_fedamp,
    "uniform": plan_uniform,
    "fedavg": plan_fedavg,
    "local": plan_local,
    "oracle": plan_oracle,
    # Variants (not in the paper): similarity of whole trajectories, or of an EMA of past updates,
    # which accumulate task signal while a single round's few-step updates are dominated by
    # minibatch noise.
    "fedbip-cumulative": _fedbip("model", "cumulative"),
    "fedbip-layerwise-cumulative": _fedbip("block", "cumulative"),
    "fedbip-ema": _fedbip("model", "ema"),
    "fedbip-layerwise-ema": _fedbip("block", "ema"),
    # What the paper's text also allows: the cosine of the LoRA products B A rather than of the
    # factors, the weights as written (cos / Σ cos, negatives kept), the head left out of the similarity.
    "fedbip-product": _fedbip("model", "product"),
    "fedbip-layerwise-product": _fedbip("block", "product"),
    "fedbip-paper": _fedbip("model", negative="keep"),
    "fedbip-layerwise-paper": _fedbip("block", negative="keep"),
    "fedbip-nohead": _fedbip("model", "lora"),
    "fedbip-layerwise-nohead": _fedbip("block", "lora"),
}


def check_strategies(names: list[str], extra: list[str] | None = None) -> list[str]:
    """Validate strategy names (those of ``STRATEGIES`` and the ``extra`` ones, the methods of
    ``methods``); an unknown one lists the valid ones."""
    valid = [*STRATEGIES, *(extra or [])]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UsageError(
            f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(valid)}",
            hint="e.g. --compare fedbip,fedbip-layerwise,fedavg,local",
        )
    return names


def server_step(strategy: str, updates: RoundUpdates) -> ServerStep:
    """One round's aggregation: θ̄_r ← θ̄_r + Σ_k P_rk τ_k for every receiver r (Σ_k P_rk θ_k when
    the plan mixes models), and the server's memory of updates moved on by this round's."""
    tau = task_vectors(updates)
    updates = replace(updates, memory=ema_memory(updates, tau))
    plan = STRATEGIES[strategy](updates, tau)
    if set(plan.rows) == {"model"}:
        group_of = {name: "model" for name in tau}
    else:
        group_of = {name: g for g, members in parameter_groups(list(tau), "block").items() for name in members}
    clipped = None
    if updates.clip is not None:
        plan, clipped = clip_plan(plan, tau, group_of, updates.participants, updates.clip)
    bar = dict(updates.bar)
    for receiver in plan.receivers:
        bar[receiver] = dict(bar[receiver])
    for name, stacked in tau.items():
        if plan.mix_models:
            models = torch.stack([updates.trained[c][name] for c in updates.participants])
            merged = weighted_sum(models, plan.rows[group_of[name]])
            for r, receiver in enumerate(plan.receivers):
                bar[receiver][name] = merged[r]
            continue
        merged = weighted_sum(stacked, plan.rows[group_of[name]])
        for r, receiver in enumerate(plan.receivers):
            bar[receiver][name] = updates.bar[receiver][name] + merged[r]
    similarity = plan.similarity or update_similarity(updates.participants, tau, "model")
    return ServerStep(bar, similarity, plan, updates.memory or {}, clipped)
