"""Poisoning in ``fedbip simulate``: every attack against every server defence, FedBip beside FedAvg.

For each setting (a learning rate and a seed) this runs six simulations — no attack, ``scaled`` and
``backdoor``, each without and with ``--clip-norm auto`` — of 6 clients in 3 conflicting task groups
(64 training sentences each, one attacker), 12 rounds, evaluated at the last, then tabulates, per
strategy, the honest clients', the attacker's group mate's and the attacker's attack success rate
(ASR), clean target rate and accuracy. ``--write-docs`` writes the tables into
``docs/threat-model.md``'s ``simulate-attacks`` section. With ``--methods`` the runs compare the methods
with client or server state of their own (FedOA, FedMerge, TAP, the universal expert: a scaled attacker
multiplies its update from what the server sent it, and ``--clip-norm`` bounds the sent states before the
method aggregates them) instead of FedBip and FedAvg, in their own work directory and section,
``simulate-attacks-methods``.

A run that was stopped is continued (``--resume``: the checkpoints of its last complete round), and
a finished one is read back, so the script can be run again after an interruption.

    .venv/bin/python benchmarks/attack_sim.py [--settings lr4,lr4-seed1[,default]] [--methods] [--jobs 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402

ROUNDS = 12
ATTACKS = ("none", "scaled", "backdoor")
DEFENCES = ("none", "auto")
STRATEGIES = ("fedbip", "fedavg")
METHODS = ("fedoa", "fedmerge", "tap", "universal-expert")
COMMON = [
    "--clients", "6", "--groups", "3", "--examples-per-client", "64", "--partition", "tasks", "--alpha", "1",
    "--rounds", str(ROUNDS), "--eval-every", str(ROUNDS), "--device", "cpu", "--json",
]  # fmt: skip


@dataclass(frozen=True)
class Setting:
    name: str
    lr: float | None  # None: the default learning rate
    seed: int
    title: str


SETTINGS = {
    s.name: s
    for s in (
        Setting("lr4", 0.004, 0, "`--lr 0.004`, `--seed 0`"),
        Setting("lr4-seed1", 0.004, 1, "`--lr 0.004`, `--seed 1` (another partition and attacker)"),
        Setting("default", None, 0, "the default learning rate (1e-3), `--seed 0`"),
    )
}


def command(setting: Setting, attack: str, defence: str, out: Path, strategies: tuple[str, ...]) -> list[str]:
    """The ``fedbip simulate`` command line of one run."""
    line = [str(Path(sys.executable).parent / "fedbip"), "simulate", "--compare", ",".join(strategies), *COMMON]
    line += ["--seed", str(setting.seed)]
    if setting.lr is not None:
        line += ["--lr", str(setting.lr)]
    if attack != "none":
        line += ["--attack", attack, "--attackers", "1"]
    if defence == "auto":
        line += ["--clip-norm", "auto"]
    return [*line, "--out", str(out), "--resume"]


def run(setting: Setting, attack: str, defence: str, work: Path, threads: int, strategies: tuple[str, ...]) -> Path:
    """One simulation, or the finished one already in ``work``; its output directory."""
    out = work / setting.name / f"{attack}-{defence}"
    if (out / "summary.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with (out.parent / f"{attack}-{defence}.log").open("w") as log:
        line = command(setting, attack, defence, out, strategies)
        done = subprocess.run(line, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{out}: fedbip simulate failed (exit {done.returncode}); see its .log")
    return out


def last_round(out: Path) -> tuple[list[dict], dict[str, int]]:
    """The evaluated rows of the last round and the clients' true groups."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] == ROUNDS and r["test_accuracy"] is not None]
    return rows, json.loads((out / "groups.json").read_text())


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


Runs = dict[tuple[str, str], tuple[list[dict], dict[str, int]]]  # (attack, defence): ``last_round`` of its run


def roles(setting: Setting, runs: Runs) -> tuple[str, list[str]]:
    """The setting's one attacker (the same in every attack run) and its group mates."""
    attackers = {r["client"] for a in ATTACKS[1:] for r in runs[a, "none"][0] if r.get("attacker")}
    if len(attackers) != 1:
        raise SystemExit(f"{setting.name}: expected one attacker across the runs, found {sorted(attackers)}")
    (attacker,) = attackers
    groups = runs["backdoor", "none"][1]
    return attacker, [c for c, g in groups.items() if g == groups[attacker] and c != attacker]


def parts(rows: list[dict], strategy: str, attacker: str, mates: list[str]) -> tuple[list[dict], ...]:
    """A strategy's rows of the honest clients, of the attacker's group mates and of the attacker."""
    mine = [r for r in rows if r["strategy"] == strategy]
    return (
        [r for r in mine if r["client"] != attacker],
        [r for r in mine if r["client"] in mates],
        [r for r in mine if r["client"] == attacker],
    )


def table(runs: Runs, attacker: str, mates: list[str], strategies: tuple[str, ...]) -> str:
    """The setting's markdown table."""
    lines = [
        "| attack | server defence | strategy | honest clients: ASR (clean rate) | honest accuracy "
        "| attacker's group mate: ASR (clean rate) | its accuracy | attacker: ASR (clean rate), accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack in ATTACKS:
        for defence in DEFENCES:
            shown = "`--clip-norm auto`" if defence == "auto" else "none"
            for strategy in strategies:
                honest, mate, bad = parts(runs[attack, defence][0], strategy, attacker, mates)
                if attack == "none":
                    cells = [
                        "–",
                        f"{mean(honest, 'test_accuracy'):.3f}",
                        "–",
                        f"{mean(mate, 'test_accuracy'):.3f}",
                        "–",
                    ]
                else:

                    def rates(rs: list[dict]) -> str:
                        return f"{mean(rs, 'attack_success_rate'):.3f} ({mean(rs, 'clean_target_rate'):.3f})"

                    cells = [
                        rates(honest),
                        f"{mean(honest, 'test_accuracy'):.3f}",
                        rates(mate),
                        f"{mean(mate, 'test_accuracy'):.3f}",
                        f"{rates(bad)}, {mean(bad, 'test_accuracy'):.3f}",
                    ]
                lines.append(f"| {attack} | {shown} | {strategy} | {' | '.join(cells)} |")
    return "\n".join(lines)


def lifts(runs: Runs, attacker: str, mates: list[str], strategies: tuple[str, ...]) -> str:
    """The findings in numbers: per strategy, the backdoor's lift (ASR − clean rate) on the honest
    clients and the group mate, and what the scaled attack costs the honest clients' accuracy,
    each without / with ``--clip-norm auto``."""
    lines = []
    for strategy in strategies:
        lift, cost = [], []
        for defence in DEFENCES:
            honest, mate, _ = parts(runs["backdoor", defence][0], strategy, attacker, mates)
            gap = [mean(rs, "attack_success_rate") - mean(rs, "clean_target_rate") for rs in (honest, mate)]
            lift.append(f"{gap[0]:+.2f} / {gap[1]:+.2f}")
            accuracy = {
                attack: mean(parts(runs[attack, defence][0], strategy, attacker, mates)[0], "test_accuracy")
                for attack in ("none", "scaled")
            }
            cost.append(f"{accuracy['scaled'] - accuracy['none']:+.3f}")
        lines.append(
            f"- {strategy}: the backdoor's lift (ASR − clean rate), honest clients / group mate: {lift[0]} "
            f"without clipping, {lift[1]} with; the scaled attack changes the honest clients' accuracy by "
            f"{cost[0]} without clipping, {cost[1]} with (each against the run without an attack)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="lr4,lr4-seed1", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--work", type=Path, help="default: benchmarks/.work/attacks (-methods)")
    parser.add_argument("--methods", action="store_true", help=f"compare {', '.join(METHODS)} instead")
    parser.add_argument("--jobs", type=int, default=1, help="simulations at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per simulation")
    parser.add_argument("--write-docs", action="store_true", help="write docs/threat-model.md's section")
    args = parser.parse_args()
    settings = [SETTINGS[name] for name in args.settings.split(",")]
    strategies = METHODS if args.methods else STRATEGIES
    work = args.work or ROOT / "benchmarks" / ".work" / ("attacks-methods" if args.methods else "attacks")
    note = load_note()
    tasks = [(s, a, d) for s in settings for a in ATTACKS for d in DEFENCES]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = dict(zip(tasks, pool.map(lambda t: run(*t, work, args.threads, strategies), tasks)))
    sections = []
    for setting in settings:
        mine = {(a, d): last_round(outs[setting, a, d]) for (s, a, d) in tasks if s == setting}
        attacker, mates = roles(setting, mine)
        who = f"the attacker is {attacker}, its group mate {', '.join(mates)}"
        sections.append(
            f"**{setting.title}**; {who}:\n\n{table(mine, attacker, mates, strategies)}\n\n"
            f"{lifts(mine, attacker, mates, strategies)}"
        )
        print(sections[-1], end="\n\n")
    if args.write_docs:
        head = (
            f"6 clients in 3 conflicting task groups, 64 training and 400 test sentences each, one attacker; "
            f"{ROUNDS} rounds × 4 local steps of batch 16, evaluated at round {ROUNDS}. Each row is one run of\n"
            f"`fedbip simulate --compare {','.join(strategies)} {' '.join(COMMON[:-1])} --seed S [--lr LR] "
            "[--attack A --attackers 1] "
            "[--clip-norm auto]`."
        )
        section = "simulate-attacks-methods" if args.methods else "simulate-attacks"
        write_generated(ROOT / "docs" / "threat-model.md", section, "\n\n".join([head, *sections]), note)


if __name__ == "__main__":
    main()
