"""Every output of a run, committed together or not at all.

A run draws a random run id (``<pid>-<hex>``), stages each output (the OUT directory, a lock file, a
heatmap, a matrix file) beside its target as ``.fedbip-tmp-<run>.<name>``; a journal
``.fedbip-journal-<run>.<first>.json`` lists every staged target from the moment it is staged, and
its run holds an ``flock`` on it for as long as it lives. When all are complete, ``Outputs.commit``:

1. records in the journal the inode of each new output and of the output it replaces;
2. swaps each staged output into place (``renameat2(RENAME_EXCHANGE)`` on Linux, so a target is
   never missing; elsewhere two renames), keeping the previous one as ``.fedbip-old-<run>.<name>``;
3. marks the journal committed (the commit point), deletes the previous outputs, then the journal.

A failure before the commit point puts every previous output back. A process killed at any step
leaves these names behind, and the next run on the same target (``recover``) finds the journals
whose ``flock`` nobody holds (their run is dead, whatever process now has its pid), rolls an
uncommitted one back (finding each output by the inodes it records, never removing a target whose
inode is not the journal's new output), finishes a committed one, and removes that run's
temporaries. An OUT directory is also locked
(``flock`` on ``.fedbip-lock.<name>``) while a run writes it, so two runs cannot both write one OUT.
Operating-system failures become one ``OutputError`` naming the target and the cause.

Only what fedbip can prove it wrote is ever replaced: ``check_out`` refuses a non-empty OUT unless
its ``owner`` check (a merge's manifest, a simulate run record) accounts for every entry in it,
whatever ``--overwrite`` says.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedbip_cli.errors import OutputError
from fedbip_cli.shown import shown


def finite(tensor: torch.Tensor, name: str, client: str) -> torch.Tensor:
    """``tensor`` as written, after checking every value is finite in its output dtype.

    Every writer passes what it writes through here, so an overflow (float32 factors near 1e38, a
    float16 output of values over 65504) fails the run before anything is moved into place.
    """
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise OutputError(
            f"{bad} of {tensor.numel()} values of {name} are not finite in {str(tensor.dtype).removeprefix('torch.')}",
            where=client,
            hint="the inputs' values overflow the output: check their norms (inspect-similarity --format json), "
            "or write a wider type with --dtype float32",
        )
    return tensor


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


# owner(out): the entries of a non-empty directory ``out`` that fedbip cannot prove it wrote (relative
# names; [] when every entry is its own). Nothing is proven by default: a non-empty OUT is refused.
Owner = Callable[[Path], list[str]]
MAX_LISTED = 3  # foreign entries named in a refusal


def nothing_proven(out: Path) -> list[str]:
    """Every entry of ``out``: an owner check that proves nothing."""
    return sorted(p.name for p in out.iterdir())


def foreign_refusal(out: Path, foreign: Sequence[str], why: str) -> OutputError:
    """The one line refusing to replace ``out``, naming (escaped, a few of) the ``foreign`` entries in it."""
    named = ", ".join(shown(name, 80) for name in foreign[:MAX_LISTED])
    more = f" and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
    return OutputError(
        f"output directory is not empty: it holds {named}{more}, which fedbip did not write ({why})",
        where=str(out),
        hint="fedbip replaces only what it wrote, whatever --overwrite says: choose another --out, or move them away",
    )


def check_out(
    out: Path, inputs: Sequence[Path], overwrite: bool, owner: Owner = nothing_proven, why: str = "nothing records them"
) -> None:
    """Refuse an ``out`` inside or around one of ``inputs``, not a directory, holding entries that
    ``owner`` does not prove fedbip's (``why`` says what proof is missing), or (unless ``overwrite``)
    not empty."""
    real = out.resolve()
    for path in inputs:
        if _inside(real, path):
            raise OutputError(
                f"output directory lies inside the source {path}",
                where=str(out),
                hint="choose an --out outside every source",
            )
        if _inside(path, real):
            raise OutputError(
                f"output directory contains the source {path}",
                where=str(out),
                hint="choose an --out that holds no input",
            )
    if real.exists() and not real.is_dir():
        raise OutputError("exists and is not a directory", where=str(out), hint="choose another --out")
    if real.is_dir() and any(real.iterdir()):
        foreign = owner(real)
        if foreign:
            raise foreign_refusal(out, foreign, why)
        if not overwrite:
            raise OutputError(
                "output directory exists and is not empty",
                where=str(out),
                hint="pass --overwrite to replace it, or choose another --out",
            )


TMP, OLD, JOURNAL, LOCK = ".fedbip-tmp-", ".fedbip-old-", ".fedbip-journal-", ".fedbip-lock."
_RENAME_EXCHANGE = 2
# Errors that only writing causes: a failed write() carries no file name, but these are ours.
WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
_AT_FDCWD = -100


def fault_point(step: str) -> None:
    """Where tests inject faults into the commit (a kill or an error at ``step``); a no-op otherwise.

    ``FEDBIP_TEST_KILL_AT=<step>`` ends the process at once (as kill -9 would), for the fault tests.
    """
    if os.environ.get("FEDBIP_TEST_KILL_AT") == step:
        os._exit(137)


def _os_error(exc: OSError, target: Path, action: str) -> OutputError:
    cause = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        cause = "no space left on device (disk full)"
    return OutputError(
        f"cannot {action}: {cause}", where=str(target), hint="check the location is writable and has room"
    )


def _staged_name(target: Path, prefix: str, run: str) -> Path:
    return target.parent / f"{prefix}{run}.{target.name}"


def new_run_id() -> str:
    """A run's id: its pid (for people reading a directory listing) and 48 random bits (a reused pid
    or another PID namespace never names the same run)."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def _run_of(name: str, prefix: str) -> str | None:
    run = name[len(prefix) :].split(".", 1)[0]
    return run if run and all(part.isalnum() for part in run.split("-")) else None


def _pid_alive(run: str) -> bool:
    """Whether the process whose pid starts ``run`` may be alive (only for leftovers no journal describes)."""
    digits = run.split("-", 1)[0]
    if not digits.isdigit():
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a pid out of range
        return True
    return True


def _held(path: Path) -> bool | None:
    """Whether a live run holds its ``flock`` on the file at ``path`` (None: there is no such file).

    A journal's run holds its lock from before the journal has its name until it is removed, so a
    lock nobody holds, on the inode the name still points to, proves the run dead.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return False
            except FileNotFoundError:
                return None
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the system cannot (then the caller renames twice)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(staged: Path, target: Path, old: Path) -> bool:
    """Put ``staged`` at ``target``, the previous ``target`` (if any) at ``old``; True if there was one."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staged, target)
        return False
    if _exchange(staged, target):
        os.rename(staged, old)  # ``staged`` now holds the previous output
    else:
        os.rename(target, old)
        os.rename(staged, target)
    return True


def _put_back(target: Path, old: Path, existed: bool) -> None:
    """Undo ``_swap_in``: the new output is removed and the previous one (if any) restored."""
    if existed and old.exists():
        if target.exists() or target.is_symlink():
            _remove(target)
        os.rename(old, target)
    elif not existed and (target.exists() or target.is_symlink()):
        _remove(target)


def recover(target: Path) -> None:
    """Roll back what dead runs left uncommitted around ``target``; remove their temporaries.

    A journal whose run is dead (nobody holds its ``flock``) and had not passed the commit point is
    rolled back: every target it lists gets its previous output back, found by the inode the journal
    records. Temporaries that no journal beside them describes are removed once the pid in their
    name is gone. Entries of live runs are left.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    journaled = set()
    for journal in sorted(parent.glob(f"{JOURNAL}*.{target.name}.json")):
        run = _run_of(journal.name, JOURNAL)
        journaled.add(run)
        if run is None or _held(journal) is not False:
            continue
        committed, entries = _journal_entries(journal)
        for listed, new, old in entries:
            if new is not None and not committed:  # the commit had begun: put the previous output back
                _roll_back(listed, run, new, old)
            _remove_stale(listed, run)
        journal.unlink()
    for part in parent.glob(f"{JOURNAL}*.{target.name}.json.part"):
        run = _run_of(part.name, JOURNAL)  # a part is locked just after it is created: its pid must be gone too
        if run is not None and not _pid_alive(run) and _held(part) is False:
            part.unlink(missing_ok=True)
    _remove_stale(target, skip=journaled)
    _remove_unheld_lock(target)


def _remove_unheld_lock(target: Path) -> None:
    """Remove the lock file of ``target`` when no process holds it (one killed while writing left it)."""
    path = target.parent / f"{LOCK}{target.name}"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # held: a live run is writing ``target``
    finally:
        os.close(fd)


def _roll_back(target: Path, run: str, new: int, old: int | None) -> None:
    """Put the entry with inode ``old`` back at ``target``, where ``target`` still is the run's new
    output (inode ``new``) or missing; a target of any other inode was committed since, and stays."""
    places = [target, _staged_name(target, TMP, run), _staged_name(target, OLD, run)]
    inode = {p: p.lstat().st_ino for p in places if p.exists() or p.is_symlink()}
    if target in inode and inode[target] not in (new, old):
        return
    previous = next((p for p in places if old is not None and inode.get(p) == old), None)
    if previous is not None and previous != target:
        if target in inode:
            _remove(target)
        os.rename(previous, target)
    elif old is None and inode.get(target) == new:
        _remove(target)


def _remove_stale(target: Path, run: str | None = None, skip: set[str | None] | None = None) -> None:
    """Remove the temporaries and previous outputs beside ``target`` of run ``run`` (default: of every
    run not in ``skip`` whose pid is gone)."""
    for prefix in (TMP, OLD):
        for entry in target.parent.glob(f"{prefix}*.{target.name}"):
            owner = _run_of(entry.name, prefix)
            if owner is None:
                continue
            ours = owner == run if run is not None else owner not in (skip or set()) and not _pid_alive(owner)
            if ours:
                _remove(entry)


def _journal_entries(path: Path) -> tuple[bool, list[tuple[Path, int | None, int | None]]]:
    """Whether a journal's run passed its commit point, and (target, inode of the new output, inode of
    the previous one) for each target it lists (inodes None until the commit begins; the previous one
    None when there was none). Nothing is listed when the file is not what ``Outputs`` writes."""
    try:
        with path.open("rb") as handle:
            data = json.loads(handle.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False, []
    if (
        not isinstance(data, dict)
        or type(data.get("committed")) is not bool
        or not isinstance(data.get("outputs"), list)
    ):
        return False, []
    entries = []
    for item in data["outputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("target"), str):
            return False, []
        new, old = item.get("new"), item.get("old")
        if not all(value is None or type(value) is int for value in (new, old)):
            return False, []
        entries.append((Path(item["target"]), new, old))
    return data["committed"], entries


class DirectoryLock:
    """An exclusive lock on writing ``out``, held by a live process only (``flock``): released at exit or death."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f"{LOCK}{out.name}"
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise _os_error(exc, self.out, "lock the output directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    "another fedbip run is writing this output directory",
                    where=str(self.out),
                    hint="wait for it to finish, or choose another --out",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file another run unlinked while we waited for it
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class Outputs:
    """Every output of one run, staged beside its target and committed together (see the module's doc).

    Use as a context manager: ``directory`` and ``file`` return where to write each output; leaving
    the block normally commits them all, leaving it by an exception removes them all and leaves every
    target as it was.
    """

    def __init__(self) -> None:
        self.run = new_run_id()
        self._staged: list[tuple[Path, Path]] = []  # (staged, target)
        self._locks: list[DirectoryLock] = []
        self._journal: Path | None = None
        self._journal_fd: int | None = None  # holds the journal's flock: the proof that this run lives

    def directory(
        self,
        out: Path,
        inputs: Sequence[Path] = (),
        *,
        overwrite: bool = False,
        owner: Owner = nothing_proven,
        why: str = "nothing records them",
    ) -> Path:
        """Stage the directory ``out`` (checked by ``check_out`` with ``owner``, locked against other runs)."""
        out = Path(out).absolute()
        if not out.parent.is_dir():
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error(exc, out, "create the output directory") from None
        self._locked(out)
        check_out(out, inputs, overwrite, owner, why)  # again, now that no other run can write it
        staged = self._stage(out)
        try:
            staged.mkdir()
        except OSError as exc:
            raise _os_error(exc, out, "create the output directory") from None
        return staged

    def file(self, target: Path, check: Callable[[Path], None] | None = None) -> Path:
        """Stage the file ``target``; ``check(target)`` first refuses a target that cannot be written."""
        target = Path(target).absolute()
        if check is not None:
            check(target)
        if target.is_dir():
            raise OutputError("is a directory", where=str(target), hint="name a file")
        if not target.parent.is_dir():
            raise OutputError("directory does not exist", where=str(target), hint="create it first")
        return self._stage(target)

    def _locked(self, out: Path) -> None:
        lock = DirectoryLock(out)
        lock.acquire()
        self._locks.append(lock)
        recover(out)

    def _stage(self, target: Path) -> Path:
        if any(t == target for _, t in self._staged):
            raise OutputError("named twice as an output of one run", where=str(target))
        if not any(lock.out == target for lock in self._locks):
            recover(target)
        staged = _staged_name(target, TMP, self.run)
        _remove(staged)
        self._staged.append((staged, target))
        if self._journal is None:
            self._journal = target.parent / f"{JOURNAL}{self.run}.{target.name}.json"
        # Every output is in the journal from the moment it is staged: a kill leaves nothing unlisted.
        staged_only = [{"target": str(t), "new": None, "old": None} for _, t in self._staged]
        self._write_journal({"committed": False, "outputs": staged_only})
        return staged

    def _write_journal(self, entries: dict[str, Any]) -> None:
        """Replace the journal by ``entries`` atomically, its new inode locked before it takes the name."""
        assert self._journal is not None
        part = self._journal.with_name(self._journal.name + ".part")
        data = json.dumps({"run": self.run, **entries}).encode()
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, data)
                os.replace(part, self._journal)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise _os_error(exc, self._staged[0][1], "write the output") from None
        self._release_journal()
        self._journal_fd = fd

    def _release_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def commit(self) -> None:
        """Swap every staged output into place, or (on any failure) none."""
        if not self._staged or self._journal is None:
            return
        swapped: list[tuple[Path, Path, bool]] = []
        try:
            fault_point("staged")
            try:
                inodes = [
                    {
                        "target": str(target),
                        "new": staged.lstat().st_ino,
                        "old": target.lstat().st_ino if target.exists() or target.is_symlink() else None,
                    }
                    for staged, target in self._staged
                ]
            except OSError as exc:
                raise _os_error(exc, self._staged[0][1], "write the output") from None
            self._write_journal({"committed": False, "outputs": inodes})
            fault_point("journal")
            for i, (staged, target) in enumerate(self._staged):
                old = _staged_name(target, OLD, self.run)
                try:
                    swapped.append((target, old, _swap_in(staged, target, old)))
                except OSError as exc:
                    raise _os_error(exc, target, "move the output into place") from None
                fault_point(f"swapped-{i}")
            self._write_journal({"committed": True, "outputs": inodes})  # the commit point
        except BaseException:
            for target, old, existed in reversed(swapped):
                _put_back(target, old, existed)
            raise
        try:
            fault_point("committed")
        finally:
            for _, old, existed in swapped:
                if existed:
                    _remove(old)
            self._journal.unlink()
            self._release_journal()

    def _as_output_error(self, exc: OSError) -> OSError | OutputError:
        """An operating-system failure while writing a staged output, named by its target."""
        where = Path(os.fsdecode(exc.filename)) if exc.filename else None
        for staged, target in self._staged:
            if where is not None and (where == staged or staged in where.parents):
                return _os_error(exc, target, "write the output")
        if where is None and exc.errno in WRITE_ERRORS and self._staged:  # a write() names no file
            return _os_error(exc, self._staged[0][1], "write the output")
        return exc

    def discard(self) -> None:
        """Remove whatever is still staged, and the journal."""
        for staged, _ in self._staged:
            _remove(staged)
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)
        self._release_journal()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if kind is None:
                self.commit()
            elif isinstance(exc, OSError):
                raise self._as_output_error(exc) from None
        finally:
            self.discard()
            for lock in self._locks:
                lock.release()
