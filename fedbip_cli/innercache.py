"""A persistent cache of pairwise task-vector inner products, keyed by content and authenticated.

A key is the sha256 of one client's stored factors of one module (their bytes, dtype, shape and
scale) and of the engine that computes with them (``similarity.ENGINE``, device type). A pair is kept
once, under its two keys in sorted order, so re-running after one adapter is added or changed
computes only that adapter's row: O(K) inner products per module instead of O(K²). Values are
stored as the exact 8 bytes of the float64 that the engine computed, so a warm run gives the same
bits as a cold one.

**The cache cannot change a result.** The cache directory may be shared or restored from
somewhere else (a CI cache any branch can write), so nothing read from it is trusted: every entry
carries a MAC (keyed BLAKE2b-256, RFC 7693's keyed mode) under a per-user secret kept outside the
cache directory, of its two keys and its value. An entry whose MAC does not verify, whose value is not 8 bytes, is NaN or infinite,
or is a negative squared norm is not used: its product is computed again (and the entry
replaced), and ``CacheStats.rejected`` counts it. Forging an entry needs the secret: the file
``cache-key`` (32 random bytes, hex) in ``$XDG_CONFIG_HOME/fedbip`` (else ``~/.config/fedbip``),
created with mode 0600 on first use and refused when others may read it, or ``FEDBIP_CACHE_KEY``
(the same hex) where a CI job keeps it as a secret.

The store is one SQLite file (stdlib ``sqlite3``): transactions keep it consistent when a run is
interrupted, and concurrent runs wait for each other's writes. Nothing is ever evicted; deleting the
directory resets it. Any SQLite or file-system failure is one ``CacheError`` naming the file and
the cause (``disk full``), never the error of a clean-up that followed it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import math
import os
import secrets
import sqlite3
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from fedbip_cli.errors import CacheError

CACHE_FILE = "inner-products.sqlite3"
SCHEMA_VERSION = 2  # 1: values without a MAC (dropped on opening: nothing in them can be verified)
KEY_FILE = "cache-key"
KEY_VARIABLE = "FEDBIP_CACHE_KEY"
KEY_BYTES = 32
Pair = tuple[bytes, bytes]

_PAIRS = (
    "CREATE TABLE IF NOT EXISTS pairs "
    "(x BLOB NOT NULL, y BLOB NOT NULL, value BLOB NOT NULL, mac BLOB NOT NULL, PRIMARY KEY (x, y)) WITHOUT ROWID"
)
_WANTED = "CREATE TEMP TABLE IF NOT EXISTS wanted (key BLOB PRIMARY KEY) WITHOUT ROWID"
# SQLite writes integral REALs as integers, which loses the sign of -0.0: keep the raw bytes instead.
_DOUBLE = struct.Struct("<d")
# What a MAC covers: a domain tag, then each key with its length (so that no two pairs share the
# bytes a MAC is computed over), then the 8 bytes of the value.
_MAC_TAG = b"fedbip inner product v2\0"
_MAC_BYTES = 32
_KEY_HINT = f"delete it to have a new one made, or set {KEY_VARIABLE} to 64 hex digits"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedbip``, else ``~/.cache/fedbip``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fedbip"


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/fedbip/cache-key``, else ``~/.config/fedbip/cache-key``: beside the user's
    settings, never in a cache directory that may be shared or restored."""
    root = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(root) / "fedbip" / KEY_FILE


def cache_secret(key_file: Path | None = None) -> bytes:
    """The secret that authenticates cache entries: ``FEDBIP_CACHE_KEY`` when set, else ``key_file``
    (default ``default_key_file()``), created with 32 random bytes and mode 0600 when missing.

    Raises:
        CacheError: the variable is not 64 hex digits; the file cannot be created or read, is not a
            regular file of this user, may be read by others, or does not hold 64 hex digits.
    """
    if os.environ.get(KEY_VARIABLE):
        return _parse_secret(os.environ[KEY_VARIABLE], f"${KEY_VARIABLE}")
    path = default_key_file() if key_file is None else key_file
    with _sqlite_errors("create the cache key", path):
        if not path.exists():
            _create_key_file(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise CacheError("the cache key is not a regular file of this user", where=str(path), hint=_KEY_HINT)
            if info.st_mode & 0o077:
                raise CacheError(
                    f"the cache key may be read by others (mode {stat.S_IMODE(info.st_mode):o})",
                    where=str(path),
                    hint=f"chmod 600 {path}",
                )
            text = os.read(fd, 4 * KEY_BYTES).decode("ascii", errors="replace")
        finally:
            os.close(fd)
    return _parse_secret(text, str(path))


def _create_key_file(path: Path) -> None:
    """Write a new random key to ``path`` atomically: written whole to a private temporary file,
    then linked into place, so that two first runs at once agree on one key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another run made it first: use theirs
    finally:
        temporary.unlink()


def _parse_secret(text: str, where: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise CacheError(f"the cache key is not {2 * KEY_BYTES} hex digits", where=where, hint=_KEY_HINT)
    return secret


@dataclass
class CacheStats:
    """Inner products of one run: read from the cache (``hits``), computed (``computed``), and
    entries found but refused (``rejected``: a MAC that does not verify, a malformed or non-finite
    value; each was computed again and is counted in ``computed`` too)."""

    hits: int = 0
    computed: int = 0
    rejected: int = 0


class InnerProductCache:
    """Inner products by pair of content keys, persistent in ``directory`` or, when None, not kept.

    Without a directory nothing is remembered between calls, but the engine runs exactly the same
    way (and the statistics still count what it computed). ``key_file`` overrides where the secret
    is kept (see ``cache_secret``); it may not lie inside ``directory``.

    Raises:
        CacheError: the directory, the database or the key cannot be created, read or written.
    """

    def __init__(self, directory: Path | None = None, *, key_file: Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory).expanduser()
        self.stats = CacheStats()
        self._db: sqlite3.Connection | None = None
        self._secret = b""
        if self.directory is None:
            return
        key_path = (default_key_file() if key_file is None else key_file).absolute()
        if not os.environ.get(KEY_VARIABLE) and key_path.is_relative_to(self.directory.absolute()):
            raise CacheError(
                f"the cache key {key_path} lies inside the cache directory, which may be shared or restored",
                where=str(self.directory),
                hint="keep the cache elsewhere (--cache DIR) or move XDG_CONFIG_HOME out of it",
            )
        self._secret = cache_secret(key_path)
        if self.directory.exists() and not self.directory.is_dir():
            raise CacheError("cannot open the inner-product cache: not a directory", where=str(self.directory))
        with self._errors("open"):
            self.directory.mkdir(parents=True, exist_ok=True)
            # Autocommit: every bulk operation below opens its own transaction.
            self._db = sqlite3.connect(self.directory / CACHE_FILE, timeout=60, isolation_level=None)
            # The file may come from anyone: no schema-defined SQL functions with side effects, and
            # damaged pages are caught when read.
            self._db.executescript("PRAGMA trusted_schema = OFF; PRAGMA cell_size_check = ON;")
            with self._transaction("BEGIN IMMEDIATE", commit=True) as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise CacheError(
                        f"cache format {version}, this fedbip reads format {SCHEMA_VERSION}",
                        where=str(self.directory / CACHE_FILE),
                    )
                if version != SCHEMA_VERSION:
                    db.execute("DROP TABLE IF EXISTS pairs")
                    db.execute(_PAIRS)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute(_WANTED)

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
        """Every stored inner product between two of ``keys`` (pairs as ``(min, max)``) that verifies.

        Entries that do not verify (see the module's docstring) are left out, as if absent, and
        counted in ``stats.rejected``.
        """
        if self._db is None:
            return {}
        with self._errors("read"), self._transaction("BEGIN", commit=False) as db:
            # The temporary key list is rolled back, not kept.
            db.execute("DELETE FROM wanted")
            db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((k,) for k in keys))
            # CROSS JOIN fixes the loop order: a range search of the primary key per wanted key,
            # where the planner would otherwise scan the whole table.
            rows = db.execute(
                "SELECT p.x, p.y, p.value, p.mac FROM wanted a CROSS JOIN pairs p ON p.x = a.key "
                "CROSS JOIN wanted b ON p.y = b.key"
            ).fetchall()
        found = {}
        for x, y, stored, mac in rows:
            value = self._verified(x, y, stored, mac)
            if value is None:
                self.stats.rejected += 1
            else:
                found[(x, y)] = value
        self.stats.hits += len(found)
        return found

    def store(self, values: Mapping[Pair, float]) -> None:
        """Record freshly computed inner products (pairs as ``(min, max)``), replacing refused entries.

        A value that is not finite is not kept.
        """
        self.stats.computed += len(values)
        if self._db is None or not values:
            return
        rows = [
            (x, y, packed, self._mac(x, y, packed))
            for (x, y), v in values.items()
            if math.isfinite(v)
            for packed in (_DOUBLE.pack(v),)
        ]
        with self._errors("write"), self._transaction("BEGIN IMMEDIATE", commit=True) as db:
            db.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> InnerProductCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mac(self, x: bytes, y: bytes, value: bytes) -> bytes:
        """The MAC of a pair's keys and value under this user's secret: keyed BLAKE2b-256, a MAC by
        design (no HMAC construction needed) and 2.6 times cheaper per entry than HMAC-SHA256 here
        (0.67 against 1.73 µs), which a warm run pays for every product it reads."""
        message = b"".join((_MAC_TAG, len(x).to_bytes(4, "big"), x, len(y).to_bytes(4, "big"), y, value))
        return hashlib.blake2b(message, key=self._secret, digest_size=_MAC_BYTES).digest()

    def _verified(self, x: object, y: object, value: object, mac: object) -> float | None:
        """A stored entry's value, or None when it cannot be trusted."""
        if not (
            isinstance(x, bytes)
            and isinstance(y, bytes)
            and isinstance(value, bytes)
            and len(value) == _DOUBLE.size
            and isinstance(mac, bytes)
            and len(mac) == _MAC_BYTES
            and hmac.compare_digest(mac, self._mac(x, y, value))
        ):
            return None
        (number,) = _DOUBLE.unpack(value)
        # Never written so (``store`` keeps finite values; a squared norm is not negative): a bug
        # or a leaked key, and either way not to be used.
        if not math.isfinite(number) or (x == y and number < 0):
            return None
        return number

    @contextmanager
    def _transaction(self, begin: str, *, commit: bool) -> Iterator[sqlite3.Connection]:
        """``begin`` ... COMMIT (or ROLLBACK when not ``commit``). On a failure, a rollback that
        cannot hide it: SQLite has often ended the transaction itself (a full disk), and the error
        of a ROLLBACK without one would replace the cause."""
        assert self._db is not None
        db = self._db
        db.execute(begin)
        try:
            yield db
            db.execute("COMMIT" if commit else "ROLLBACK")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return _sqlite_errors(f"{action} the inner-product cache", self.path or self.directory)


# SQLite's result codes whose cause deserves plainer words than its message.
_CAUSES = {
    "SQLITE_FULL": "disk full",
    "SQLITE_NOTADB": "not an SQLite database (damaged, or another file)",
    "SQLITE_CORRUPT": "the database is damaged",
    "SQLITE_READONLY": "read-only (file or file system)",
    "SQLITE_CANTOPEN": "the file cannot be opened",
    "SQLITE_BUSY": "another process holds the database locked",
}


@contextmanager
def _sqlite_errors(action: str, where: Path | None) -> Iterator[None]:
    """Turn ``sqlite3`` and file-system failures into one ``CacheError`` naming the file and the cause."""
    try:
        yield
    except sqlite3.Error as exc:
        cause = _CAUSES.get(getattr(exc, "sqlite_errorname", ""), str(exc))
        raise CacheError(f"cannot {action}: {cause}", where=str(where)) from exc
    except OSError as exc:
        cause = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CacheError(f"cannot {action}: {cause}", where=str(exc.filename or where)) from exc
