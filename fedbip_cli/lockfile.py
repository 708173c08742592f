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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedbip_cli import checkpoints
from fedbip_cli.adapters import CONFIG_NAME, WEIGHTS_NAME, file_sha256
from fedbip_cli.boundedio import read_json
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
    """Read a lock file and check every field's type and shape (see the module's format).

    Raises:
        LockError: the file is missing, unreadable, larger than ``MAX_FILE_BYTES``, not JSON, not a
            fedbip lock file of a known format, or a field is missing or of the wrong type: one line
            naming the file and the field (``sources["adapters/"]["c0"].revision``).
    """
    path = Path(path)
    if not path.exists():
        raise LockError(
            "no lock file here", where=str(path), hint="run once without --locked to create it, and commit it"
        )
    data = read_json(path, error=LockError, what="the lock file")
    if not isinstance(data, dict) or not _format(data.get("fedbip_lock")):
        raise LockError(f"not a fedbip lock file (format {LOCK_FORMAT})", where=str(path))
    _check_fields(data, _LOCK_FIELDS, "", path)
    for spec, clients in data["sources"].items():
        for client, entry in _mapping(clients, f"sources[{_key(spec)}]", path).items():
            field = f"sources[{_key(spec)}][{_key(client)}]"
            _check_fields(_mapping(entry, field, path), _ENTRY_FIELDS, field, path)
            for name, digest in (entry.get("files") or {}).items():
                if not _sha256(digest):
                    raise _malformed(path, f"{field}.files[{_key(name)}]", "a sha256 (64 hex digits)", digest)
    if data["base"] is not None:
        _check_fields(_mapping(data["base"], "base", path), _BASE_FIELDS, "base", path)
    return data


def _format(value: Any) -> bool:
    return type(value) is int and value == LOCK_FORMAT  # not true, not 1.0


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# Each field of a lock's objects: (required, check, the expected value in words).
_Fields = dict[str, tuple[bool, Callable[[Any], bool], str]]
_LOCK_FIELDS: _Fields = {
    "fedbip_lock": (True, lambda v: _format(v), f"{LOCK_FORMAT}"),
    "sources": (True, lambda v: isinstance(v, dict), "an object: SOURCE -> its clients"),
    "base": (True, lambda v: v is None or isinstance(v, dict), 'null or {"spec": ..., "revision": ...}'),
}
_ENTRY_FIELDS: _Fields = {
    "revision": (True, lambda v: v is None or _text(v), "a commit (string) or null"),
    "files": (False, lambda v: isinstance(v, dict), "an object: file name -> sha256"),
}
_BASE_FIELDS: _Fields = {
    "spec": (True, _text, "an hf:// reference (string)"),
    "revision": (True, _text, "a commit (string)"),
}


def _check_fields(data: dict[str, Any], fields: _Fields, where: str, path: Path) -> None:
    """Every required field of ``data`` present, none unknown, each of its type."""
    prefix = f"{where}." if where else ""
    for name in data:
        if name not in fields:
            raise LockError(f"unknown field {prefix}{name[:80]}", where=str(path), hint=_REWRITE)
    for name, (required, accepts, expected) in fields.items():
        if name not in data:
            if required:
                raise LockError(f"missing field {prefix}{name}", where=str(path), hint=_REWRITE)
        elif not accepts(data[name]):
            raise _malformed(path, prefix + name, expected, data[name])


def _mapping(value: Any, where: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(path, where, "an object", value)
    return value


def _malformed(path: Path, where: str, expected: str, value: Any) -> LockError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return LockError(f"{where} = {shown}: expected {expected}", where=str(path), hint=_REWRITE)


def _key(name: str) -> str:
    """A JSON object key as it is written in a field path: ``["adapters/"]``."""
    shown = json.dumps(name)
    return shown if len(shown) <= 80 else shown[:77] + '..."'


_REWRITE = "the lock file was edited or damaged: run once without --locked to rewrite it, and commit it"


def check_replaceable(path: Path) -> None:
    """Refuse to write the lock file ``path`` over anything but a lock file fedbip wrote (or nothing).

    Proof of ownership is a regular file holding a JSON object with a ``fedbip_lock`` field; a
    damaged one of those is rewritten, anything else (a user's notes, a dotfile, a link) is refused
    whatever ``--overwrite`` says.

    Raises:
        LockError: naming the file and what is there.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_file():
        kind = "a link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
        raise LockError(f"{kind} is there, not a fedbip lock file", where=str(path), hint=_OTHER_LOCK)
    try:
        data = read_json(path, error=LockError, what="the lock file")
    except LockError:
        data = None
    if not isinstance(data, dict) or "fedbip_lock" not in data:
        raise LockError(
            "a file fedbip did not write is there (no fedbip_lock field): it is never replaced",
            where=str(path),
            hint=_OTHER_LOCK,
        )


_OTHER_LOCK = "fedbip replaces only a lock file it wrote, whatever --overwrite says: name another --lock file"


def lock_text(record: dict[str, Any]) -> str:
    """A lock record as written: deterministic JSON bytes."""
    return json.dumps(record, indent=2) + "\n"


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
