"""The machine-readable record of a merge: ``OUT/fedbip-manifest.json``.

Pure data: no timestamps, host names or output path, so the same merge gives the same bytes.
The workspace, options and similarity are read by duck typing: ``pipeline`` imports this module.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fedbip_cli import __version__
from fedbip_cli.boundedio import read_json
from fedbip_cli.command import merge_command, pinned_sources
from fedbip_cli.errors import OutputError
from fedbip_cli.merge import registered
from fedbip_cli.sources import LORA, pinned_spec

MANIFEST_NAME = "fedbip-manifest.json"
MAX_MANIFEST_BYTES = 2**30  # K² similarity and weight matrices per group: large for thousands of clients


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


def groups(similarity: Any, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each group's members, similarity and weight matrices, as recorded in the manifest.

    Args:
        similarity: a ``similarity.SimilarityResult``.
        weights: per group, the (K, K) weight matrix.
    """
    return {
        name: {"modules": g.modules, "similarity": matrix(g.similarity), "weights": matrix(weights[name])}
        for name, g in similarity.groups.items()
    }


def dump(data: dict[str, Any], path: Path) -> None:
    """Write JSON deterministically (fixed key order from construction, 2-space indent, newline)."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def merge_record(
    workspace: Any,
    options: Any,
    similarity: Any,
    weights: dict[str, torch.Tensor],
    written: Any,
    device: torch.device,
) -> dict[str, Any]:
    """The manifest of a merge of any kind of source, with ``outputs`` still empty (filled as the files are hashed).

    Args:
        workspace: the ``workspace.Workspace`` merged (adapters or full checkpoints).
        options: its ``options.MergeOptions``.
        similarity: the ``similarity.SimilarityResult`` the weights came from.
        weights: per group, the (K, K) weight matrix.
        written: the workspace's ``workspace.Written`` account of its outputs.
        device: where the merge ran.
    """
    recorded = workspace.recorded_options(options)
    uses_rank = workspace.kind == LORA and registered(options.combine).uses_rank
    return {
        "fedbip_manifest": 1,
        "kind": workspace.kind,
        "versions": library_versions(),
        "options": recorded,
        "command": reproducing_command(workspace, recorded, rank=written.rank if uses_rank else None, device=device),
        "base": workspace.base_record(),
        "inputs": workspace.inputs_record(),
        "clients": similarity.clients,
        "granularity": similarity.granularity,
        "similarity": similarity.method,
        "covers": similarity.covers,
        "groups": groups(similarity, weights),
        **written.record,
        "energy_kept": written.energy,
        "outputs": {},
    }


def reproducing_command(workspace: Any, options: dict[str, Any], *, rank: int | None, device: torch.device) -> str:
    """The ``fedbip merge`` command that reproduces a merge of ``workspace`` (see ``command``).

    Args:
        workspace: the ``workspace.Workspace`` merged.
        options: the merge's options as recorded (``MergeOptions.as_dict()``, plus ``to_lora`` and
            ``max_shard_size`` for full checkpoints).
        rank: the rank used by ``svd`` (None otherwise).
        device: where the merge ran.
    """
    base = pinned_spec(workspace.base, workspace.base_revision) if workspace.base else None
    return merge_command(pinned_sources(workspace.resolved), options, base=base, rank=rank, device=device.type)


def foreign_entries(out: Path) -> list[str]:
    """The entries of the directory ``out`` that no fedbip manifest in it accounts for (relative names;
    a foreign directory is named once, not with its files).

    A merge's OUT holds its manifest and one directory per client holding the files the manifest's
    ``outputs`` lists; anything else (everything, without a readable manifest) is the user's.
    """
    outputs = _manifest_outputs(out / MANIFEST_NAME)
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == MANIFEST_NAME and outputs is not None and _plain_file(entry):
            continue
        files = (outputs or {}).get(entry.name)
        if files is None or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry.name)
            continue
        own = {name.removeprefix(f"{entry.name}/") for name in files}
        foreign += [
            f"{entry.name}/{f.name}" for f in sorted(entry.iterdir()) if f.name not in own or not _plain_file(f)
        ]
    return foreign


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _manifest_outputs(path: Path) -> dict[str, Any] | None:
    """A fedbip manifest's ``outputs`` (client -> its files), or None when ``path`` holds none."""
    try:
        record = read_json(path, error=OutputError, limit=MAX_MANIFEST_BYTES, what="the manifest")
    except OutputError:
        return None
    if (
        not isinstance(record, dict)
        or record.get("fedbip_manifest") != 1
        or not isinstance(record.get("outputs"), dict)
    ):
        return None
    return {c: f for c, f in record["outputs"].items() if isinstance(f, dict)}
