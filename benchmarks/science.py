"""The scientific check of ``fedbip simulate``: tables of a multi-seed ``--compare`` run, paired
comparisons, the Figure 3 separation check, and the docs' generated sections that show them.

    .venv/bin/python benchmarks/science.py RUN [--pairs fedbip:local,...] [--write-docs REGIME]

Reads RUN/seed-*/summary.json (so it also reports a run whose last seed has not finished) and prints

1. per strategy, the mean ± sample standard deviation over seeds of the final mean personalized
   accuracy, of the worst client's accuracy, and of the ARI of the suggested clusters against the
   true task groups, with the training time;
2. for each pair A:B, the per-seed difference of final mean accuracy A − B (the seeds share data,
   initial adapters and batches, so differences are paired), its mean ± sd, and a verdict: A beats
   B "beyond the seed spread" when A is ahead in every seed and the mean difference exceeds its sd;
3. the paper's Figure 3 check for the first strategy's run: per kind of vector and round, the
   within- minus between-group mean cosine and the ARI of the suggested clusters, mean over seeds.

With ``--write-docs REGIME`` (``shift``, the task-shift default; ``limited``, ``ample`` or
``methods``, the related methods beside FedBip, in the label-skew regime) the tables go into the generated section ``simulate-REGIME`` of docs/simulate.md (1, 2, 3
and the verdicts of FedBip and FedBip-L against every other strategy) and, where the README has
that section, of README.md (1 and the verdicts); RUN's ``accuracy.png`` and ``separation.png`` (the
±sd bands over seeds) are copied to ``docs/accuracy-REGIME.png`` and ``docs/separation-REGIME.png``.
With ``--precondition RUN...``, each RUN a ``--compare local,oracle`` run of one regime and N, the
table says per regime and N whether the oracle beats local training beyond the seed spread (where
it does not, no sharing method can win) and goes into docs/simulate.md's ``precondition`` section.
In the tables, a strategy with weights also shows its final self-weight and own-group weight
(``simulate.weight_trace``), and the ``shift`` section says how much of the oracle's gain over local
training each FedBip recovers. With ``--default``, RUN is the
default run (``fedbip simulate --out RUN``) and its time and accuracy go into docs/simulate.md.
With ``--selection SELECTING``, SELECTING is a ``--select-on-validation`` run of the seeds of RUN: each
of its strategies against the same strategy without selection and against local training in RUN, with
the verdict "keeps the best of both" (neither beats it) or "beats both"; ``--write-docs`` puts it into
docs/simulate.md's ``selection`` section.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, write_generated  # noqa: E402

DEFAULT_PAIRS = ",".join(
    f"{a}:{b}"
    for a in ("fedbip", "fedbip-layerwise", "fedbip-ema", "fedbip-layerwise-ema")
    for b in ("local", "fedavg", "fedamp", "uniform", "oracle", "fedmerge", "tap", "fedoa", "universal-expert")
)


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± sd`` (sample sd), or the one value, or n/a."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "n/a"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load(run: Path) -> dict[int, dict[str, Any]]:
    """Each finished seed's summary.json, by seed, in seed order."""
    paths = sorted(run.glob("seed-*/summary.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    seeds = {int(p.parent.name.split("-")[1]): json.loads(p.read_text()) for p in paths}
    if not seeds:
        raise SystemExit(f"{run}: no seed-*/summary.json yet")
    return seeds


def regime(config: dict[str, Any]) -> str:
    """The partition as the command line gives it: ``--partition P --alpha A`` (A the value used,
    the partition's default when the run gave none)."""
    from fedbip_cli.simulate.loop import config_from_dict

    alpha = config_from_dict(config).alpha_value()
    return f"--partition {config.get('partition', 'tasks')} --alpha {'inf' if math.isinf(alpha) else f'{alpha:g}'}"


def describe(seeds: dict[int, dict[str, Any]]) -> str:
    config = next(iter(seeds.values()))["config"]
    return (
        f"`{regime(config)}`: {config['clients']} clients in {config['groups']} task groups, "
        f"{config['examples_per_client']} train sentences per client, {config['rounds']} rounds of "
        f"{config['local_steps']} local steps (batch {config['batch_size']}); seeds {', '.join(map(str, seeds))}"
    )


def prior_accuracy(summary: dict[str, Any]) -> tuple[float, float]:
    """Mean and worst client accuracy of predicting each client's most frequent training label,
    with no model at all, on the run's own partition (rebuilt from its summary's config)."""
    from fedbip_cli.simulate.loop import config_from_dict, load_clients

    clients, _ = load_clients(config_from_dict(summary["config"]))
    scores = []
    for client in clients:
        majority = max(set(client.train_labels), key=lambda label: (client.train_labels.count(label), -label))
        scores.append(sum(label == majority for label in client.test_labels) / len(client.test_labels))
    return statistics.fmean(scores), min(scores)


def pooled_cost_cells(entries: list[dict[str, Any]]) -> tuple[str, str, str]:
    """A strategy's cost per round over all its seeds (``seeds.cost_cells`` of the pooled runs)."""
    from fedbip_cli.simulate.seeds import cost_cells, pooled_cost

    if any(e.get("cost") is None for e in entries):
        return ("n/a", "n/a", "n/a")
    pooled = {
        "cost": pooled_cost([e["cost"] for e in entries]),
        "seconds": {key: sum(e["seconds"][key] for e in entries) for key in ("train", "server")},
        "rounds": sum(e["rounds"] for e in entries),
    }
    return cost_cells(pooled)


def strategy_table(seeds: dict[int, dict[str, Any]]) -> str:
    """Markdown: per strategy, final mean and worst-client accuracy and ARI (mean ± sd), train time,
    and, when the runs recorded it, the cost of a round (pooled over seeds); then the accuracy of
    each client's majority training label, the label prior alone."""
    from fedbip_cli.simulate.seeds import COST_COLUMNS

    strategies = list(next(iter(seeds.values()))["strategies"])
    priors = [prior_accuracy(summary) for summary in seeds.values()]
    costed = any("cost" in s["strategies"][name] for s in seeds.values() for name in strategies)
    extra = [f" {column} |" for column in COST_COLUMNS] if costed else []
    traced = any("own_group_weight" in s["strategies"][name] for s in seeds.values() for name in strategies)
    extra += [" self-weight |", " own-group weight |"] if traced else []
    lines = [
        "| strategy | mean accuracy | worst client | ARI | train s per seed |" + "".join(extra),
        "|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for name in strategies:
        entries = [s["strategies"][name] for s in seeds.values()]
        ari = [e["ari"] for e in entries if e.get("ari") is not None]
        train = statistics.fmean(e["seconds"]["train"] for e in entries)
        cost = "".join(f" {cell} |" for cell in pooled_cost_cells(entries)) if costed else ""
        if traced:
            cost += "".join(
                f" {spread([e[key] for e in entries if key in e], 2)} |" for key in ("self_weight", "own_group_weight")
            )
        lines.append(
            f"| {name} | {spread([e['mean_accuracy'] for e in entries])} | "
            f"{spread([e['worst_accuracy'] for e in entries])} | {spread(ari, 2)} | {train:.0f} |{cost}"
        )
    lines.append(
        f"| *own majority label, no model* | {spread([p[0] for p in priors])} | {spread([p[1] for p in priors])} "
        "| | 0 |" + " |" * len(extra)
    )
    if traced:
        uniform = [
            s["strategies"][name]["uniform_own_group"]
            for s in seeds.values()
            for name in strategies
            if "uniform_own_group" in s["strategies"][name]
        ]
        lines.append(
            f"\nSelf-weight P_ii and own-group weight Σ_(j in g(i)) P_ij: the final round's mean over clients "
            f"(and over blocks and head for FedBip-L); weights blind to the groups put {statistics.fmean(uniform):.2f} "
            "(|g|/K) on the own group, the oracle 1."
        )
    return "\n".join(lines)


def paired(seeds: dict[int, dict[str, Any]], a: str, b: str) -> list[float]:
    """Per seed, A's final mean accuracy minus B's (the seeds share data, so the pairs match)."""
    return [s["strategies"][a]["mean_accuracy"] - s["strategies"][b]["mean_accuracy"] for s in seeds.values()]


def outcome(diffs: list[float]) -> str:
    """Whether A ``beats`` B beyond the seed spread, ``trails`` it, or ``ties with`` it (see the
    module's docstring)."""
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("inf")
    if all(d > 0 for d in diffs) and mean > sd:
        return "beats"
    if all(d < 0 for d in diffs) and -mean > sd:
        return "trails"
    return "ties with"


# How the pairs table says each outcome.
VERDICT = {"beats": "**yes**", "trails": "no: B beats A", "ties with": "no: within the spread"}


def pairs_table(seeds: dict[int, dict[str, Any]], pairs: str) -> str:
    """Markdown: per pair A:B present in the run, the paired differences of final mean accuracy."""
    strategies = list(next(iter(seeds.values()))["strategies"])
    lines = [
        "| A − B (final mean accuracy) | per seed | mean ± sd | A beats B beyond the seed spread? |",
        "|---|---|---|---|",
    ]
    for pair in pairs.split(","):
        a, b = pair.split(":")
        if a not in strategies or b not in strategies:
            continue
        diffs = paired(seeds, a, b)
        sd = f"{statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "n/a"
        lines.append(
            f"| {a} − {b} | {', '.join(f'{d:+.3f}' for d in diffs)} | {statistics.fmean(diffs):+.3f} ± {sd} "
            f"| {VERDICT[outcome(diffs)]} |"
        )
    return "\n".join(lines)


def verdicts(
    seeds: dict[int, dict[str, Any]], subjects: tuple[str, ...] = ("fedbip", "fedbip-layerwise", "fedbip-layerwise-ema")
) -> str:
    """Markdown bullets: for each subject, the strategies it beats beyond the seed spread, ties with
    and trails (``outcome`` of the paired differences of final mean accuracy), with the mean difference."""
    strategies = list(next(iter(seeds.values()))["strategies"])
    lines = []
    for a in (name for name in subjects if name in strategies):
        found: dict[str, list[str]] = {"beats": [], "ties with": [], "trails": []}
        for b in (name for name in strategies if name != a):
            diffs = paired(seeds, a, b)
            found[outcome(diffs)].append(f"{b} ({statistics.fmean(diffs):+.3f})")
        said = "; ".join(f"{key} {', '.join(names)}" for key, names in found.items() if names)
        lines.append(f"- **{a}** {said}.")
    return "\n".join(lines)


def oracle_share(seeds: dict[int, dict[str, Any]], subjects: tuple[str, ...]) -> str:
    """Markdown bullets: how much of the oracle's gain over local training each subject recovers,
    mean(A − local) / mean(oracle − local) over the seeds; empty without both references."""
    strategies = list(next(iter(seeds.values()))["strategies"])
    if "oracle" not in strategies or "local" not in strategies:
        return ""
    gain = statistics.fmean(paired(seeds, "oracle", "local"))
    lines = []
    for a in (name for name in subjects if name in strategies):
        own = statistics.fmean(paired(seeds, a, "local"))
        share = f"{own / gain:.0%} of it" if gain > 0 else "n/a: the oracle does not gain"
        lines.append(f"- **{a}** − local: {own:+.3f}, against the oracle's {gain:+.3f}: {share}.")
    return "\n".join(lines)


def precondition_table(runs: list[Path]) -> str:
    """Markdown: per regime and N (each RUN a --seeds run with local and oracle, and FedBip-L where
    it ran), the paired per-seed oracle − local differences and whether the oracle wins beyond the
    seed spread: a regime where it does not leaves nothing for any sharing method to win."""
    lines = [
        "| regime | N | local | oracle | oracle − local per seed | mean ± sd | can sharing pay? | fedbip-layerwise − local |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keyed = []
    for run in runs:
        seeds = load(run)
        config = next(iter(seeds.values()))["config"]
        keyed.append(((regime(config), config["examples_per_client"] or 0), seeds))
    for (name, n), seeds in sorted(keyed, key=lambda item: item[0]):
        diffs = paired(seeds, "oracle", "local")
        scores = {k: spread([s["strategies"][k]["mean_accuracy"] for s in seeds.values()]) for k in ("local", "oracle")}
        if len(diffs) < 2:  # a spread needs two seeds
            verdict = f"not decided: {len(diffs)} seed"
        else:
            verdict = "**yes**" if outcome(diffs) == "beats" else "no: no method can win here"
        strategies = next(iter(seeds.values()))["strategies"]
        layerwise = spread(paired(seeds, "fedbip-layerwise", "local")) if "fedbip-layerwise" in strategies else ""
        lines.append(
            f"| `{name}` | {n} | {scores['local']} | {scores['oracle']} | {', '.join(f'{d:+.3f}' for d in diffs)} | "
            f"{spread(diffs)} | {verdict} | {layerwise} |"
        )
    return "\n".join(lines)


def selection_table(reference: Path, selecting: Path) -> str:
    """Markdown: each strategy of the ``--select-on-validation`` run ``selecting`` beside the same
    strategy without selection and local training in ``reference`` (the seeds both have), the paired
    differences, the final λ (the merge's share in the kept model) and the verdict."""
    plain, chosen = load(reference), load(selecting)
    common = [seed for seed in plain if seed in chosen]
    lines = [
        "| strategy | with selection | without | local | − without, per seed | − local, per seed | final λ | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in chosen[common[0]]["strategies"]:
        mine = [chosen[s]["strategies"][name]["mean_accuracy"] for s in common]
        without = [plain[s]["strategies"][name]["mean_accuracy"] for s in common]
        local = [plain[s]["strategies"]["local"]["mean_accuracy"] for s in common]
        weight = [chosen[s]["strategies"][name]["selected_weight"] for s in common]
        against = {b: [m - o for m, o in zip(mine, other)] for b, other in (("without", without), ("local", local))}
        results = {b: outcome(d) for b, d in against.items()}
        if all(r == "beats" for r in results.values()):
            verdict = "**beats both**"
        elif all(r != "trails" for r in results.values()):
            verdict = "keeps the best of both"
        else:
            who = {"without": f"{name} without selection", "local": "local training"}
            beaten_by = [who[b] for b, r in results.items() if r == "trails"]
            verdict = f"no: {' and '.join(beaten_by)} {'beat' if len(beaten_by) > 1 else 'beats'} it"
        cells = [" ".join(f"{d:+.3f}" for d in against[b]) + f" ({statistics.fmean(against[b]):+.3f})" for b in against]
        lines.append(
            f"| {name} | {spread(mine)} | {spread(without)} | {spread(local)} | {cells[0]} | {cells[1]} | "
            f"{spread(weight, 2)} | {verdict} |"
        )
    config = chosen[common[0]]["config"]
    lines.append(
        f"\nSeeds {', '.join(map(str, common))}; each selecting client held out {config['select_on_validation']:g} of "
        "its training sentences; final λ: the merge's share in the model each client kept at the last round "
        "(0: its own trained model, 1: the merge), mean over clients, mean ± sd over seeds. *Verdicts*: the "
        "rule of the check (beats: ahead in every seed and by more than the differences' sd)."
    )
    return "\n".join(lines)


def separation_table(run: Path, seeds: list[int], strategy: str) -> str:
    """Markdown: gap and ARI per kind of vector and round, mean over seeds, for ``strategy``'s run."""
    by_key: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in seeds:
        for line in (run / f"seed-{seed}" / "similarity.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["strategy"] == strategy and row.get("separation"):
                for kind, value in row["separation"].items():
                    by_key.setdefault((kind, row["round"]), []).append((value["gap"], value["ari"]))
    if not by_key:
        return ""
    every = sorted({r for _, r in by_key})
    rounds = sorted({every[0], *every[:: max(1, len(every) // 5)], every[-1]})
    kinds = list(dict.fromkeys(kind for kind, _ in by_key))
    lines = [
        f"Separation of the true groups in the {strategy} runs: within- minus between-group mean cosine / "
        "ARI of the suggested clusters, mean over seeds",
        "",
        "| vectors compared | " + " | ".join(f"round {r}" for r in rounds) + " |",
        "|---|" + "---|" * len(rounds),
    ]
    for kind in kinds:
        cells = []
        for r in rounds:
            values = by_key.get((kind, r), [])
            gaps = [g for g, _ in values if g is not None]
            cells.append(
                f"{statistics.fmean(gaps):+.3f} / {statistics.fmean(a for _, a in values):.2f}" if gaps else "n/a"
            )
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_run(run: Path) -> str:
    """Markdown: what the default run (``fedbip simulate --out RUN``, nothing else given) cost and
    scored, from its summary.json."""
    summary = json.loads((run / "summary.json").read_text())
    config = summary["config"]
    (name, entry), *_ = summary["strategies"].items()
    seconds = entry["seconds"]
    return (
        f"`fedbip simulate` with every default ({name}, {config['clients']} clients, {config['rounds']} rounds, "
        f"{config['examples_per_client']} train sentences each, seed {config['seed']}): "
        f"{sum(seconds.values()):.0f} s of training, evaluation and server steps "
        f"(train {seconds['train']:.0f} s, eval {seconds['eval']:.0f} s, server {seconds['server']:.1f} s), "
        f"final mean personalized accuracy {entry['mean_accuracy']:.3f}, worst client {entry['worst_accuracy']:.3f}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, nargs="+", help="the --out of a --seeds run (several with --precondition), or the default run"
    )
    parser.add_argument(
        "--precondition",
        action="store_true",
        help="RUNs are local/oracle runs per regime and N: the precondition table",
    )
    parser.add_argument("--default", action="store_true", help="RUN is the default run: write its cost into the docs")
    parser.add_argument(
        "--selection", type=Path, metavar="SELECTING", help="a --select-on-validation run of RUN's seeds: its table"
    )
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated A:B strategy pairs")
    parser.add_argument(
        "--write-docs", choices=("shift", "limited", "ample", "methods"), help="write the docs' sections of this regime"
    )
    args = parser.parse_args()
    if args.precondition:
        text = precondition_table(args.run)
        print(text)
        if args.write_docs:
            write_generated(ROOT / "docs" / "simulate.md", "precondition", text)
        return
    args.run = args.run[0]
    if args.selection:
        text = selection_table(args.run, args.selection)
        print(text)
        if args.write_docs:
            write_generated(ROOT / "docs" / "simulate.md", "selection", text)
        return
    if args.default:
        text = default_run(args.run)
        print(text)
        write_generated(ROOT / "docs" / "simulate.md", "default-run", text)
        return
    seeds = load(args.run)
    strategies = list(next(iter(seeds.values()))["strategies"])
    head = describe(seeds)
    table, pairs = strategy_table(seeds), pairs_table(seeds, args.pairs)
    separation = separation_table(args.run, list(seeds), strategies[0])
    print(f"{head}\n\n{table}\n\n{pairs}\n\n{separation}")
    if args.write_docs:
        regime = args.write_docs
        for name in ("accuracy", "separation", "weights"):
            if (args.run / f"{name}.png").exists():
                shutil.copyfile(args.run / f"{name}.png", ROOT / "docs" / f"{name}-{regime}.png")
        said = (
            f"{head}.\n\n{table}\n\nVerdicts on final mean accuracy (the mean of the per-seed differences; "
            f"*beats* or *trails*: in every seed and by more than the differences' sd; else *ties with*):"
            f"\n\n{verdicts(seeds)}"
        )
        share = oracle_share(seeds, ("fedbip", "fedbip-layerwise", "fedbip-layerwise-ema"))
        if share:
            said += f"\n\nThe oracle's gain over local training, and how much of it each FedBip recovers:\n\n{share}"
        readme = ROOT / "README.md"
        if f"<!-- generated: simulate-{regime} -->" in readme.read_text(encoding="utf-8"):
            write_generated(readme, f"simulate-{regime}", said)  # the regimes the README shows
        page = f"{said}\n\n{pairs}\n\n{separation}"
        write_generated(ROOT / "docs" / "simulate.md", f"simulate-{regime}", page)


if __name__ == "__main__":
    main()
