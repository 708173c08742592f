"""The machine-readable record of a merge: ``OUT/fedbip-manifest.json``.

Pure data: no timestamps or host names, so the same merge gives the same bytes.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fedbip_cli import __version__
from fedbip_cli.similarity import SimilarityResult

MANIFEST_NAME = "fedbip-manifest.json"


def library_versions() -> dict[str, str]:
    """Versions of fedbip and the libraries whose numerics or formats it relies on."""
    versions = {"fedbip": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("safetensors", "huggingface_hub", "peft"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return versions


def matrix(t: torch.Tensor) -> list[list[float]]:
    """A float64 matrix as nested lists of python floats (full precision in JSON)."""
    return [[float(x) for x in row] for row in t.tolist()]


def groups(similarity: SimilarityResult, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each group's members, similarity and weight matrices, as recorded in the manifest."""
    return {
        name: {"modules": g.modules, "similarity": matrix(g.similarity), "weights": matrix(weights[name])}
        for name, g in similarity.groups.items()
    }


def dump(data: dict[str, Any], path: Path) -> None:
    """Write JSON deterministically (fixed key order from construction, 2-space indent, newline)."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
