"""What ``fedbip evaluate`` shows: a rich table for people, a JSON document for machines
(``schemas/evaluate.schema.json``). Nothing here prints."""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table

from fedbip_cli.evaluate.run import Evaluation
from fedbip_cli.evaluate.scorer import CAUSAL_LM
from fedbip_cli.evaluate.stats import METHOD

_STYLES = {"helps": "green", "hurts": "red", "undecided": "yellow"}


def _score(evaluation: Evaluation, value: float) -> dict[str, float]:
    if evaluation.task == CAUSAL_LM:
        return {"loss": value, "perplexity": math.exp(value)}
    return {"accuracy": value}


def evaluation_json(evaluation: Evaluation, *, margin: float | None, picked: str | None) -> dict[str, Any]:
    """The JSON document of ``evaluation``, with the gate's outcome for ``margin`` and the --pick directory."""
    options = evaluation.options
    return {
        "task": evaluation.task,
        "metric": {"name": evaluation.metric.name, "higher_is_better": evaluation.metric.higher_is_better},
        "own": evaluation.own,
        "candidates": evaluation.candidates,
        "base": evaluation.base,
        "interval": {
            "method": METHOD,
            "confidence": options.confidence,
            "resamples": options.resamples,
            "seed": options.seed,
        },
        "clients": [
            {
                "client": r.client,
                "examples": r.examples,
                "tokens": r.tokens,
                "own": _score(evaluation, r.own),
                "candidates": [
                    {
                        "candidate": c.candidate,
                        **_score(evaluation, c.score),
                        "difference": c.difference,
                        "interval": [c.low, c.high],
                        "verdict": c.verdict,
                    }
                    for c in r.comparisons
                ],
                "best": r.best,
            }
            for r in evaluation.clients
        ],
        "gate": None
        if margin is None
        else {
            "margin": margin,
            "failed": [{"client": client, "candidate": name} for client, name in evaluation.worse(margin)],
        },
        "pick": picked,
    }


def evaluation_table(evaluation: Evaluation) -> Table:
    """One row per client and candidate: own's and the candidate's scores, the difference, its interval and
    verdict, marked ``(best)`` where the candidate scores best of all (else the client's own does)."""
    name = evaluation.metric.name
    percent = round(evaluation.options.confidence * 100)
    table = Table(title=f"{name}: each candidate against the client's own ({percent}% paired bootstrap interval)")
    for column in ("client", "candidate", "own", name, "diff", "interval", "verdict"):
        table.add_column(column, justify="right" if column in ("own", name, "diff", "interval") else "left")
    if evaluation.task == CAUSAL_LM:
        table.caption = "loss: mean next-token cross-entropy (nats); perplexity = exp(loss)"
    for result in evaluation.clients:
        for c in result.comparisons:
            table.add_row(
                escape(result.client),
                escape(c.candidate),
                f"{result.own:.4f}",
                f"{c.score:.4f}",
                f"{c.difference:+.4f}",
                f"[{c.low:+.4f}, {c.high:+.4f}]",
                f"[{_STYLES[c.verdict]}]{c.verdict}[/]" + (" (best)" if result.best == c.candidate else ""),
            )
    return table
