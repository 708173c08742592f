"""Strategies beyond "the server chooses weight rows P": methods whose server keeps state of its own,
whose clients keep state between rounds or train with an extra loss (issue 14).

A ``Method`` is a registered strategy with a few verbs, in the spirit of Flower's strategy verbs:

- server state: ``initial_server(θ⁰, clients)``, the state the server keeps beyond the personalized
  states θ̄: named dicts of tensors (``StrategyRun.server``, checkpointed with them as
  ``server/<name>/<tensor>``; a model-sized state such as FedOA's global adapter, or any other
  tensors such as FedMerge's weight matrix W, which the checkpoint checks against this initial state);
- client round: ``client_round(model, run, client, data, fit) -> ClientReply``, a participant's local
  work: it updates what the client keeps between rounds (its personalized state θ̄_client, the
  adapter it is evaluated and saved with) and returns what the client sends, its training loss and
  what the server sent it this round (whose sizes are the round's downlink bytes). ``fit`` trains
  from a state with the round's batches, optionally with an extra loss term and another number of
  steps;
- aggregation: ``server_round(run, updates, server) -> (RoundUpdates, ServerStep)``, what the server
  makes of the participants' replies: it moves ``run.server`` on and returns the step (θ̄ for every
  client) and the ``RoundUpdates`` the round's similarity and separation records are computed from.
  ``server`` (``ServerContext``) is what a server step may use beyond the replies: the model (for
  a server that runs it, as the universal expert's distillation does), the public unlabeled
  sentences (for a method with ``needs_public``: ``partition.public_sentences``, tokenized, as
  ``loop.Simulation`` holds them), the round and the seed;
- what the server sent: ``sent_from(run, clients) -> {client: state}``, for each participant the state
  the server sent it this round, which its reply updates (the reference from which ``--clip-norm``
  bounds a method's updates, ``clipping.clip_sent``, and a scaled attacker multiplies its own);
- post-training phase: ``finish(model, run, client, data, fit)``, called for every client after the
  last round's server step and before that round's evaluation and checkpoint (so a run interrupted
  before the end redoes the last round with its phase, and resumes identically); ``finish`` is None
  for a method without one. Its ``fit`` draws batches of round ``rounds + 1``.

What travels between the engines' two sides: the client's state between rounds is
``run.bar[client]`` (and whatever the method reads of ``run.server``); the server state is
``run.server``; a reply is ``ClientReply.sent`` and its loss.

The strategies of ``strategies.STRATEGIES`` need none of this (a client trains the θ̄ it is sent
and sends the result; the server's step is ``server_step``), so the round loop calls these verbs
only for the names in ``METHODS`` and runs every other strategy exactly as before. The methods:
FedOA (below), FedMerge (``fedmerge``), TAP (``tap``) and the universal expert (``universal``).

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
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.model import ClientModel, Regularizer, Tokens
from fedbip_cli.simulate.strategies import RoundUpdates, ServerStep, State, server_step

if TYPE_CHECKING:
    from fedbip_cli.simulate.checkpoint import StrategyRun
    from fedbip_cli.simulate.loop import ClientTokens

FEDOA_LAMBDA = 0.5  # FedOA's code default (``regular_weight``)
GLOBAL = "global"  # FedOA's and TAP's server state: the global adapter


class Fit(Protocol):
    """One local training of a client with the round's batches: from ``state``, with an optional
    extra loss term, for ``steps`` optimizer steps (None: the run's ``--local-steps``); returns the
    trained state and the mean task loss."""

    def __call__(
        self, state: State, regularizer: Regularizer | None, steps: int | None = None
    ) -> tuple[State, float]: ...


@dataclass(frozen=True)
class ClientReply:
    """What a participant's round produced."""

    sent: State  # what it sends the server
    loss: float  # the mean task loss of its training
    received: tuple[State, ...]  # what the server sent it this round (its sizes: the downlink bytes)
    # What it trained and keeps when that is not what it sends (--select-on-validation: ``selection``).
    kept: State | None = None


@dataclass(frozen=True)
class ServerContext:
    """What a method's server step may use beyond the participants' replies."""

    model: ClientModel  # the run's model, for a server that runs it (the universal expert's distillation)
    public: Tokens | None  # the public unlabeled sentences, when the run holds them (``needs_public``)
    round: int
    seed: int


class Method(Protocol):
    """A strategy with server state, client state or a client loss (see the module's docstring)."""

    name: str
    needs_public: bool  # whether the server needs the public unlabeled sentences (``ServerContext.public``)
    finish: Callable[[ClientModel, StrategyRun, str, ClientTokens, Fit], None] | None

    def initial_server(self, initial: State, clients: list[str]) -> dict[str, State]: ...

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> ClientReply: ...

    def server_round(
        self, run: StrategyRun, updates: RoundUpdates, server: ServerContext
    ) -> tuple[RoundUpdates, ServerStep]: ...

    def sent_from(self, run: StrategyRun, clients: list[str]) -> dict[str, State]: ...


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


def personal_then_global(
    run: StrategyRun, client: str, personal: State, regularizer: Regularizer | None, fit: Fit
) -> ClientReply:
    """The round of a client that keeps a personal model beside a FedAvg global one (FedOA, TAP):
    it trains ``personal`` (with ``regularizer``) into the model it keeps, then trains the global
    model it received on the task loss alone and sends that."""
    received = run.server[GLOBAL]
    run.bar[client], loss = fit(personal, regularizer)
    sent, _ = fit(received, None)
    return ClientReply(sent, loss, (received,))


@dataclass(frozen=True)
class FedOA:
    """FedOA: a FedAvg global adapter and a personal adapter per client regularised toward the
    global one's final hidden features (see the module's docstring)."""

    weight: float = FEDOA_LAMBDA
    name: str = "fedoa"
    needs_public: bool = False
    finish: None = None

    def initial_server(self, initial: State, clients: list[str]) -> dict[str, State]:
        return {GLOBAL: dict(initial)}

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> ClientReply:
        model.load_state(run.server[GLOBAL])
        target = model.features(data.train)
        return personal_then_global(run, client, run.bar[client], feature_regularizer(target, self.weight), fit)

    def server_round(
        self, run: StrategyRun, updates: RoundUpdates, server: ServerContext
    ) -> tuple[RoundUpdates, ServerStep]:
        return fedavg_round(run, updates, GLOBAL)

    def sent_from(self, run: StrategyRun, clients: list[str]) -> dict[str, State]:
        return {client: run.server[GLOBAL] for client in clients}


def _fedmerge(config: Any) -> Method:
    from fedbip_cli.simulate.fedmerge import FedMerge  # its module imports this one

    return FedMerge(global_models=config.global_models, lr_w=config.fedmerge_lr_w, seed=config.seed)


def _tap(config: Any) -> Method:
    from fedbip_cli.simulate.tap import TAP

    return TAP(config.tap_margin, config.tap_kd_steps, config.tap_kd_weight, config.tap_temperature)


def _universal(config: Any) -> Method:
    from fedbip_cli.simulate.universal import UniversalExpert

    return UniversalExpert(config.distill_steps, config.batch_size, config.lr)


# name -> the method built from the run's options (a ``loop.SimulationConfig``).
METHODS: dict[str, Callable[[Any], Method]] = {
    "fedoa": lambda config: FedOA(weight=config.fedoa_lambda),
    "fedmerge": _fedmerge,
    "tap": _tap,
    "universal-expert": _universal,
}


# Methods whose states Flower's messages do not carry (none: ``flower/carriage.py`` carries any
# method's verbs, its server state in the strategy and its client state in ``context.state``).
NOT_ON_FLOWER: tuple[str, ...] = ()


def check_flower_strategies(config: object) -> None:
    """Refuse the methods that do not run on Flower (``NOT_ON_FLOWER``; ``config`` is a
    ``loop.SimulationConfig``)."""
    methods = [s for s in getattr(config, "strategies", ()) if s in NOT_ON_FLOWER]
    if methods:
        raise UsageError(
            f"strategy {', '.join(methods)} does not run on --engine flower yet",
            hint="run it with --engine inprocess",
        )
