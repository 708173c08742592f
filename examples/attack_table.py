"""The poisoning table of the README from a directory of ``fedbip simulate`` runs.

Usage: ``python examples/attack_table.py ROOT`` where ROOT holds one run per attack and defence,
``ROOT/<attack>-<defence>`` with attack none, scaled or backdoor and defence none or auto (see the
README's "Hostile adapters" section for the commands). For each run and strategy it prints, at the
last evaluated round, the honest clients' mean ASR (with the clean target rate beside it) and
clean accuracy, the same for the attackers' honest group mates, and the attackers' own. In the
no-attack runs, "honest" means every client but those that attack in the attack runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFENCES = {"none": "none", "auto": "`--clip-norm auto`"}


def last_round(path: Path, strategy: str) -> list[dict[str, Any]]:
    """The rows of ``strategy`` at its last evaluated round in ``path`` (a metrics.jsonl)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["strategy"] == strategy and r["test_accuracy"] is not None]
    last = max(r["round"] for r in rows)
    return [r for r in rows if r["round"] == last]


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def rates(rows: list[dict[str, Any]]) -> str:
    return f"{mean(rows, 'attack_success_rate'):.3f} ({mean(rows, 'clean_target_rate'):.3f})"


def main(root: Path) -> None:
    runs = {(a, d): root / f"{a}-{d}" for a in ("none", "scaled", "backdoor") for d in DEFENCES}
    runs = {key: path for key, path in runs.items() if (path / "summary.json").is_file()}
    attackers = {
        r["client"]
        for (attack, _), path in runs.items()
        if attack != "none"
        for r in (json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines())
        if r.get("attacker")
    }
    print(
        "| attack | server defence | strategy | honest clients: ASR (clean rate) | honest accuracy "
        "| attacker's group mate: ASR (clean rate) | its accuracy | attacker: ASR (clean rate), accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (attack, defence), path in runs.items():
        groups = json.loads((path / "groups.json").read_text())
        attacked = {groups[c] for c in attackers}
        for strategy in json.loads((path / "summary.json").read_text())["strategies"]:
            rows = last_round(path / "metrics.jsonl", strategy)
            honest = [r for r in rows if r["client"] not in attackers]
            mates = [r for r in honest if groups[r["client"]] in attacked]
            own = [r for r in rows if r["client"] in attackers]
            cells = [attack, DEFENCES[defence], strategy]
            if attack == "none":
                cells += ["–", f"{mean(honest, 'test_accuracy'):.3f}", "–", f"{mean(mates, 'test_accuracy'):.3f}", "–"]
            else:
                cells += [rates(honest), f"{mean(honest, 'test_accuracy'):.3f}", rates(mates)]
                cells += [f"{mean(mates, 'test_accuracy'):.3f}", f"{rates(own)}, {mean(own, 'test_accuracy'):.3f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/attack_table.py ROOT")
    main(Path(sys.argv[1]))
