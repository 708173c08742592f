"""Several seeds in one run: parse ``--seeds``, summarise each strategy as mean ± sd over seeds.

Every seed is a complete single-seed run in ``OUT/seed-<s>`` (its own partition, initial adapter,
batches, checkpoints and outputs), so that resuming works per seed and strategy. The aggregate keeps
the per-seed numbers beside the mean and the sample standard deviation (n − 1).
"""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table

from fedbip_cli.errors import UsageError

# The numbers summarised over seeds, as named in each seed's summary.json.
MEASURES = ("mean_accuracy", "worst_accuracy", "ari", "self_weight", "own_group_weight")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: distinct non-negative integers, in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UsageError(f"--seeds {text!r}: {part!r} is not a non-negative integer", hint="e.g. --seeds 0,1,2")
        if int(part) in seeds:
            raise UsageError(f"--seeds {text!r}: seed {part} is given twice")
        seeds.append(int(part))
    return seeds


def mean_sd(values: list[float]) -> dict[str, Any]:
    """``{"mean", "sd", "values"}``; sd is the sample standard deviation (None for one value)."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per strategy, each of ``MEASURES`` as ``mean_sd`` over the seeds (a measure a seed lacks,
    such as ARI without known groups, is left out)."""
    strategies = next(iter(per_seed.values()))["strategies"]
    result: dict[str, dict[str, Any]] = {}
    for name in strategies:
        entries = [summary["strategies"][name] for summary in per_seed.values()]
        result[name] = {
            measure: mean_sd([entry[measure] for entry in entries])
            for measure in MEASURES
            if all(entry.get(measure) is not None for entry in entries)
        }
        result[name]["seconds"] = {
            stage: sum(entry["seconds"][stage] for entry in entries) for stage in entries[0]["seconds"]
        }
        if all("cost" in entry for entry in entries):  # over all seeds' rounds, as the seconds are summed
            result[name]["rounds"] = sum(entry["rounds"] for entry in entries)
            result[name]["cost"] = pooled_cost([entry["cost"] for entry in entries])
    return result


def pooled_cost(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' ``cost`` (``runner.cost_summary``) as one: client-rounds added, bytes per
    client-round averaged over all of them."""
    rounds = sum(cost["client_rounds"] for cost in costs)
    pooled: dict[str, Any] = {"client_rounds": rounds}
    for key in ("uplink_bytes_per_client_round", "downlink_bytes_per_client_round"):
        pooled[key] = sum(cost[key] * cost["client_rounds"] for cost in costs) / rounds if rounds else 0.0
    return pooled


# The columns ``cost_cells`` fills: a client's local training and the server step per round, and the
# kB a client sends and receives in a round.
COST_COLUMNS = ("client s/round", "server s/round", "kB up/down")


def cost_cells(entry: dict[str, Any]) -> tuple[str, str, str]:
    """A summary entry's cost per round (its ``seconds`` over its client-rounds and rounds, its traffic)."""
    cost, seconds = entry.get("cost"), entry["seconds"]
    if cost is None or not cost["client_rounds"] or not entry.get("rounds"):
        return ("n/a", "n/a", "n/a")
    up, down = cost["uplink_bytes_per_client_round"] / 1e3, cost["downlink_bytes_per_client_round"] / 1e3
    return (
        f"{seconds['train'] / cost['client_rounds']:.2f}",
        f"{seconds['server'] / entry['rounds']:.3f}",
        f"{up:.0f}/{down:.0f}",
    )


def _cell(stat: dict[str, Any] | None, digits: int) -> str:
    if stat is None:
        return "n/a"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def seeds_table(summary: dict[str, Any], title: str) -> Table:
    """One row per strategy: final mean accuracy, worst client and ARI as mean ± sd over seeds."""
    seeds = summary["seeds"]
    table = Table(
        title=title,
        caption=f"mean ± sd over seeds {', '.join(map(str, seeds))}; accuracy: each client's personalized model "
        "on its own test split, at the last round",
    )
    for column in ("strategy", "mean acc", "worst client", "ARI", "train s", *COST_COLUMNS):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, entry in summary["strategies"].items():
        table.add_row(
            name,
            _cell(entry.get("mean_accuracy"), 4),
            _cell(entry.get("worst_accuracy"), 4),
            _cell(entry.get("ari"), 2),
            f"{entry['seconds']['train']:.0f}",
            *cost_cells(entry),
        )
    return table
