"""The ServerApp's one check of a client's train reply, before anything in it is used.

A SuperNode's ClientApp may be broken or hostile. A train reply enters the round only when it
comes from the node of a client that was asked this round, names that same client, answers the
round it was sent for, carries at most about the bytes its model's state takes, reports a finite
loss, and holds a state of the model's tensor names, shapes and dtypes, finite, whose norm is at
most ``MAX_NORM_GROWTH`` × (1 + the norm of the state the client was sent). Otherwise ``LeftOut``
says who and why, and the strategy leaves that client out of the round with that one log line: the
client keeps its state, and nothing of the reply reaches another client's model.

The size is checked on the serialised arrays before any tensor is built from them. The norm bound
catches what is not a training step at all (a state blown up by orders of magnitude); an
honest-looking but scaled update is ``--clip-norm``'s to bound, as in-process.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from fedbip_cli.simulate.flower.carriage import KEPT
from fedbip_cli.simulate.flower.records import ARRAYS, CONFIG, METRICS, from_record
from fedbip_cli.simulate.loop import state_bytes
from fedbip_cli.simulate.strategies import State

# A trained state's norm may be at most this many times (1 + the norm of the state it was sent).
MAX_NORM_GROWTH = 100.0
# Serialised bytes allowed per tensor beyond its data (the array's header), and per reply.
ARRAY_OVERHEAD, REPLY_SLACK = 512, 1 << 16


class LeftOut(Exception):
    """Why a reply does not enter the round; ``str`` names the client (or node) and the reason."""

    def __init__(self, who: str, why: str) -> None:
        super().__init__(f"{who} left out: {why}")
        self.who, self.why = who, why


@dataclass(frozen=True)
class Expected:
    """What the server expects of this round's train replies.

    round: the round the messages were sent for (replies repeat it as ``server-round``).
    reference: θ⁰, whose tensor names, shapes and dtypes every state must have.
    sent: each client's state as sent this round (θ̄_i), the yardstick of its reply's norm.
    asked: the clients sent a train message this round.
    kept: whether a reply also carries the state a method's client keeps (``carriage.KEPT``).
    """

    round: int
    reference: State
    sent: Mapping[str, State]
    asked: Collection[str]
    kept: bool = False


@dataclass(frozen=True)
class TrainReply:
    """A reply that passed every check."""

    client: str
    state: State
    loss: float
    kept: State | None


def sender(reply: Message, nodes: Mapping[int, str]) -> str:
    """The client a reply comes from: the name its node joined with, which the reply must repeat."""
    node = reply.metadata.src_node_id
    joined = nodes.get(node)
    if joined is None:
        raise LeftOut(f"node {node}", "it is not a client of this run")
    try:
        named = str(reply.content[CONFIG]["client"])
    except KeyError:
        raise LeftOut(joined, f"its reply from node {node} names no client") from None
    if named != joined:
        raise LeftOut(joined, f"its reply from node {node} names another client, {named[:64]!r}")
    return joined


def state_of(reply: Message, key: str, who: str, reference: State) -> State:
    """The state under ``key``: the names, shapes and dtypes of ``reference``, every value finite."""
    try:
        record = reply.content[key]
    except KeyError:
        raise LeftOut(who, f"its reply has no {key!r} state") from None
    if not isinstance(record, ArrayRecord) or set(record) != set(reference):
        names = sorted(set(record) ^ set(reference)) if isinstance(record, ArrayRecord) else []
        raise LeftOut(who, f"its {key!r} state has other tensor names than the model's ({', '.join(names)[:200]})")
    state = from_record(record)
    for name, tensor in reference.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise LeftOut(
                who,
                f"tensor {name} is {got.dtype} {tuple(got.shape)}, the model's {tensor.dtype} {tuple(tensor.shape)}",
            )
        if not bool(torch.isfinite(got).all()):
            raise LeftOut(who, f"tensor {name} holds NaN or Inf")
    return state


def _check_size(reply: Message, who: str, expected: Expected) -> None:
    reference = expected.reference
    states = 2 if expected.kept else 1
    limit = 2 * states * (state_bytes(reference) + ARRAY_OVERHEAD * len(reference)) + REPLY_SLACK
    size = sum(len(array.data) for record in reply.content.array_records.values() for array in record.values())
    if size > limit:
        raise LeftOut(who, f"its reply holds {size} bytes of arrays, more than the {limit} its model's state takes")


def _check_round(reply: Message, who: str, expected: Expected) -> None:
    try:
        answered = int(reply.content[CONFIG]["server-round"])
    except (KeyError, TypeError, ValueError):
        raise LeftOut(who, "its reply names no round") from None
    if answered != expected.round:
        raise LeftOut(who, f"its reply is for round {answered}, not round {expected.round} (stale)")


def _loss(reply: Message, who: str) -> float:
    try:
        loss = float(reply.content[METRICS]["train-loss"])
    except (KeyError, TypeError, ValueError):
        raise LeftOut(who, "its reply has no train loss") from None
    if not math.isfinite(loss):
        raise LeftOut(who, f"its train loss is {loss}")
    return loss


def _check_norm(state: State, sent: State, who: str) -> None:
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in state.values()))
    yardstick = math.sqrt(sum(float(t.double().square().sum()) for t in sent.values()))
    if norm > MAX_NORM_GROWTH * (1.0 + yardstick):
        raise LeftOut(
            who,
            f"its state's norm {norm:.3g} is over {MAX_NORM_GROWTH:g} × (1 + {yardstick:.3g}, the state it was sent)",
        )


def check_train_reply(reply: Message, nodes: Mapping[int, str], expected: Expected) -> TrainReply:
    """The reply's client, trained state, loss and (for a method) kept state; ``LeftOut`` when any check fails.

    Args:
        reply: a train reply without a Flower error.
        nodes: node id -> the client name it joined with.
        expected: what this round's replies must be.
    """
    who = sender(reply, nodes)
    if who not in expected.asked:
        raise LeftOut(who, "it was not asked to train this round")
    _check_round(reply, who, expected)
    _check_size(reply, who, expected)
    loss = _loss(reply, who)
    state = state_of(reply, ARRAYS, who, expected.reference)
    kept = state_of(reply, KEPT, who, expected.reference) if expected.kept else None
    _check_norm(state, expected.sent[who], who)
    return TrainReply(who, state, loss, kept)
