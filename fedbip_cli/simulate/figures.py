"""Figures of ``fedbip simulate``: accuracy per round with seed bands, and the Figure 3 separation.

Each function takes plain numbers (what ``metrics.jsonl`` and ``similarity.jsonl`` hold) and writes
one PNG atomically with deterministic metadata, so that re-running gives identical bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Curves = dict[str, list[dict[int, float]]]  # name -> one {round: value} per seed


def _save(figure: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    os.replace(tmp, path)


def _band(axis, label: str, per_seed: list[dict[int, float]]) -> None:  # noqa: ANN001 (matplotlib Axes)
    """Mean over seeds at the rounds every seed has, ± one standard deviation as a band."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds = sorted(set.intersection(*(set(curve) for curve in per_seed)))
    values = np.array([[curve[r] for r in rounds] for curve in per_seed], dtype=np.float64)
    mean = values.mean(axis=0)
    (line,) = axis.plot(rounds, mean, marker="o", markersize=3, label=label)
    if len(per_seed) > 1:
        sd = values.std(axis=0, ddof=1)
        axis.fill_between(rounds, mean - sd, mean + sd, color=line.get_color(), alpha=0.18, linewidth=0)


def write_accuracy_bands(curves: Curves, path: Path, *, title: str) -> None:
    """Mean personalized test accuracy per round, one line per strategy, a ±sd band over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.4), layout="constrained")
    axis = figure.subplots()
    for strategy, per_seed in curves.items():
        _band(axis, strategy, per_seed)
    axis.set_xlabel("round")
    axis.set_ylabel("mean personalized test accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.suptitle(title)
    _save(figure, path)


def write_separation(gap: Curves, ari: Curves, path: Path, *, title: str, kinds: Sequence[str]) -> None:
    """The paper's Figure 3 check per round: within- minus between-group mean cosine (left) and the
    ARI of the suggested clusters (right), one line per kind of vector, a ±sd band over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for kind in kinds:
        if gap.get(kind):
            _band(left, kind, gap[kind])
        if ari.get(kind):
            _band(right, kind, ari[kind])
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_ylabel("within-group − between-group mean cosine")
    right.set_ylabel("ARI of suggested clusters vs true groups")
    right.set_ylim(-0.35, 1.05)
    for axis in (left, right):
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def write_weights(self_curves: Curves, own_curves: Curves, uniform: float, path: Path, *, title: str) -> None:
    """Where the weights go per round: each client's self-weight P_ii (left) and its weight mass on
    its own true group (right), means over clients, one line per strategy (FedBip-L's blocks and
    head apart), a ±sd band over seeds; the dashed line is what weights blind to the groups give."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for axis, curves in ((left, self_curves), (right, own_curves)):
        axis.set_prop_cycle(color=colormaps["tab20"].colors)  # a dozen lines: ten colours would repeat
        for label, per_seed in curves.items():
            _band(axis, label, per_seed)
        axis.set_xlabel("round")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    right.axhline(uniform, color="grey", linestyle="--", linewidth=0.9, label="blind to groups (|g|/K)")
    left.set_ylabel("self-weight P_ii")
    right.set_ylabel("weight on own true group")
    right.legend(fontsize=7, ncol=2)
    figure.suptitle(title)
    _save(figure, path)
