"""The paired comparison of a candidate adapter with a client's own: a seeded paired bootstrap.

Both adapters are scored on the same held-out examples, so their scores are paired: an example
that is hard for one is usually hard for the other. Resampling the examples (not each adapter's
scores apart) keeps that pairing, and the interval of the difference is then much narrower than
two separate intervals would suggest. The bootstrap is chosen over McNemar's exact test because
one method serves both metrics: accuracy (a mean of 0/1 outcomes) and a causal LM's mean token
loss (a ratio of summed losses to token counts, which a test on discordant pairs cannot handle).
The interval is the percentile interval of the resampled differences; its coverage is checked on
synthetic pairs in the tests. Every draw comes from a ``torch.Generator`` seeded by the caller, so
a re-run gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHOD = "paired bootstrap (percentile interval, examples resampled with replacement)"
HELPS, HURTS, UNDECIDED = "helps", "hurts", "undecided"
# Resampled index matrices are built this many indices at a time, whatever the number of examples.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Scores:
    """Per-example scores whose metric is ``sum(numerator) / sum(denominator)``: for accuracy 1 or 0
    over 1; for a causal LM a sentence's summed token loss over its token count. float64, (N,)."""

    numerator: torch.Tensor
    denominator: torch.Tensor

    @property
    def value(self) -> float:
        """The metric over every example."""
        return float(self.numerator.sum() / self.denominator.sum())


def paired_interval(
    own: Scores, candidate: Scores, *, resamples: int, confidence: float, generator: torch.Generator
) -> tuple[float, float]:
    """The ``confidence`` percentile interval of ``candidate.value - own.value`` over ``resamples``
    paired bootstrap resamples of the examples.

    Args:
        own: the own adapter's scores.
        candidate: the candidate's scores on the same examples, in the same order.
        resamples: bootstrap resamples (each draws N examples with replacement).
        confidence: the interval's nominal coverage, in (0, 1).
        generator: the source of every draw.

    Returns:
        (low, high).
    """
    n = own.numerator.shape[0]
    if n == 0 or candidate.numerator.shape[0] != n:
        raise ValueError(
            f"paired_interval needs the same examples, at least one; got {n} and {candidate.numerator.shape[0]}"
        )
    differences = []
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        index = torch.randint(n, (min(step, resamples - start), n), generator=generator)
        differences.append(_ratio(candidate, index) - _ratio(own, index))
    tail = (1.0 - confidence) / 2
    bounds = torch.quantile(torch.cat(differences), torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(bounds[0]), float(bounds[1])


def _ratio(scores: Scores, index: torch.Tensor) -> torch.Tensor:
    """The metric of each resample (one row of ``index`` each)."""
    return scores.numerator[index].sum(dim=1) / scores.denominator[index].sum(dim=1)


def verdict(low: float, high: float, *, higher_is_better: bool) -> str:
    """``helps`` when the whole interval of the difference lies on the better side of 0, ``hurts``
    when it lies on the worse side, else ``undecided``."""
    gain_low, gain_high = (low, high) if higher_is_better else (-high, -low)
    if gain_low > 0:
        return HELPS
    return HURTS if gain_high < 0 else UNDECIDED


def worse_beyond(low: float, high: float, margin: float, *, higher_is_better: bool) -> bool:
    """Whether the candidate is worse than its own by more than ``margin`` even at the favourable end
    of its interval: the ``--fail-if-worse`` gate."""
    best_gain = high if higher_is_better else -low
    return best_gain < -margin
