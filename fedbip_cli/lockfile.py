"""Lock files: what every SOURCE resolved to, so that a pipeline notices when an input moves.

``--lock FILE`` records, for each SOURCE as it was written, the clients it expanded to with the Hub
commit each resolved to (None for local ones) and the sha256 of their files (an adapter's config and
weights; a full checkpoint's config, index and weight files), plus the commit of a Hub ``--base``.
``--locked`` refuses to run when anything resolves differently: a branch that moved to a new commit,
a client added or removed, a file whose bytes changed. Keys are the SOURCES as given, never absolute
paths, so a lock file written on one machine checks on another.

The format (JSON, ``fedbip_lock: 1``)::

    {"fedbip_lock": 1,
     "sources": {"<spec>": {"<client>": {"revision": "<commit>" | null,
                                         "files": {"adapter_config.json": "<sha256>", ...}}}},
     "base": {"spec": "hf://...", "revision": "<commit>"} | null}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbip_cli import checkpoints
from fedbip_cli.adapters import CONFIG_NAME, WEIGHTS_NAME, file_sha256
from fedbip_cli.errors import LockError
from fedbip_cli.sources import FULL, HUB_PREFIX, ResolvedSource

LOCK_FORMAT = 1
LOCKED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# A full checkpoint's: its config, and its weights as one file or as shards and their index.
LOCKED_CHECKPOINT_FILES = ("config.json", checkpoints.INDEX_NAME, checkpoints.WEIGHTS_NAME)


def sources_record(
    resolved: Sequence[tuple[str, Sequence[ResolvedSource]]], *, hashes: bool = True, full_hashes: bool = True
) -> dict[str, Any]:
    """The ``sources`` part of a lock: for each SOURCE (``sources.resolve_specs``), its clients' commits and file hashes.

    With ``hashes=False``, commits only (no ``files``): what can be checked before any weights are
    fetched. With ``full_hashes=False``, commits only for full checkpoints (a dry run, which neither
    fetches nor reads their weights).
    """
    return {
        spec: {source.name: _entry(source, hashes and (full_hashes or source.kind != FULL)) for source in group}
        for spec, group in resolved
    }


def _entry(source: ResolvedSource, hashes: bool) -> dict[str, Any]:
    """One client's lock entry: its commit, and the sha256 of its files when ``hashes``."""
    if not hashes:
        return {"revision": source.revision}
    files = {f: file_sha256(source.path / f) for f in _locked_files(source) if (source.path / f).is_file()}
    return {"revision": source.revision, "files": files}


def _locked_files(source: ResolvedSource) -> list[str]:
    """The files of a client whose bytes the lock pins (a full checkpoint's shards included)."""
    if source.kind != FULL:
        return list(LOCKED_FILES)
    return [*LOCKED_CHECKPOINT_FILES, *sorted(p.name for p in source.path.glob("model-*-of-*.safetensors"))]


def base_record(base: str | None, revision: str | None) -> dict[str, Any] | None:
    """The ``base`` part of a lock: a Hub base and its commit. A local base is not locked: hashing a
    whole model's weights would cost more than the merge."""
    return {"spec": base, "revision": revision} if base and base.startswith(HUB_PREFIX) else None


def lock_record(sources: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """A whole lock file's content."""
    return {"fedbip_lock": LOCK_FORMAT, "sources": sources, "base": base}


def read_lock(path: Path) -> dict[str, Any]:
    """Read and check the shape of a lock file.

    Raises:
        LockError: the file is missing, not JSON, or not a fedbip lock file of a known format.
    """
    path = Path(path)
    if not path.is_file():
        raise LockError(
            "no lock file here", where=str(path), hint="run once without --locked to create it, and commit it"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LockError(f"cannot read the lock file: {exc}", where=str(path)) from None
    if (
        not isinstance(data, dict)
        or data.get("fedbip_lock") != LOCK_FORMAT
        or not isinstance(data.get("sources"), dict)
    ):
        raise LockError(f"not a fedbip lock file (format {LOCK_FORMAT})", where=str(path))
    return data


def write_lock(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (temporary file + rename), deterministic bytes."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        raise LockError(
            f"cannot write the lock file: {exc.strerror}",
            where=str(path),
            hint="check the directory exists and is writable",
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def check_sources(expected: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse SOURCES that resolve differently from the lock file at ``path``.

    Args:
        expected: the lock file's content (``read_lock``).
        now: ``sources_record`` of this run; entries without ``files`` (``hashes=False``) are checked
            for their commit only.

    Raises:
        LockError: naming the first SOURCE (or client) that differs, and how.
    """
    locked = expected["sources"]
    for spec in now:
        if spec not in locked:
            raise _moved(path, spec, f"is not in the lock file {path}")
    for spec in locked:
        if spec not in now:
            raise _moved(path, spec, f"is in the lock file {path} but not among the sources")
    for spec, clients in now.items():
        pinned = locked[spec]
        if not isinstance(pinned, dict) or sorted(pinned) != sorted(clients):
            names = sorted(pinned) if isinstance(pinned, dict) else pinned
            raise _moved(path, spec, f"resolves to clients {sorted(clients)}; {path} has {names}")
        for name, entry in clients.items():
            old = pinned[name] if isinstance(pinned[name], dict) else {}
            where = f"{spec} (client {name})"
            if entry["revision"] != old.get("revision"):
                raise _moved(path, where, f"resolves to commit {entry['revision']}; {path} pins {old.get('revision')}")
            if "files" not in entry:
                continue
            files = old.get("files") or {}
            for file in sorted(set(entry["files"]) | set(files)):
                if entry["files"].get(file) != files.get(file):
                    raise _moved(
                        path, where, f"{file} has sha256 {entry['files'].get(file)}; {path} has {files.get(file)}"
                    )


def check_base(expected: dict[str, Any], now: dict[str, Any] | None, path: Path) -> None:
    """Refuse a Hub base model (``base_record`` of this run) that resolves differently from the lock file at ``path``."""
    locked = expected.get("base")
    if locked != now:
        where = (now or locked or {}).get("spec") or "--base"
        before = "no Hub base" if locked is None else f"{locked.get('spec')} at {locked.get('revision')}"
        after = "no Hub base" if now is None else f"{now['spec']} at {now['revision']}"
        raise _moved(path, where, f"the base resolves to {after}; {path} has {before}")


def _moved(path: Path, where: str, problem: str) -> LockError:
    return LockError(
        problem,
        where=where,
        hint=f"if the change is intended, run once without --locked to update {path}, and commit it",
    )
