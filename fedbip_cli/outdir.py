"""The output directory of a merge: checked against the inputs, written beside, moved into place whole.

Every output of a run is written into one temporary directory next to OUT, which replaces OUT only
when everything in it is complete; on any failure the temporary directory is removed and OUT is
left as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedbip_cli.errors import OutputError


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an ``out`` inside or around one of ``inputs``, not a directory, or (unless ``overwrite``) not empty."""
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
    if real.is_dir() and any(real.iterdir()) and not overwrite:
        raise OutputError(
            "output directory exists and is not empty",
            where=str(out),
            hint="pass --overwrite to replace it, or choose another --out",
        )


@contextmanager
def atomic_output(out: Path, inputs: Sequence[Path], *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out`` that replaces it when the block succeeds.

    ``out`` is checked first (``check_out``); on any failure the temporary directory is removed and
    ``out`` is left as it was.
    """
    check_out(out, inputs, overwrite)
    tmp = out.parent / f".{out.name}.fedbip-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an old ``out`` is removed only after the move."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.fedbip-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
