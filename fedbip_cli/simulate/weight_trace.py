"""Where each client's weight goes: its self-weight and the weight mass on its own true task group.

The separation records (``separation``) say whether the similarity *could* tell the groups apart;
these records say whether the weights *do*: for every receiver i of a round's plan, per group of
parameters (the whole model, or one block and the head under FedBip-L),

- ``self``: P_ii, the weight of its own update;
- ``own_group``: Σ_{j ∈ g(i)} P_ij, the mass on the participants of its own true group (itself
  included). Weights that ignore the groups put |g(i)| / K there (K participants); the oracle 1.

The true groups are known only to the simulation; the strategies never see them.
"""

from __future__ import annotations

import statistics
from typing import Any

from fedbip_cli.simulate.figures import Curves
from fedbip_cli.simulate.strategies import Plan
from fedbip_cli.taskvec import in_block


def weight_trace(plan: Plan, participants: list[str], groups: dict[str, int | None]) -> dict[str, Any] | None:
    """The round's record: the receivers that took part, the uniform reference |g(i)| / K of each,
    and per plan group their ``self`` and ``own_group`` weights. None when the true groups are
    unknown, or when the plan's columns are not the participants (a method whose rows weigh
    something else, such as FedMerge's global models)."""
    if any(groups.get(c) is None for c in participants):
        return None
    if any(rows.shape[1] != len(participants) for rows in plan.rows.values()):
        return None
    column = {client: k for k, client in enumerate(participants)}
    receivers = [(r, client) for r, client in enumerate(plan.receivers) if client in column]
    mates = {client: [column[j] for j in participants if groups[j] == groups[client]] for _, client in receivers}
    record: dict[str, Any] = {
        "clients": [client for _, client in receivers],
        "uniform_own_group": [len(mates[client]) / len(participants) for _, client in receivers],
        "groups": {},
    }
    for name, rows in plan.rows.items():
        record["groups"][name] = {
            "self": [float(rows[r, column[client]]) for r, client in receivers],
            "own_group": [float(rows[r, mates[client]].sum()) for r, client in receivers],
        }
    return record


def weight_summary(record: dict[str, Any] | None) -> dict[str, Any]:
    """``summary.json``'s fields from the final round's record: ``self_weight`` and
    ``own_group_weight``, the means over receivers and plan groups, ``uniform_own_group`` (what
    weights blind to the groups would give), and the same two means per plan group. Empty without
    a record."""
    if not record or not record["clients"]:
        return {}
    by_group = {
        name: {
            "self_weight": statistics.fmean(values["self"]),
            "own_group_weight": statistics.fmean(values["own_group"]),
        }
        for name, values in record["groups"].items()
    }
    return {
        "self_weight": statistics.fmean(g["self_weight"] for g in by_group.values()),
        "own_group_weight": statistics.fmean(g["own_group_weight"] for g in by_group.values()),
        "uniform_own_group": statistics.fmean(record["uniform_own_group"]),
        "weights_by_group": by_group,
    }


def _curve_means(record: dict[str, Any], field: str) -> dict[str, float]:
    """One round's means over receivers of ``field`` (``self`` or ``own_group``): over every plan
    group (key ""), and, when the plan has groups per block, over the blocks and over the rest (the head)."""
    means = {name: statistics.fmean(values[field]) for name, values in record["groups"].items()}
    result = {"": statistics.fmean(means.values())}
    if len(means) > 1:
        blocks = [m for name, m in means.items() if in_block(name)]
        rest = [m for name, m in means.items() if not in_block(name)]
        if blocks:
            result[" blocks"] = statistics.fmean(blocks)
        if rest:
            result[" head"] = statistics.fmean(rest)
    return result


def weight_curves(rows_per_seed: list[list[dict[str, Any]]]) -> tuple[Curves, Curves, float | None]:
    """From each seed's ``similarity.jsonl`` rows: the self-weight and own-group-weight curves, one
    {round: mean} per seed under "<strategy>" (and "<strategy> blocks" / "<strategy> head" for
    FedBip-L), and the mean uniform reference |g| / K (None without any trace)."""
    self_curves: Curves = {}
    own_curves: Curves = {}
    uniform: list[float] = []
    for seed_index, rows in enumerate(rows_per_seed):
        for row in rows:
            record = row.get("weights")
            if not record or not record["clients"]:
                continue
            uniform.append(statistics.fmean(record["uniform_own_group"]))
            for curves, field in ((self_curves, "self"), (own_curves, "own_group")):
                for suffix, value in _curve_means(record, field).items():
                    per_seed = curves.setdefault(row["strategy"] + suffix, [])
                    while len(per_seed) <= seed_index:
                        per_seed.append({})
                    per_seed[seed_index][row["round"]] = value
    return self_curves, own_curves, statistics.fmean(uniform) if uniform else None
