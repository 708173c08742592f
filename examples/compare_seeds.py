"""Aggregate `fedbip simulate --compare ...` runs over seeds: a markdown table and one plot.

    python examples/compare_seeds.py runs/seed0 runs/seed1 runs/seed2 --plot accuracy.png

The table gives, per strategy, the mean ± standard deviation over seeds of the final mean
personalized accuracy, of the worst client's accuracy, and of the adjusted Rand index between the
suggested clusters and the true task groups; the plot shows the mean accuracy per round averaged
over seeds (shaded: min..max over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def curves(run: Path) -> dict[str, dict[int, float]]:
    """Mean accuracy over clients per evaluated round, per strategy, from metrics.jsonl."""
    sums: dict[str, dict[int, list[float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["test_accuracy"] is not None:
            sums.setdefault(row["strategy"], {}).setdefault(row["round"], []).append(row["test_accuracy"])
    return {s: {r: statistics.fmean(v) for r, v in rounds.items()} for s, rounds in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    summaries = [json.loads((run / "summary.json").read_text()) for run in args.runs]
    strategies = list(summaries[0]["strategies"])
    print("| strategy | mean accuracy | worst client | ARI | seeds |")
    print("|---|---|---|---|---|")
    for name in strategies:
        entries = [s["strategies"][name] for s in summaries if name in s["strategies"]]
        ari = [e["ari"] for e in entries if e.get("ari") is not None]
        print(
            f"| {name} | {spread([e['mean_accuracy'] for e in entries])} | "
            f"{spread([e['worst_accuracy'] for e in entries])} | {spread(ari) if ari else 'n/a'} | {len(entries)} |"
        )
    if args.plot:
        per_run = [curves(run) for run in args.runs]
        figure = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
        axis = figure.subplots()
        for name in strategies:
            rounds = sorted(per_run[0][name])
            values = [[c[name][r] for c in per_run] for r in rounds]
            axis.plot(rounds, [statistics.fmean(v) for v in values], marker="o", markersize=3, label=name)
            axis.fill_between(rounds, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        axis.set_xlabel("round")
        axis.set_ylabel("mean personalized test accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.suptitle(f"fedbip simulate, tasks partition, {len(args.runs)} seeds")
        figure.savefig(args.plot, dpi=120, metadata={"Software": None})


if __name__ == "__main__":
    main()
