"""Similarity → personalized weight rows (FedBip), with registered variants.

Row i of P says how much of each client's task vector client i receives. Every row includes the
client itself and sums to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedbip_cli.defaults import NEGATIVE_MODES
from fedbip_cli.errors import FedbipError, UsageError

# Under ``keep`` a row whose sum is at most this fraction of its absolute sum is refused: its weights
# would add the task vectors up with a total absolute weight above 1 / ROW_SUM_FLOOR. (A client beside
# its own negated copy sums to 0 up to rounding, ±2e-16, which would give weights of about 10¹⁶.)
ROW_SUM_FLOOR = 1e-6


@dataclass(frozen=True)
class WeightOptions:
    """How similarities become weights.

    weighting: ``paper`` (P_ij = S_ij / Σ_j S_ij) or ``softmax`` (P_ij ∝ exp(S_ij / temperature)).
    negative: ``clip`` drops negatively similar clients (weight 0), ``keep`` uses S as it is.
    top_k: keep the client itself and its top_k − 1 most similar others in each row.
    """

    weighting: str = "paper"
    negative: str = "clip"
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.negative not in NEGATIVE_MODES:
            raise UsageError(f"unknown negative mode {self.negative!r}; choose one of {', '.join(NEGATIVE_MODES)}")
        if not self.temperature > 0:
            raise UsageError(f"temperature {self.temperature} must be positive")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top-k {self.top_k} must be at least 1 (the client itself)")


def top_k_mask(similarity: torch.Tensor, k: int | None) -> torch.Tensor:
    """Boolean mask keeping, per row, the diagonal and the k − 1 largest off-diagonal entries.

    Ties go to the lower client index, so the mask is deterministic.
    """
    n = similarity.shape[0]
    if k is None or k >= n:
        return torch.ones(n, n, dtype=torch.bool)
    others = similarity.clone()
    others.fill_diagonal_(-torch.inf)
    # A stable descending sort keeps the lower index first among equal values.
    order = torch.sort(others, dim=1, descending=True, stable=True).indices[:, : k - 1]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask.scatter_(1, order, True)
    mask.fill_diagonal_(True)
    return mask


def paper_weights(similarity: torch.Tensor, options: WeightOptions) -> torch.Tensor:
    """FedBip: P_ij = S⁺_ij / Σ_j S⁺_ij over the kept entries (S⁺ = max(S, 0) unless negatives are kept).

    Raises FedbipError for a row whose sum is not clearly positive (at most ``ROW_SUM_FLOOR`` of its
    absolute sum), which only ``keep`` can give.
    """
    s = similarity.clamp(min=0) if options.negative == "clip" else similarity.clone()
    s = torch.where(top_k_mask(similarity, options.top_k), s, torch.zeros_like(s))
    totals = s.sum(dim=1, keepdim=True)
    magnitudes = s.abs().sum(dim=1)
    bad = (totals[:, 0] <= ROW_SUM_FLOOR * magnitudes).nonzero().flatten().tolist()
    if bad:
        raise FedbipError(
            f"weights of client row(s) {bad} sum to {totals[bad[0], 0].item():.3g} against an absolute sum of "
            f"{magnitudes[bad[0]].item():.3g} with --negative keep: they would be unbounded",
            hint="negative similarities outweigh the client itself; use --negative clip or --weighting softmax",
        )
    return s / totals


def softmax_weights(similarity: torch.Tensor, options: WeightOptions) -> torch.Tensor:
    """P_ij ∝ exp(S_ij / T) over the kept entries; with ``clip``, negatively similar clients get 0."""
    keep = top_k_mask(similarity, options.top_k)
    if options.negative == "clip":
        keep &= similarity >= 0
        keep.fill_diagonal_(True)
    logits = torch.where(keep, similarity / options.temperature, torch.full_like(similarity, -torch.inf))
    return torch.softmax(logits, dim=1)


WEIGHTINGS: dict[str, Callable[[torch.Tensor, WeightOptions], torch.Tensor]] = {
    "paper": paper_weights,
    "softmax": softmax_weights,
}


def personalized_weights(similarity: torch.Tensor, options: WeightOptions) -> torch.Tensor:
    """The (K, K) float64 weight matrix for one group; each row sums to 1."""
    return WEIGHTINGS[options.weighting](similarity.to(torch.float64), options)
