"""A persistent cache of pairwise task-vector inner products, keyed by content.

A key is the sha256 of one client's stored factors of one module (their bytes, dtype, shape and
scale) and of the engine that computes with them (``similarity.ENGINE``, device type). A pair is kept
once, under its two keys in sorted order, so re-running after one adapter is added or changed
computes only that adapter's row: O(K) inner products per module instead of O(K²). Values are
stored as the exact 8 bytes of the float64 that the engine computed, so a warm run gives the same
bits as a cold one.

The store is one SQLite file (stdlib ``sqlite3``): transactions keep it consistent when a run is
interrupted, and concurrent runs wait for each other's writes. Nothing is ever evicted; deleting the
directory resets it.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedbip_cli.errors import CacheError

CACHE_FILE = "inner-products.sqlite3"
SCHEMA_VERSION = 1
Pair = tuple[bytes, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (x BLOB NOT NULL, y BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (x, y)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS wanted (key BLOB PRIMARY KEY) WITHOUT ROWID;
"""
# SQLite writes integral REALs as integers, which loses the sign of -0.0: keep the raw bytes instead.
_DOUBLE = struct.Struct("<d")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedbip``, else ``~/.cache/fedbip``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fedbip"


@dataclass
class CacheStats:
    """Inner products of one run: read from the cache (``hits``) and computed (``computed``)."""

    hits: int = 0
    computed: int = 0


class InnerProductCache:
    """Inner products by pair of content keys, persistent in ``directory`` or, when None, not kept.

    Without a directory nothing is remembered between calls, but the engine runs exactly the same
    way (and the statistics still count what it computed).

    Raises:
        CacheError: the directory or the database cannot be created, read or written.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory).expanduser()
        self.stats = CacheStats()
        self._db: sqlite3.Connection | None = None
        if self.directory is not None:
            with self._errors("open"):
                self.directory.mkdir(parents=True, exist_ok=True)
                # Autocommit: every bulk operation below opens its own transaction.
                self._db = sqlite3.connect(self.directory / CACHE_FILE, timeout=60, isolation_level=None)
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise CacheError(
                        f"cache format {version}, this fedbip reads format {SCHEMA_VERSION}",
                        where=str(self.directory / CACHE_FILE),
                    )
                self._db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")

    @property
    def path(self) -> Path | None:
        """The database file, or None for a cache that keeps nothing."""
        return None if self.directory is None else self.directory / CACHE_FILE

    @property
    def persistent(self) -> bool:
        """Whether products are kept between runs (a directory was given)."""
        return self._db is not None

    def discard(self, count: int) -> None:
        """Count ``count`` products computed but not kept (a cache without a directory)."""
        self.stats.computed += count

    def lookup(self, keys: Sequence[bytes]) -> dict[Pair, float]:
        """Every stored inner product between two of ``keys`` (pairs as ``(min, max)``)."""
        if self._db is None:
            return {}
        with self._errors("read"):
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM wanted")
                self._db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((k,) for k in keys))
                # CROSS JOIN fixes the loop order: a range search of the primary key per wanted key,
                # where the planner would otherwise scan the whole table.
                rows = self._db.execute(
                    "SELECT p.x, p.y, p.value FROM wanted a CROSS JOIN pairs p ON p.x = a.key "
                    "CROSS JOIN wanted b ON p.y = b.key"
                ).fetchall()
            finally:
                self._db.execute("ROLLBACK")  # the temporary key list is not worth keeping
        found = {(x, y): _DOUBLE.unpack(value)[0] for x, y, value in rows}
        self.stats.hits += len(found)
        return found

    def store(self, values: Mapping[Pair, float]) -> None:
        """Record freshly computed inner products (pairs as ``(min, max)``)."""
        self.stats.computed += len(values)
        if self._db is None or not values:
            return
        with self._errors("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO pairs VALUES (?, ?, ?)",
                    ((x, y, _DOUBLE.pack(v)) for (x, y), v in values.items()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> InnerProductCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return _sqlite_errors(action, self.path or self.directory)


@contextmanager
def _sqlite_errors(action: str, where: Path | None) -> Iterator[None]:
    """Turn ``sqlite3`` and file-system failures into one ``CacheError`` naming the file."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise CacheError(f"cannot {action} the inner-product cache: {exc}", where=str(where)) from exc
