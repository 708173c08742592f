"""Bounded influence for hostile task vectors: norm clipping and an outlier report.

Cosine similarity ignores scale, so a ×1000 copy of an honest adapter gets an ordinary neighbour's
weight and then dominates every merge it enters. Norm clipping scales each client's task vector
(each group's part of it, under ``--layerwise``) down to at most a bound before merging:
τ'_j = c_j τ_j with c_j = min(1, bound / ‖τ_j‖). The similarity does not change (cosine is scale
free), so clipping is exactly a column scaling of the weight matrix, P'_ij = P_ij c_j, which every
combine mode linear in the weights carries out exactly. Rows of P' may sum to less than 1: a clipped
neighbour contributes less, nobody else gains.

The outlier report flags clients whose norm, or whose mean similarity to the others, lies far from
the rest by a robust z-score (median and median absolute deviation), and pairs of distinct clients
that are near copies of each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedbip_cli.errors import UsageError

# --clip-norm auto: the median norm of the group's task vectors, FLAME's adaptive bound (Nguyen et al.,
# USENIX Security 2022, which clips each update to the median of the updates' norms). A scaled copy is
# brought back to a typical client's size, so it weighs what an honest neighbour weighs; an honest
# client above the median is scaled down by its (usually modest) excess, recorded in the manifest.
AUTO_MULTIPLE = 1.0
# |z| above this (z robust: 0.6745 (x − median) / MAD) marks an outlier (Iglewicz and Hoaglin's 3.5).
OUTLIER_Z = 3.5
# Fewer clients than this have no "rest" robust enough to stand out from: z-scores are not reported.
MIN_CLIENTS = 5
# Besides its z-score, a flagged value must be far from the median in absolute terms: a norm at
# least NORM_RATIO times (or at most 1/NORM_RATIO of) the median, a mean similarity at least
# SIMILARITY_GAP from it. Honest clients' norms differ by tens of percent, and with a handful of
# clients the MAD is small enough that z alone flagged them (6 simulated clients: 1-3 per block).
NORM_RATIO = 3.0
SIMILARITY_GAP = 0.2
# Cosine at or above this between two distinct clients: a near copy.
NEAR_COPY = 0.999


@dataclass(frozen=True)
class ClipNorm:
    """A norm bound: ``multiple`` × the median norm of the group (``auto`` = 1x, ``1.5x``), or an absolute ``value``."""

    multiple: float | None = None
    value: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> ClipNorm | None:
        """``None`` (no clipping), ``auto`` (the median norm), ``<K>x`` (K times the median norm) or ``<V>`` (an absolute norm)."""
        if text is None:
            return None
        spec = str(text).strip().lower()
        try:
            if spec == "auto":
                return cls(multiple=AUTO_MULTIPLE)
            if spec.endswith("x"):
                multiple = float(spec[:-1])
                if math.isfinite(multiple) and multiple > 0:
                    return cls(multiple=multiple)
            else:
                value = float(spec)
                if math.isfinite(value) and value > 0:
                    return cls(value=value)
        except ValueError:
            pass
        raise UsageError(
            f"--clip-norm {text!r} is not a norm bound",
            hint="use auto (the median norm), a multiple of the median such as 1.5x, or a positive number",
        )

    def __str__(self) -> str:
        return f"{self.multiple:g}x" if self.multiple is not None else f"{self.value:g}"

    def bound(self, norms: torch.Tensor) -> float:
        """The largest norm a task vector keeps, for a group whose clients have ``norms``."""
        if self.value is not None:
            return self.value
        assert self.multiple is not None
        # The median proper (the mean of the two middle norms for an even count; torch's median()
        # takes the lower one, which would clip half the clients of an even group every time).
        return self.multiple * float(torch.quantile(norms.to(torch.float64), 0.5))


def clip_scales(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """c_j = min(1, bound / ‖τ_j‖) (1 for a zero task vector): the factor each client is scaled by."""
    norms = norms.to(torch.float64)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > bound, bound / safe, torch.ones_like(norms))


def clipped_weights(
    weights: torch.Tensor, norms: torch.Tensor, clip: ClipNorm | None
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """P'_ij = P_ij c_j, and the record of the clip (the bound and each clipped client's norm and scale).

    Args:
        weights: (K, K) float64 weight rows of one group.
        norms: (K,) the clients' task-vector norms in that group.
        clip: the bound, or None for no clipping (the weights are returned unchanged).
    """
    if clip is None:
        return weights, None
    bound = clip.bound(norms)
    scales = clip_scales(norms, bound)
    record = {
        "bound": bound,
        "clipped": {int(j): float(scales[j]) for j in (scales < 1).nonzero().flatten().tolist()},
    }
    return weights * scales[None, :].to(weights.dtype), record


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """Iglewicz and Hoaglin's modified z-score: 0.6745 (x − median) / MAD, or where the MAD is zero (more
    than half the values equal) (x − median) / (1.253314 · mean absolute deviation); all zero when
    every value is the same."""
    values = values.to(torch.float64)
    median = values.median()
    deviation = (values - median).abs()
    mad = deviation.median()
    if mad > 0:
        return 0.6745 * (values - median) / mad
    mean_deviation = deviation.mean()
    if mean_deviation > 0:
        return (values - median) / (1.253314 * mean_deviation)
    return torch.zeros_like(values)


def outliers(clients: list[str], similarity: torch.Tensor, norms: torch.Tensor) -> dict[str, Any]:
    """Norm outliers, similarity outliers and near copies among the clients of one group.

    Norms are compared on a log scale (a ×1000 copy is 3 decades away, whatever the typical norm);
    a client's similarity is its mean cosine to the others. A flag needs both a robust |z| above
    ``OUTLIER_Z`` and a distance from the median of at least ``NORM_RATIO`` (norms) or
    ``SIMILARITY_GAP`` (similarities). Each flagged client is listed with its
    value and z-score (from ``MIN_CLIENTS`` clients on); near copies are pairs (i < j) of distinct
    clients with cosine ≥ ``NEAR_COPY``.
    """
    count = len(clients)
    logs = torch.log10(norms.to(torch.float64).clamp(min=1e-300))
    mean_similarity = (similarity.sum(dim=1) - similarity.diagonal()) / max(count - 1, 1)
    report: dict[str, Any] = {"norm": [], "similarity": [], "near_copies": []}
    if count >= MIN_CLIENTS:
        floors = {"norm": math.log10(NORM_RATIO), "similarity": SIMILARITY_GAP}
        for kind, values, shown in (("norm", logs, norms), ("similarity", mean_similarity, mean_similarity)):
            z = robust_z(values)
            far = (values - values.median()).abs() >= floors[kind]
            for i in ((z.abs() > OUTLIER_Z) & far).nonzero().flatten().tolist():
                report[kind].append({"client": clients[i], "value": float(shown[i]), "z": float(z[i])})
    upper = torch.triu(similarity >= NEAR_COPY, diagonal=1)
    for i, j in upper.nonzero().tolist():
        report["near_copies"].append({"clients": [clients[i], clients[j]], "similarity": float(similarity[i, j])})
    return report
