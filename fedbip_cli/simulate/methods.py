"""Strategies beyond "the server chooses weight rows P": methods whose server keeps state of its own,
whose clients keep state between rounds or train with an extra loss (issue 14).

A ``Method`` is a registered strategy with four verbs, in the spirit of Flower's strategy verbs:

- server state: ``initial_server(θ⁰)``, the state the server keeps beyond the personalized states
  θ̄ (``StrategyRun.server``, checkpointed with them);
- client round: ``client_round(model, run, client, data, fit)``, a participant's local work: it
  updates what the client keeps between rounds (its personalized state θ̄_client, the adapter it is
  evaluated and saved with) and returns what the client sends, with its training loss. ``fit``
  trains from a state with the round's batches, optionally with an extra loss term;
- aggregation: ``server_round(run, updates)``, what the server makes of the participants' replies:
  it moves ``run.server`` on and returns the step (θ̄ for every client) and the ``RoundUpdates``
  the round's similarity and separation records are computed from;
- post-training phase: ``finish`` (None when the method has none; no method here has one yet).

The strategies of ``strategies.STRATEGIES`` need none of this (a client trains the θ̄ it is sent
and sends the result; the server's step is ``server_step``), so the round loop calls these verbs
only for the names in ``METHODS`` and runs every other strategy exactly as before.

FedOA — adapters for out-of-distribution generalization in federated foundation models (arXiv
2505.01075; code Lydia-yang/FedOA). Each client keeps a personal adapter beside the global one.
In a round a participant (1) trains its personal adapter, from its previous one, with the task loss
plus λ · mean over the batch of ‖h_personal − h_global‖², h being the final hidden features (the
classification head's input) under the personal adapter and under the global adapter it received,
then (2) trains the received global adapter on the task loss alone and sends it; the server
averages the sent adapters as FedAvg (weighted by training examples). Clients are evaluated with
their personal adapters. Followed from the code: the personal adapter is trained before the global
one in each round (the code trains it from the second round on; here from the first), and the
default weight λ = 0.5 (``regular_weight``, with the feature-embedding
``regular_term``). Choices made here: the squared Euclidean distance (smooth where the two features
coincide, as they do at the start; the paper writes the norm), the global features computed once
per round from the received global adapter and held fixed, and the personal adapter starting at θ⁰
like the global one. Both local trainings use the round's batches of ``loop.batch_generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.model import ClientModel, Regularizer
from fedbip_cli.simulate.strategies import RoundUpdates, ServerStep, State, server_step

if TYPE_CHECKING:
    from fedbip_cli.simulate.checkpoint import StrategyRun
    from fedbip_cli.simulate.loop import ClientTokens

# fit(state, regularizer) -> (trained state, mean task loss): one local training with the round's batches.
Fit = Callable[[State, Regularizer | None], tuple[State, float]]

FEDOA_LAMBDA = 0.5  # FedOA's code default (``regular_weight``)
GLOBAL = "global"  # FedOA's server state: the global adapter


class Method(Protocol):
    """A strategy with server state, client state or a client loss (see the module's docstring)."""

    name: str
    finish: Callable[..., None] | None

    def initial_server(self, initial: State) -> dict[str, State]: ...

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> tuple[State, float]: ...

    def server_round(self, run: StrategyRun, updates: RoundUpdates) -> tuple[RoundUpdates, ServerStep]: ...


def feature_regularizer(target: torch.Tensor, weight: float) -> Regularizer:
    """λ · mean_b ‖h_b − target_b‖²: the distance of a batch's features h (batch, hidden) to the
    ``target`` features (N, hidden) of the same sentences, picked by the batch's indices.

    Args:
        target: fixed features of every training sentence (no gradient flows into them).
        weight: λ.
    """
    fixed = target.detach()

    def term(index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        goal = fixed[index].to(features.device, features.dtype)
        return weight * (features - goal).square().sum(dim=1).mean()

    return term


def fedavg_round(run: StrategyRun, updates: RoundUpdates, key: str) -> tuple[RoundUpdates, ServerStep]:
    """The server's shared model ``run.server[key]`` ← the example-weighted mean of the participants'
    sent states (FedAvg's step, ``server_step("fedavg")``); each client's personalized θ̄ is kept.

    Returns:
        the round's updates as FedAvg saw them (every client's base the shared model) and the step,
        whose ``bar`` is the clients' personalized states, untouched.
    """
    shared = run.server[key]
    view = replace(updates, bar={c: shared for c in updates.clients})
    step = server_step("fedavg", view)
    run.server[key] = step.bar[updates.clients[0]]
    return view, replace(step, bar=dict(updates.bar))


@dataclass(frozen=True)
class FedOA:
    """FedOA: a FedAvg global adapter and a personal adapter per client regularised toward the
    global one's final hidden features (see the module's docstring)."""

    weight: float = FEDOA_LAMBDA
    name: str = "fedoa"
    finish: Callable[..., None] | None = None

    def initial_server(self, initial: State) -> dict[str, State]:
        return {GLOBAL: dict(initial)}

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> tuple[State, float]:
        received = run.server[GLOBAL]
        model.load_state(received)
        target = model.features(data.train)
        run.bar[client], loss = fit(run.bar[client], feature_regularizer(target, self.weight))
        sent, _ = fit(received, None)
        return sent, loss

    def server_round(self, run: StrategyRun, updates: RoundUpdates) -> tuple[RoundUpdates, ServerStep]:
        return fedavg_round(run, updates, GLOBAL)


# name -> the method built from the run's options (``loop.SimulationConfig``'s fields).
METHODS: dict[str, Callable[..., Method]] = {
    "fedoa": lambda config: FedOA(weight=config.fedoa_lambda),
}


def check_flower_strategies(config: object) -> None:
    """Refuse the methods on Flower: their client state and server state are not yet carried by
    Flower's messages and ``context.state`` (``config`` is a ``loop.SimulationConfig``)."""
    methods = [s for s in getattr(config, "strategies", ()) if s in METHODS]
    if methods:
        raise UsageError(
            f"strategy {', '.join(methods)} does not run on --engine flower yet",
            hint="run it with --engine inprocess",
        )
