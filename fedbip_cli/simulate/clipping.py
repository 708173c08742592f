"""The server-step defence of ``fedbip simulate --clip-norm``: norm bounding of the round's updates.

The same bound as ``fedbip merge --clip-norm`` (``fedbip_cli.defence``): each participant's update
τ_k, or under a per-block plan each block's part of it, is scaled by c_k = min(1, bound / ‖τ_k‖),
where the bound is by default the median norm of the round's updates (FLAME's). Because the weight
rows multiply the updates linearly, that is exactly the column scaling P'_rk = P_rk c_k of the
strategy's rows (``defence.clipped_weights``), applied inside the one pure server step that every
engine calls. Only plans that merge task vectors can be clipped this way: FedAMP mixes whole models.

A method (FedOA, FedMerge, TAP, the universal expert: ``methods``) aggregates the sent states its own
way, so its participants' sent states are clipped before it sees them (``clip_sent``): each update
θ_k − r_k from the state r_k the server sent (``Method.sent_from``) is scaled by the same c_k, so the
method aggregates r_k + c_k (θ_k − r_k); for an aggregation linear in the sent states (FedOA's and
TAP's FedAvg) that is exactly the column scaling above.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from fedbip_cli.defence import ClipNorm, clip_scales, clipped_weights
from fedbip_cli.errors import UsageError

if TYPE_CHECKING:
    from fedbip_cli.simulate.strategies import Plan


def group_norms(tau: dict[str, torch.Tensor], members: list[str]) -> torch.Tensor:
    """‖τ_k‖ over the tensors ``members`` for each participant k (dim 0 of every stacked tensor), float64."""
    squares = [tau[name].reshape(tau[name].shape[0], -1).to(torch.float64).square().sum(dim=1) for name in members]
    return torch.stack(squares).sum(dim=0).sqrt()


def clip_plan(
    plan: Plan, tau: dict[str, torch.Tensor], group_of: dict[str, str], participants: list[str], clip: ClipNorm
) -> tuple[Plan, dict[str, Any]]:
    """``plan`` with each group's rows column-scaled by its clip factors, and the record of the clip.

    Args:
        plan: the strategy's weight rows, one (receivers × participants) matrix per group.
        tau: the participants' updates per tensor name, stacked on dim 0.
        group_of: the plan group of each tensor name.
        participants: the clients of dim 0, in order.
        clip: the bound.

    Returns:
        The clipped plan, and per group the bound, every participant's norm and each clipped
        participant's scale factor (the record written to ``similarity.jsonl``).
    """
    if plan.mix_models:
        raise UsageError("--clip-norm bounds task vectors; this strategy mixes whole models")
    rows: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {}
    for group, weights in plan.rows.items():
        norms = group_norms(tau, [name for name, g in group_of.items() if g == group])
        rows[group], clipped = clipped_weights(weights, norms, clip)
        assert clipped is not None
        record[group] = {
            "bound": clipped["bound"],
            "norms": {client: float(n) for client, n in zip(participants, norms, strict=True)},
            "clipped": {participants[j]: scale for j, scale in clipped["clipped"].items()},
        }
    return replace(plan, rows=rows), record


def clip_sent(
    trained: dict[str, dict[str, torch.Tensor]],
    references: dict[str, dict[str, torch.Tensor]],
    participants: list[str],
    clip: ClipNorm,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The participants' sent states with each update from its reference clipped, and the record.

    Args:
        trained: each participant's sent state θ_k.
        references: the state r_k the server sent each participant, which θ_k updates.
        participants: the clients, in order.
        clip: the bound (of the whole model's update: one group, ``model``).

    Returns:
        r_k + c_k (θ_k − r_k) per participant (computed in float64, stored at each tensor's dtype;
        θ_k itself where c_k = 1), and the record in ``clip_plan``'s form.
    """
    tau = {
        name: torch.stack(
            [trained[c][name].to(torch.float64) - references[c][name].to(torch.float64) for c in participants]
        )
        for name in trained[participants[0]]
    }
    norms = group_norms(tau, list(tau))
    bound = clip.bound(norms)
    scales = clip_scales(norms, bound)
    clipped = dict(trained)
    for k, client in enumerate(participants):
        if scales[k] < 1:
            clipped[client] = {
                name: (references[client][name].to(torch.float64) + scales[k] * tau[name][k]).to(t.dtype)
                for name, t in trained[client].items()
            }
    record = {
        "model": {
            "bound": bound,
            "norms": {client: float(n) for client, n in zip(participants, norms, strict=True)},
            "clipped": {participants[k]: float(scales[k]) for k in (scales < 1).nonzero().flatten().tolist()},
        }
    }
    return clipped, record
