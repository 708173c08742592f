"""Option and result value types every layer of a merge shares: no I/O here.

``MergeOptions`` holds every option that changes a merge's result and checks each one once, at
the edge; ``MergeResult`` is what a merge returns; ``LockState`` is a run's lock file; ``Progress``
is how long work reports itself (the CLI draws bars, the library never prints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedbip_cli.defaults import DEVICES, HEADS
from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import UsageError
from fedbip_cli.merge import DEFAULT_COMBINE, registered
from fedbip_cli.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from fedbip_cli.similarity import SimilarityResult
from fedbip_cli.sketch import SimilarityMethod
from fedbip_cli.sources import FULL, LORA
from fedbip_cli.taskvec import GRANULARITIES
from fedbip_cli.weights import WeightOptions

# progress(stage, total) starts a stage and returns the function that advances it.
Progress = Callable[[str, int], Callable[[int], None]]
# --dtype: auto keeps the inputs' dtype when they all agree (float32 otherwise).
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def start(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    """Start a progress stage; a no-op without a progress callback."""
    return progress(stage, total) if progress is not None else (lambda n: None)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a user error."""
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available", hint="use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class LockState:
    """A run's lock file: where it is, what this run resolved to, and whether the run was held to it."""

    path: Path
    record: dict[str, Any]
    locked: bool


@dataclass(frozen=True)
class MergeOptions:
    """Every option that changes a merge's result (recorded in the manifest)."""

    granularity: str = "model"
    weights: WeightOptions = field(default_factory=WeightOptions)
    combine: str = DEFAULT_COMBINE
    rank: int | None = None
    device: str = "auto"
    to_lora: int | None = None  # full checkpoints: write rank-R adapters instead of checkpoints
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE  # full checkpoints: the largest output shard
    similarity: str = "exact"  # or "sketch" (adapters only), with sketch_dim and sketch_seed
    sketch_dim: int | None = None
    sketch_seed: int | None = None
    dtype: str = "auto"  # adapters: the output dtype (auto: the inputs' when they agree, else float32)
    clip_norm: str | None = None  # bound each task vector's norm before merging (``defence.ClipNorm``)
    heads: str | None = None  # saved modules: one of HEADS; None: merged only when the base holds them

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        registered(self.combine)  # raises on an unknown name, listing the valid ones
        check_heads(self.heads)
        if self.dtype != "auto" and self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose one of auto, {', '.join(OUTPUT_DTYPES)}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"rank {self.rank} must be a positive integer")
        if self.to_lora is not None and self.to_lora < 1:
            raise UsageError(f"to-lora rank {self.to_lora} must be a positive integer")
        parse_size(self.max_shard_size)
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        self.method  # noqa: B018 -- raises on a bad method, dimension or seed
        if self.clip is not None and not registered(self.combine).linear_in_weights:
            raise UsageError(
                f"--clip-norm needs a merge linear in the weights; --combine {self.combine} is not",
                hint="use --combine svd or cat",
            )

    @property
    def clip(self) -> ClipNorm | None:
        """The norm bound of ``clip_norm`` (None: no clipping); raises on a malformed one."""
        return ClipNorm.parse(self.clip_norm)

    @property
    def method(self) -> SimilarityMethod:
        """How the similarity is computed (``exact``, or ``sketch`` with its dimension and seed)."""
        return SimilarityMethod(self.similarity, self.sketch_dim, self.sketch_seed)

    def check_kind(self, kind: str) -> None:
        """Refuse the options that do not apply to inputs of ``kind`` (``lora`` or ``full``)."""
        if kind == LORA and self.to_lora is not None:
            raise UsageError("--to-lora applies to full fine-tuned checkpoints", hint="merged adapters take --rank R")
        if kind == FULL and (self.rank is not None or self.combine != DEFAULT_COMBINE):
            option = "--rank" if self.rank is not None else f"--combine {self.combine}"
            raise UsageError(
                f"{option} applies to LoRA adapters",
                hint="full checkpoints are merged whole, or written as adapters with --to-lora R",
            )
        check_method_kind(self.method, kind)

    def as_dict(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "weighting": self.weights.weighting,
            "negative": self.weights.negative,
            "temperature": self.weights.temperature,
            "top_k": self.weights.top_k,
            "combine": self.combine,
            "rank": self.rank,
            "dtype": self.dtype,
            "similarity": self.method.as_dict(),
            "clip_norm": None if self.clip is None else str(self.clip),
            "heads": self.heads,
        }


def check_heads(heads: str | None) -> None:
    """Refuse a ``--heads`` value other than those of ``HEADS`` (None: not chosen)."""
    if heads is not None and heads not in HEADS:
        raise UsageError(f"unknown heads {heads!r}; choose one of {', '.join(HEADS)}")


def check_method_kind(method: SimilarityMethod, kind: str) -> None:
    """Refuse a sketched similarity of full checkpoints: their deltas are dense, the sketch works on LoRA factors."""
    if kind == FULL and method.name != "exact":
        raise UsageError(
            f"--similarity {method.name} applies to LoRA adapters",
            hint="full fine-tuned checkpoints are compared exactly; drop --similarity, or convert them with --to-lora first",
        )


@dataclass
class MergeResult:
    similarity: SimilarityResult
    weights: dict[str, torch.Tensor]  # per group, (K, K)
    rank: int
    energy: dict[str, dict[str, float | None]]  # client -> module -> energy kept
    out: Path
    manifest: dict[str, Any]
    lock_written: bool = False
