"""Names and values reach the terminal escaped and cut: no markup, no control characters, no floods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli import lockfile
from fedbip_cli.cli import app
from fedbip_cli.errors import SourceError
from fedbip_cli.shown import shown
from fedbip_cli.simulate.data import load_client_files
from fedbip_cli.simulate.model import _sorted_module_lists
from fedbip_cli.sources import resolve_sources
from tests.factories import random_adapter

SHAPES = {"model.layers.0.q_proj": (6, 5)}
runner = CliRunner()


def test_shown_escapes_controls_and_cuts() -> None:
    assert shown("c1") == "c1"
    assert shown("a\x1b]0;title\x07b\nc\u202ed") == "a\\x1b]0;title\\x07b\\x0ac\\u202ed"
    long = shown("k" * 600_000)
    assert len(long) <= 200 and "…(600000 characters)…" in long


def test_client_names_are_printed_as_they_are(tmp_path: Path) -> None:
    """``[b]c1`` must not render as a bold ``c1`` posing as another client; an OSC sequence is not sent raw."""
    gen = torch.Generator().manual_seed(0)
    for name in ("[b]c1", "c1", "x\x1b]0;owned\x07"):
        random_adapter(tmp_path / "in" / name, SHAPES, gen)
    result = runner.invoke(app, ["merge", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "[b]c1" in result.stdout and "\x1b]" not in result.stdout and "\x07" not in result.stdout


def test_an_error_line_is_cut(tmp_path: Path) -> None:
    missing = tmp_path / ("k" * 5000)
    result = runner.invoke(app, ["merge", str(missing), str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines[0]) <= 520 and "characters)" in lines[0], lines[0][:100]


def test_simulate_writes_target_modules_sorted(tmp_path: Path) -> None:
    """peft writes its set in the hash seed's order: the file must not depend on it."""
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"target_modules": ["value", "query", "key"], "modules_to_save": ["z", "a"], "r": 2}))
    _sorted_module_lists(path)
    config = json.loads(path.read_text())
    assert config == {"target_modules": ["key", "query", "value"], "modules_to_save": ["a", "z"], "r": 2}


@pytest.mark.parametrize(
    ("first", "second"), [("Client", "client"), ("caf\u00e9", "cafe\u0301"), ("\ufb01le", "file"), ("c1", "c1")]
)
def test_names_that_collide_on_a_case_insensitive_or_normalising_file_system(
    tmp_path: Path, first: str, second: str
) -> None:
    """OUT/<client> of both would be one directory on macOS or Windows: refused, naming both."""
    gen = torch.Generator().manual_seed(0)
    random_adapter(tmp_path / "a" / first, SHAPES, gen)
    random_adapter(tmp_path / "b" / second, SHAPES, gen)
    with pytest.raises(SourceError, match="duplicate client names") as caught:
        resolve_sources([str(tmp_path / "a"), str(tmp_path / "b")])
    assert repr(first) in caught.value.message or first == second


def test_simulate_client_files_that_collide_are_refused(tmp_path: Path) -> None:
    row = json.dumps({"text": "a sentence", "label": "x"}) + "\n"
    for name in ("Alpha", "alpha", "beta"):
        (tmp_path / f"{name}.jsonl").write_text(row * 4)
    with pytest.raises(SourceError, match="the same name"):
        load_client_files(tmp_path, test_fraction=0.25, seed=0)


def test_a_sparse_adapters_shape_mismatch_is_found_from_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 GiB adapter (a hole: no disk) whose header shows another shape is refused before any of its
    bytes are read or hashed, even with --lock (which hashes every file)."""
    gen = torch.Generator().manual_seed(0)
    random_adapter(tmp_path / "in" / "c0", SHAPES, gen)
    random_adapter(tmp_path / "in" / "c1", SHAPES, gen)
    module, (_, n_in) = next(iter(SHAPES.items()))
    wide = 2**27  # 2 × 2²⁷ float32: 1 GiB of A
    header = {
        f"base_model.model.{module}.lora_A.weight": {"dtype": "F32", "shape": [2, wide], "data_offsets": [0, 8 * wide]},
        f"base_model.model.{module}.lora_B.weight": {
            "dtype": "F32",
            "shape": [6, 2],
            "data_offsets": [8 * wide, 8 * wide + 48],
        },
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = tmp_path / "in" / "c1" / "adapter_model.safetensors"
    with weights.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + 8 * wide + 48)

    def never(path: Path) -> str:
        raise AssertionError(f"{path} was hashed before its header was checked")

    monkeypatch.setattr(lockfile, "file_sha256", never)
    args = ["merge", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--lock", str(tmp_path / "l.lock")]
    result = runner.invoke(app, [*args, "--no-cache"])
    assert result.exit_code == 1, result.output
    assert f"is 6x{wide} here but 6x{n_in}" in result.stderr, result.stderr
    assert weights.stat().st_blocks * 512 < 2**20
