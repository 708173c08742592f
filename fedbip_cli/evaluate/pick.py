"""``evaluate --pick DIR``: per client, a copy of the best-scoring adapter with a card saying what
was compared and why it won, and ``fedbip-pick.json``; all committed together (``outdir.Outputs``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedbip_cli import __version__
from fedbip_cli.boundedio import read_json
from fedbip_cli.card import CARD_NAME
from fedbip_cli.errors import OutputError
from fedbip_cli.evaluate.run import OWN, ClientResult, Evaluation
from fedbip_cli.evaluate.stats import METHOD
from fedbip_cli.outdir import Outputs

PICK_RECORD = "fedbip-pick.json"
UNLISTED = f"no {PICK_RECORD} in it lists them"  # why --pick refuses to replace entries of DIR
MAX_PICK_RECORD_BYTES = 1 << 26


def pick_foreign(out: Path) -> list[str]:
    """The entries of a --pick directory that fedbip cannot prove it wrote: anything but its
    ``fedbip-pick.json`` and, in each client directory that record lists, the files it lists."""
    try:
        record = read_json(out / PICK_RECORD, error=OutputError, limit=MAX_PICK_RECORD_BYTES, what="the pick record")
    except OutputError:
        record = None
    files = record.get("files") if isinstance(record, dict) else None
    files = files if isinstance(files, dict) else {}
    foreign = []
    for entry in sorted(out.iterdir()):
        plain = entry.is_file() and not entry.is_symlink()
        if entry.name == PICK_RECORD and files and plain:
            continue
        listed = files.get(entry.name)
        if not isinstance(listed, list) or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry.name)
            continue
        foreign += [
            f"{entry.name}/{f.name}"
            for f in sorted(entry.iterdir())
            if f.name not in listed or not f.is_file() or f.is_symlink()
        ]
    return foreign


def write_picks(evaluation: Evaluation, out: Path, inputs: list[Path], *, overwrite: bool = False) -> dict[str, str]:
    """Write ``out/<client>/``, a copy of each client's best adapter (its top-level files; the card
    replaces the adapter's own README.md), and ``out/fedbip-pick.json``.

    Args:
        evaluation: what ``run.evaluate`` returned.
        out: the output directory; refused when it lies in or around one of ``inputs``, or is not
            empty without ``overwrite``.
        inputs: the adapter sets and the data directory.

    Returns:
        client -> the name of the set its adapter was copied from.
    """
    chosen = {result.client: result.best for result in evaluation.clients}
    with Outputs() as outputs:
        staged = outputs.directory(out, inputs, overwrite=overwrite, owner=pick_foreign, why=UNLISTED)
        files: dict[str, list[str]] = {}
        for result in evaluation.clients:
            target = staged / result.client
            target.mkdir()
            source = result.adapters[result.best]
            for path in sorted(source.iterdir()):
                if path.is_file() and not path.is_symlink() and path.name != CARD_NAME:
                    shutil.copyfile(path, target / path.name)
            (target / CARD_NAME).write_text(pick_card(evaluation, result), encoding="utf-8")
            files[result.client] = sorted(path.name for path in target.iterdir())
        record = {
            "fedbip": __version__,
            "own": evaluation.own,
            "candidates": evaluation.candidates,
            "picked": chosen,
            "files": files,
        }
        (staged / PICK_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return chosen


def pick_card(evaluation: Evaluation, result: ClientResult) -> str:
    """The card of ``result.client``'s picked adapter (Markdown, ending with a newline)."""
    metric = evaluation.metric
    order = "higher" if metric.higher_is_better else "lower"
    winner = evaluation.own if result.best == OWN else result.best
    percent = round(evaluation.options.confidence * 100)
    lines = [
        "---",
        "library_name: peft",
        "tags:",
        "- fedbip",
        "- fedbip-evaluate",
        "---",
        "",
        f"# {result.client}: picked from {winner}",
        "",
        f"fedbip {__version__} scored client `{result.client}`'s own adapter ({evaluation.own}) and "
        f"{len(result.comparisons)} candidate(s) on {result.examples} held-out examples of this client, with the base "
        f"model {evaluation.base}, by {metric.name} ({order} is better).",
        "",
        f"| adapter | {metric.name} | difference to own | {percent}% interval | verdict |",
        "|---|---|---|---|---|",
        f"| own: {evaluation.own} | {result.own:.4f} | | | |",
        *(
            f"| {c.candidate} | {c.score:.4f} | {c.difference:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] | {c.verdict} |"
            for c in result.comparisons
        ),
        "",
        "## Why this adapter",
        "",
        f"It has the {'highest' if metric.higher_is_better else 'lowest'} {metric.name} of the adapters compared "
        "(the own adapter wins ties, then the candidates in the order given). The interval is a "
        f"{METHOD} of {evaluation.options.resamples} resamples, seed {evaluation.options.seed}; a verdict of "
        "`undecided` means the data cannot tell the two apart.",
        "",
    ]
    return "\n".join(lines)
