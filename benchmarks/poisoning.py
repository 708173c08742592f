"""How much of a victim's merged delta a hostile adapter supplies, with and without the defences.

The scenarios of tests/test_defence.py (six honest clients in two task groups, the victim h0, an
attacker zz): ``scaled`` is a ×1000 copy of the victim's neighbour h1, ``hidden`` the victim's own
update plus a hidden component of equal norm. For each merge option set, the share of the victim's
merged delta (‖P'_vj ΔW_j‖ / ‖M_v‖, float64, from the written adapters) that the attacker and an
honest neighbour supply, and whether the outlier report flags the attacker. Run:

    python benchmarks/poisoning.py               # print the table
    python benchmarks/poisoning.py --write-docs  # and write it into docs/threat-model.md (and README.md's summary)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/test_hostile.py imports its helpers as top-level modules

from benchmarks.docgen import write_generated  # noqa: E402
from tests.test_defence import attacker_share, merge, scenario  # noqa: E402
from tests.test_hostile import CASES as HOSTILE  # noqa: E402

ATTACKS = {"scaled": "×1000 copy of h1", "hidden": "victim + hidden component of equal norm"}
OPTIONS = {
    "no defence": [],
    "--clip-norm auto (median)": ["--clip-norm", "auto"],
    "--clip-norm 2x": ["--clip-norm", "2x"],
    "--top-k 3": ["--top-k", "3"],
    "--top-k 3 --clip-norm auto": ["--top-k", "3", "--clip-norm", "auto"],
}


def table(found: dict[tuple[str, str], float] | None = None) -> str:
    """The markdown table of every attack and option set (each merge in a temporary directory); each
    (attack, options) attacker's share also goes into ``found`` when given."""
    rows = [
        "| attack | merge options | attacker's share | honest neighbour h1 | h2 | flagged as outlier |",
        "|---|---|---|---|---|---|",
    ]
    for attack in ("scaled", "hidden"):
        with tempfile.TemporaryDirectory() as work:
            root = Path(work)
            sources = scenario(root / "in", attack)
            for i, (label, options) in enumerate(OPTIONS.items()):
                summary = merge(sources, root / f"out{i}", *options)
                flagged = summary["defence"]["groups"]["model"]["outliers"]
                names = [o["client"] for kind in ("norm", "similarity") for o in flagged[kind]]
                shares = [attacker_share(sources, root / f"out{i}", attacker=c) for c in ("zz", "h1", "h2")]
                if found is not None:
                    found[attack, label] = shares[0]
                cells = " | ".join(f"{s:.3f}" for s in shares)
                rows.append(f"| {ATTACKS[attack]} | {label} | {cells} | {'zz' if 'zz' in names else 'no'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/threat-model.md")
    args = parser.parse_args()
    found: dict[tuple[str, str], float] = {}
    text = table(found)
    print(text)
    if args.write_docs:
        write_generated(ROOT / "docs" / "threat-model.md", "poisoning", text)
        before, after = found["scaled", "no defence"], found["scaled", "--clip-norm auto (median)"]
        bullet = (
            f"- **Safe**: the {len(HOSTILE)} hostile inputs of `tests/test_hostile.py` refused in one line each, "
            "outputs committed together or not at all (a kill at any step recovered), an authenticated cache; "
            f"`--clip-norm auto` cuts a ×1000 copy's share of its victim's merge from {before:.1%} to {after:.1%} "
            "([threat model](docs/threat-model.md))."
        )
        write_generated(ROOT / "README.md", "poisoning", bullet)


if __name__ == "__main__":
    main()
