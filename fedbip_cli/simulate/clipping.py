"""The server-step defence of ``fedbip simulate --clip-norm``: norm bounding of the round's updates.

The same bound as ``fedbip merge --clip-norm`` (``fedbip_cli.defence``): each participant's update
τ_k, or under a per-block plan each block's part of it, is scaled by c_k = min(1, bound / ‖τ_k‖),
where the bound is by default the median norm of the round's updates (FLAME's). Because the weight
rows multiply the updates linearly, that is exactly the column scaling P'_rk = P_rk c_k of the
strategy's rows (``defence.clipped_weights``), applied inside the one pure server step that every
engine calls. Only plans that merge task vectors can be clipped this way: FedAMP mixes whole models.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from fedbip_cli.defence import ClipNorm, clipped_weights
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
