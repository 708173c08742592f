"""What every kind of source gives the pipeline: validated clients whose task vectors are sets of parts.

A ``Workspace`` is the loaded, checked inputs of one run. Its two kinds, LoRA adapters
(``adapter_workspace``) and full fine-tuned checkpoints (``checkpoint_workspace``), answer the same
few questions, so that ``pipeline`` runs load → inspect → plan → merge → write once for both:

* ``parts`` and ``module_of``: the task vector's parts and the module each belongs to (for grouping);
* ``inner_products``: the exact (K, K) Gram of every part;
* ``plan_outputs``: what a merge would write, from headers alone;
* ``write``: each client's personalized outputs, given the weight rows;
* ``inputs_record`` / ``base_record`` / ``recorded_options``: the manifest's account of the inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedbip_cli.errors import UsageError
from fedbip_cli.innercache import InnerProductCache
from fedbip_cli.options import LockState, MergeOptions, Progress, check_method_kind
from fedbip_cli.similarity import SimilarityResult
from fedbip_cli.sketch import SimilarityMethod
from fedbip_cli.sources import ResolvedSource


@dataclass
class Written:
    """What a workspace wrote into a merge's temporary directory.

    ``record`` holds the manifest's fields that depend on the kind of output (output, combine, rank,
    ...); ``digests`` the sha256 of files already hashed while streaming (client -> file name);
    ``declared_base`` the base model each client's own config named (for its card).
    """

    energy: dict[str, dict[str, float | None]]  # client -> module -> energy kept
    rank: int
    record: dict[str, Any]
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    declared_base: dict[str, str | None] = field(default_factory=dict)


@dataclass(kw_only=True)
class Workspace(ABC):
    """Validated inputs of one run.

    ``specs`` are the SOURCES as given, relative paths taken from ``base_dir``; ``resolved`` says
    which clients each one expanded to; ``lock`` is the lock file this run writes or is held to.
    """

    specs: list[str]
    sources: list[ResolvedSource]
    base: str | None = None
    base_revision: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    resolved: list[tuple[str, list[ResolvedSource]]] = field(default_factory=list)
    lock: LockState | None = None
    kind: ClassVar[str]

    @property
    @abstractmethod
    def clients(self) -> list[str]:
        """The clients' names, in order (rows and columns of every matrix)."""

    @property
    @abstractmethod
    def parts(self) -> list[str]:
        """Every part of the clients' task vectors, in natural order."""

    @staticmethod
    @abstractmethod
    def module_of(part: str) -> str:
        """The module a part belongs to (parts of one module always share a group)."""

    def input_paths(self) -> list[Path]:
        """Every local path this run reads: the resolved sources, the SOURCES as given and the base."""
        inputs = [s.path.resolve() for s in self.sources]
        given = [*self.specs, *([self.base] if self.base else [])]
        paths = [(self.base_dir / Path(s).expanduser()).resolve() for s in given if not s.startswith(("hf://", "@"))]
        return inputs + [path for path in paths if path.exists()]

    def coverage(self) -> dict[str, Any]:
        """Which parts the similarity covers: ``{"parts": {kind: count}, "heads": ..., "left_out": [...]}``."""
        return {"parts": {self.kind: len(self.parts)}, "heads": None, "left_out": []}

    @abstractmethod
    def inner_products(
        self, device: torch.device, cache: InnerProductCache | None, advance: Callable[[int], None]
    ) -> dict[str, torch.Tensor]:
        """The exact (K, K) float64 inner products <ΔW_i, ΔW_j> of every part; ``advance(1)`` per part."""

    def sketched(
        self, granularity: str, method: SimilarityMethod, device: torch.device, progress: Progress | None
    ) -> SimilarityResult:
        """A sketched similarity; only LoRA factors can be sketched (``check_method_kind`` says so)."""
        check_method_kind(method, self.kind)
        raise UsageError(f"--similarity {method.name} is not available for {self.kind} sources")

    @abstractmethod
    def plan_outputs(self, options: MergeOptions, groups: dict[str, list[str]]) -> dict[str, Any]:
        """What a merge with ``options`` would write, from headers alone (``pipeline.plan`` adds the rest)."""

    @abstractmethod
    def write(
        self,
        tmp: Path,
        options: MergeOptions,
        weights: dict[str, torch.Tensor],
        group_of: dict[str, str],
        device: torch.device,
        progress: Progress | None,
    ) -> Written:
        """Write every client's personalized outputs into ``tmp/<client>/`` (not the card or manifest)."""

    @abstractmethod
    def inputs_record(self) -> list[dict[str, Any]]:
        """The manifest's ``inputs``: one entry per client."""

    def base_record(self) -> dict[str, Any] | None:
        """The manifest's ``base``."""
        return {"source": self.base, "revision": self.base_revision} if self.base else None

    def recorded_options(self, options: MergeOptions) -> dict[str, Any]:
        """The options as the manifest records them (and the reproducing command reads them)."""
        return options.as_dict()
