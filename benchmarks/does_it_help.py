"""docs/does-it-help.md's worked example, run as the page shows it: simulate → merge --sweep → evaluate.

Runs, in a work directory (``--work``, kept so that a second run reuses the finished simulation):

    fedbip simulate --strategy local --clients 6 --groups 2 --rounds 10 --eval-every 10 --out run --export-data data
    fedbip merge run/adapters --base run/base --out merged --sweep top-k=2,3,6
    fedbip evaluate --own run/adapters merged/*/ --data data/test --base run/base --json
    fedbip evaluate ... --fail-if-worse 0.02 --pick picked

and tabulates, per client, its own adapter's accuracy and each merge's accuracy, difference with the
95% paired-bootstrap interval and verdict, and the adapter ``--pick`` chose; says whether the own
accuracies are simulate's own (``summary.json``) and what the gate did. ``--write-docs`` writes the
page's ``does-it-help`` section.

    .venv/bin/python benchmarks/does_it_help.py [--work DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402

SWEEP = "top-k=2,3,6"
MARGIN = "0.02"


def fedbip(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "fedbip"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise SystemExit(f"fedbip {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "does-it-help")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    note = load_note()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "run" / "summary.json").is_file():
        for name in ("run", "data"):
            shutil.rmtree(work / name, ignore_errors=True)
        simulate = ["--strategy", "local", "--clients", "6", "--groups", "2", "--rounds", "10", "--eval-every", "10"]
        fedbip(work, "simulate", *simulate, "--out", "run", "--export-data", "data", "--device", "cpu")
    for name in ("merged", "picked"):
        shutil.rmtree(work / name, ignore_errors=True)
    fedbip(work, "merge", "run/adapters", "--base", "run/base", "--out", "merged", "--sweep", SWEEP)
    candidates = sorted(str(p.relative_to(work)) for p in (work / "merged").iterdir() if p.is_dir())
    evaluate = ["evaluate", "--own", "run/adapters", *candidates, "--data", "data/test", "--base", "run/base"]
    result = json.loads(fedbip(work, *evaluate, "--device", "cpu", "--json").stdout)
    gate = fedbip(work, *evaluate, "--device", "cpu", "--fail-if-worse", MARGIN, "--pick", "picked", check=False)
    picks = json.loads((work / "picked" / "fedbip-pick.json").read_text())
    summary = json.loads((work / "run" / "summary.json").read_text())
    config = summary["config"]

    names = [c.split("/")[-1] for c in candidates]
    lines = [
        "| client | own | "
        + " | ".join(f"`{n}`: accuracy, diff [95% interval], verdict" for n in names)
        + " | picked |",
        "|---|---:|" + "---|" * len(names) + "---|",
    ]
    for client in result["clients"]:
        cells = [client["client"], f"{client['own']['accuracy']:.4f}"]
        for entry in client["candidates"]:
            low, high = entry["interval"]
            cells.append(
                f"{entry['accuracy']:.4f}, {entry['difference']:+.4f} [{low:+.4f}, {high:+.4f}], {entry['verdict']}"
            )
        chosen = picks["picked"][client["client"]]
        assert chosen == client["best"], (chosen, client["best"])  # --pick copied the best-scoring adapter
        cells.append("own" if chosen == "own" else f"`{chosen.rstrip('/').split('/')[-1]}`")
        lines.append("| " + " | ".join(cells) + " |")
    own = {c["client"]: c["own"]["accuracy"] for c in result["clients"]}
    same = all(abs(own[c] - a) < 1e-12 for c, a in summary["strategies"]["local"]["accuracy"].items())
    verdicts = [e["verdict"] for c in result["clients"] for e in c["candidates"]]
    head = (
        f"`fedbip simulate --strategy local --clients 6 --groups 2 --rounds 10 --eval-every 10` in the default regime "
        f"(`--partition {config['partition']}`, {config['examples_per_client']} training sentences per client, "
        f"{summary['clients'][0]['test_examples']} test sentences each), then `--sweep {SWEEP}` and `evaluate`:"
    )
    tail = (
        f"The own accuracies are {'exactly' if same else 'not'} those of the run's `summary.json`. Of the "
        f"{len(verdicts)} client-merge pairs, {verdicts.count('helps')} help, {verdicts.count('hurts')} hurt and "
        f"{verdicts.count('undecided')} are undecided. `--fail-if-worse {MARGIN}` exits {gate.returncode}"
        + (f": {gate.stderr.strip().splitlines()[0]}" if gate.returncode == 3 and gate.stderr.strip() else "")
        + "."
    )
    text = f"{head}\n\n" + "\n".join(lines) + f"\n\n{tail}"
    print(text)
    if args.write_docs:
        write_generated(ROOT / "docs" / "does-it-help.md", "does-it-help", text, note)


if __name__ == "__main__":
    main()
