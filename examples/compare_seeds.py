"""Markdown tables of a multi-seed `fedbip simulate --seeds ...` run, and paired comparisons.

    python examples/compare_seeds.py runs/limited [--pairs fedbip:local,fedbip:fedavg,...]

Reads RUN/seed-*/summary.json (so it also reports a run whose last seed has not finished) and prints

1. per strategy, the mean ± sample standard deviation over seeds of the final mean personalized
   accuracy, of the worst client's accuracy, and of the ARI of the suggested clusters against the
   true task groups;
2. for each pair A:B, the per-seed difference of final mean accuracy A − B (the seeds share data,
   initial adapters and batches, so differences are paired), its mean ± sd, and a verdict: A beats
   B "beyond the seed spread" when A is ahead in every seed and the mean difference exceeds its sd;
3. the paper's Figure 3 check for the first strategy's run: per kind of vector and round, the
   within- minus between-group mean cosine and the ARI of the suggested clusters, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DEFAULT_PAIRS = ",".join(
    f"{a}:{b}" for a in ("fedbip", "fedbip-layerwise") for b in ("local", "fedavg", "fedamp", "uniform")
)


def spread(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "n/a"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the --out of a --seeds run")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated A:B strategy pairs")
    args = parser.parse_args()
    paths = sorted(args.run.glob("seed-*/summary.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    seeds = {int(p.parent.name.split("-")[1]): json.loads(p.read_text()) for p in paths}
    if not seeds:
        raise SystemExit(f"{args.run}: no seed-*/summary.json yet")
    first = next(iter(seeds.values()))
    strategies = list(first["strategies"])
    config = first["config"]
    print(
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {config['clients']} clients, "
        f"{config['examples_per_client']} train examples per client, {config['rounds']} rounds\n"
    )
    print("| strategy | mean accuracy | worst client | ARI |")
    print("|---|---|---|---|")
    for name in strategies:
        entries = [s["strategies"][name] for s in seeds.values()]
        ari = [e["ari"] for e in entries if e.get("ari") is not None]
        print(
            f"| {name} | {spread([e['mean_accuracy'] for e in entries])} | "
            f"{spread([e['worst_accuracy'] for e in entries])} | {spread(ari, 2)} |"
        )
    print("\n| A − B (final mean accuracy) | per seed | mean ± sd | A beats B beyond the seed spread? |")
    print("|---|---|---|---|")
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        if a not in strategies or b not in strategies:
            continue
        diffs = [s["strategies"][a]["mean_accuracy"] - s["strategies"][b]["mean_accuracy"] for s in seeds.values()]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        mean = statistics.fmean(diffs)
        if all(d > 0 for d in diffs) and mean > sd:
            verdict = "yes"
        elif all(d < 0 for d in diffs) and -mean > sd:
            verdict = "no: B beats A"
        else:
            verdict = "no: within the spread"
        print(f"| {a} − {b} | {', '.join(f'{d:+.3f}' for d in diffs)} | {mean:+.3f} ± {sd:.3f} | {verdict} |")
    separation_table(args.run, list(seeds), strategies[0])


def separation_table(run: Path, seeds: list[int], strategy: str) -> None:
    """Gap and ARI per kind of vector and round, mean over seeds, for ``strategy``'s run."""
    by_key: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in seeds:
        for line in (run / f"seed-{seed}" / "similarity.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["strategy"] == strategy and row.get("separation"):
                for kind, value in row["separation"].items():
                    by_key.setdefault((kind, row["round"]), []).append((value["gap"], value["ari"]))
    if not by_key:
        return
    rounds = sorted({r for _, r in by_key})
    kinds = list(dict.fromkeys(kind for kind, _ in by_key))
    print(f"\nseparation of the true groups in the {strategy} runs (gap / ARI, mean over seeds)\n")
    print("| vectors compared | " + " | ".join(f"round {r}" for r in rounds) + " |")
    print("|---|" + "---|" * len(rounds))
    for kind in kinds:
        cells = []
        for r in rounds:
            values = by_key.get((kind, r), [])
            gaps = [g for g, _ in values if g is not None]
            cells.append(
                f"{statistics.fmean(gaps):+.3f} / {statistics.fmean(a for _, a in values):.2f}" if gaps else "n/a"
            )
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
