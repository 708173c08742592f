"""Bounded reads of untrusted files: one reader for text, one for JSON, one depth check.

Every input fedbip parses (adapter configs, safetensors headers, ``@`` lists, config files, lock
files, shard indexes) may be hostile. Reading one through here bounds what it can cost:

- **bytes**: at most ``limit`` bytes are read, whatever the file claims (``/dev/zero``, a 1 GB
  ``adapter_config.json``); a directory, a device, a socket or a pipe is refused before anything
  is read (a pipe only where the caller accepts one: ``@<(find ...)`` lists);
- **nesting**: a JSON (or TOML) text nested deeper than ``MAX_DEPTH`` is refused before it is
  parsed, by a linear scan, so that no recursive parser ever sees it (``[[[[...`` 100 000 deep
  otherwise ends in ``RecursionError``);
- **values**: JSON's non-standard ``NaN`` / ``Infinity`` literals are refused (no file fedbip reads
  holds them legitimately; numbers are bounded by the callers that know their meaning).

Each function takes the ``FedbipError`` subclass to raise, so that the caller's kind of input
decides the exit code and the hint; every message names the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from fedbip_cli.errors import FedbipError

MAX_FILE_BYTES = 64 * 2**20  # a lock file of 10 000 clients is about 3 MB; a peft config a few KB
MAX_DEPTH = 64  # peft configs, locks, indexes and safetensors headers nest 3 to 5 deep
# A JSON (or TOML) string, escapes included: what the depth scan skips. Linear: the two branches
# cannot both match a character.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def size_text(size: int) -> str:
    """``size`` bytes in words: ``64 MiB``, ``100000000 bytes``."""
    return f"{size // 2**20} MiB" if size % 2**20 == 0 else f"{size} bytes"


def read_bytes(
    path: Path, *, error: type[FedbipError], limit: int = MAX_FILE_BYTES, what: str = "the file", pipes: bool = False
) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``, refused whole when longer.

    Args:
        path: the file.
        error: the error to raise (its class decides the exit code and the default hint).
        limit: the largest size accepted.
        what: the file in words, for messages (``"the lock file"``).
        pipes: accept a pipe too (an ``@<(find ...)`` list). Otherwise a pipe is refused, unopened
            for reading: opening one that no process writes would wait for ever.

    Raises:
        error: the file is missing, not a regular file (or pipe), unreadable, or larger than ``limit``.
    """
    where = str(path)
    try:
        # Non-blocking, so that opening a pipe without a writer returns at once and can be refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (pipes and stat.S_ISFIFO(mode))):
            os.close(fd)
            raise error(f"{what} is {_kind(mode)}, not a file", where=where)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} does not exist", where=where) from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", where=where) from None
    if len(data) > limit:
        raise error(f"{what} is larger than {size_text(limit)}; refused unread", where=where)
    return data


def read_text(
    path: Path, *, error: type[FedbipError], limit: int = MAX_FILE_BYTES, what: str = "the file", pipes: bool = False
) -> str:
    """``read_bytes`` decoded as UTF-8.

    Raises:
        error: as ``read_bytes``, or the bytes are not UTF-8.
    """
    data = read_bytes(path, error=error, limit=limit, what=what, pipes=pipes)
    return decode(data, where=str(path), error=error, what=what)


def decode(data: bytes, *, where: str, error: type[FedbipError], what: str = "the file") -> str:
    """``data`` as UTF-8 text, or ``error`` naming the byte where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})", where=where) from None


def read_json(path: Path, *, error: type[FedbipError], limit: int = MAX_FILE_BYTES, what: str = "the file") -> Any:
    """A JSON file, read with ``read_bytes`` and parsed with ``parse_json``."""
    data = read_bytes(path, error=error, limit=limit, what=what)
    return parse_json(data, where=str(path), error=error, what=what)


def parse_json(data: bytes | str, *, where: str, error: type[FedbipError], what: str = "the file") -> Any:
    """Parse JSON text no deeper than ``MAX_DEPTH``, without NaN or Infinity literals.

    Raises:
        error: not UTF-8, not JSON, nested too deep, or holding NaN / Infinity.
    """
    text = decode(data, where=where, error=error, what=what) if isinstance(data, bytes) else data
    check_depth(text, where=where, error=error, what=what)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:  # json.JSONDecodeError, and _no_constant's
        raise error(f"{what} is not valid JSON: {exc}", where=where) from None


def check_depth(text: str, *, where: str, error: type[FedbipError], what: str = "the file") -> None:
    """Refuse ``text`` (JSON or TOML) when its brackets nest deeper than ``MAX_DEPTH``.

    Brackets inside strings do not count. Linear in the text and stops at the first level too deep.

    Raises:
        error: nested deeper than ``MAX_DEPTH``.
    """
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if bracket[0] in "[{" else -1
        if depth > MAX_DEPTH:
            raise error(f"{what} nests arrays or objects more than {MAX_DEPTH} deep; refused unparsed", where=where)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _kind(mode: int) -> str:
    """A file type in words, for a message."""
    for test, words in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
    ):
        if test(mode):
            return words
    return "not a regular file"
