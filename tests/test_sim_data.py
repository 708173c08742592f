"""Hostile ``--data`` files: one clean SourceError naming the file (and line), never a traceback.

Every client file is read whole through the bounded reader, so a CSV cell over csv's field limit, a
JSON row nested 100 000 deep, bytes that are not UTF-8 or a named pipe are refused like any input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedbip_cli.errors import SourceError
from fedbip_cli.simulate.data import load_client_files


def good(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"sentence number {i}", "label": i % 2} for i in range(6)]
    (directory / "alpha.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / "beta.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(6)))


def huge_cell(directory: Path) -> str:
    (directory / "beta.csv").write_text("text,label\nfine,0\n" + '"' + "x" * 200_000 + '",1\nok,1\n')
    return "beta.csv:3"


def deep_row(directory: Path) -> str:
    (directory / "alpha.jsonl").write_text('{"text": "a", "label": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    return "alpha.jsonl:2"


def not_utf8(directory: Path) -> str:
    (directory / "beta.csv").write_bytes(b"text,label\n\xff\xfe bad,0\nok,1\n")
    return "beta.csv"


def nan_label(directory: Path) -> str:
    (directory / "alpha.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": NaN}\n')
    return "alpha.jsonl:2"


def a_pipe(directory: Path) -> str:
    (directory / "beta.csv").unlink()
    os.mkfifo(directory / "beta.csv")
    return "beta.csv"


@pytest.mark.parametrize("make", [huge_cell, deep_row, not_utf8, nan_label, a_pipe], ids=lambda f: f.__name__)
def test_hostile_data_files_are_one_clean_error(tmp_path: Path, make: Callable[[Path], str]) -> None:
    good(tmp_path)
    assert len(load_client_files(tmp_path)[0]) == 2  # the good files load
    where = make(tmp_path)
    with pytest.raises(SourceError) as caught:
        load_client_files(tmp_path)
    assert where in str(caught.value)
    assert "\n" not in str(caught.value)
