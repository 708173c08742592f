"""``simulate --select-on-validation``: each client chooses, every round, between its own trained model
and the merged model the server sent, on sentences it held out of its training.

A client holds out a seeded fraction of its training sentences (``split_validation``). In each round it
trains from the model it chose last (its *own* model, ``StrategyRun.own``), so its local update is
``Δ = θ − own``, and it sends the server ``θ̄ + Δ``: the merged model the server sent it plus this
round's update, a state of the form every strategy already receives, so the server sees nothing new and
computes the same task vector ``Δ`` it would without selection. When the server's reply ``θ̄'`` arrives,
the client scores ``(1 − λ)·θ + λ·θ̄'`` for every λ of ``GRID`` on its validation sentences and keeps the
best (``select``): λ = 0 keeps its own trained model (local training), λ = 1 takes the merge (the
strategy without selection). Its test accuracy and its final adapter are those of the model it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedbip_cli.defaults import SELECTION_GRID
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.data import ClientData
from fedbip_cli.simulate.model import ClientModel, Tokens

State = dict[str, torch.Tensor]

GRID = SELECTION_GRID  # λ, the merge's share: 0 = the client's own trained model, 1 = the merge


@dataclass(frozen=True)
class Choice:
    """What one client chose in one round: the model it keeps, its λ, and its validation scores."""

    state: State
    weight: float  # λ
    accuracy: float
    loss: float


def check_fraction(fraction: float | None) -> None:
    """Refuse a held-out fraction outside (0, 1)."""
    if fraction is not None and not 0 < fraction < 1:
        raise UsageError(f"--validation-fraction {fraction} must be between 0 and 1 (exclusive)")


def split_validation(clients: list[ClientData], fraction: float, seed: int) -> list[ClientData]:
    """Move a seeded ``fraction`` of each client's training sentences (at least one, never all) into
    its validation split; the rest stays its training split, in its order. The draw depends on the
    seed and the client's place only.

    Raises:
        UsageError: a client with fewer than two training sentences.
    """
    for index, client in enumerate(clients):
        count = len(client.train_texts)
        if count < 2:
            raise UsageError(
                f"client {client.name} has {count} training sentence(s): --select-on-validation holds some out",
                hint="give each client at least 2 training sentences (--examples-per-client)",
            )
        held = min(count - 1, max(1, round(fraction * count)))
        chosen = set(np.random.default_rng([seed, 2026, index]).permutation(count)[:held].tolist())
        kept = [i for i in range(count) if i not in chosen]
        client.validation_texts = [client.train_texts[i] for i in sorted(chosen)]
        client.validation_labels = [client.train_labels[i] for i in sorted(chosen)]
        client.train_texts = [client.train_texts[i] for i in kept]
        client.train_labels = [client.train_labels[i] for i in kept]
    return clients


def interpolate(own: State, merged: State, weight: float) -> State:
    """``(1 − λ)·own + λ·merged`` per tensor (λ = ``weight``; 0 and 1 give the inputs' values exactly)."""
    if weight == 0.0:
        return {name: t.clone() for name, t in own.items()}
    if weight == 1.0:
        return {name: t.clone() for name, t in merged.items()}
    return {name: torch.lerp(own[name], merged[name], weight) for name in own}


def sent_state(merged: State, start: State, trained: State) -> State:
    """What a selecting client sends: ``θ̄ + (θ − start)``, the merged model it was sent plus the update
    of its round (which it trained from ``start``, the model it kept)."""
    return {name: merged[name] + (trained[name] - start[name]) for name in trained}


def select(model: ClientModel, validation: Tokens, labels: torch.Tensor, trained: State, merged: State) -> Choice:
    """The best of ``GRID`` on the client's validation sentences: the highest accuracy, then the lowest
    mean cross-entropy (to 1e-6: candidates equal but for rounding tie), then the larger λ."""
    best: tuple[tuple[float, float, float], Choice] | None = None
    for weight in GRID:
        state = interpolate(trained, merged, weight)
        model.load_state(state)
        logits = model.logits(validation).double()
        accuracy = (logits.argmax(dim=-1) == labels).double().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        key = (accuracy, -round(loss, 6), weight)
        if best is None or key > best[0]:
            best = (key, Choice(state, weight, accuracy, loss))
    assert best is not None
    return best[1]
