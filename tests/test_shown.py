"""Names and values reach the terminal escaped and cut: no markup, no control characters, no floods."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.shown import shown
from fedbip_cli.simulate.model import _sorted_module_lists
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
