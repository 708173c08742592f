"""``fedbip --help`` and ``--version`` answer at once: they import none of the heavy libraries.

Each command imports torch and the modules built on it in its body (see ``fedbip_cli/cli.py``); a
top-level import of one of them anywhere on the CLI's import path would make every ``--help`` take
seconds. The checks run the real entry point in a fresh interpreter with ``-X importtime`` and read
the modules it loaded; how long that takes is measured by ``benchmarks/startup.py``, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedbip_cli import __version__

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "numpy", "scipy", "matplotlib", "safetensors", "huggingface_hub", "transformers", "peft"}


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m fedbip_cli ARGS``; return the process and every module it imported."""
    process = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedbip_cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Lines read "import time: <self us> | <cumulative us> | <indent><module>"; the first is a header.
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in process.stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("imported package")
    }
    return process, modules


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--help",), "inspect-similarity"),
        (("--version",), f"fedbip {__version__}"),
        (("merge", "--help"), "--max-shard-size"),
        (("inspect-similarity", "--help"), "--sketch-dim"),
        (("simulate", "--help"), "--participation"),
    ],
)
def test_help_and_version_import_no_heavy_library(args: tuple[str, ...], expected: str) -> None:
    process, modules = imported_modules(*args)
    assert process.returncode == 0, process.stderr
    assert expected in process.stdout
    # The parse found the CLI itself, so an empty intersection below is not a parse that found nothing.
    assert {"fedbip_cli.cli", "typer"} <= modules
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []


def test_help_shows_the_defaults_from_the_light_module() -> None:
    """The defaults moved out of sketch.py and shards.py still reach the help text and their old homes."""
    from fedbip_cli import shards, sketch
    from fedbip_cli.defaults import DEFAULT_DIM, DEFAULT_MAX_SHARD_SIZE, MAX_DIM

    assert (sketch.DEFAULT_DIM, sketch.MAX_DIM, shards.DEFAULT_MAX_SHARD_SIZE) == (
        DEFAULT_DIM,
        MAX_DIM,
        DEFAULT_MAX_SHARD_SIZE,
    )
    process, _ = imported_modules("merge", "--help")
    words = " ".join(process.stdout.replace("│", " ").split())  # help text wrapped inside a rich panel
    assert f"default {DEFAULT_MAX_SHARD_SIZE})" in words


@pytest.mark.parametrize(
    "args",
    [
        ("merge", "adapters/", "--out", "merged", "--combine", "mean"),
        ("merge", "adapters/", "--out", "merged", "--heads", "mine", "--json"),
        ("merge", "adapters/", "--out", "merged", "--dtype", "float8"),
        ("inspect-similarity", "adapters/", "--format", "xml"),
        ("inspect-similarity", "adapters/", "--similarity", "hash", "--json"),
        ("simulate", "--engine", "grpc"),
        ("simulate", "--device", "tpu", "--json"),
    ],
)
def test_a_bad_option_value_is_refused_before_torch_is_imported(args: tuple[str, ...]) -> None:
    """A mistyped value is refused while parsing (exit 2), without waiting seconds for torch to load."""
    process, modules = imported_modules(*args)
    assert process.returncode == 2, process.stdout + process.stderr
    assert "fedbip_cli.cli" in modules
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    if "--json" in args:
        assert '"code": "usage"' in process.stdout
    else:
        assert "Invalid value" in process.stderr


def test_the_light_names_are_the_registries_names() -> None:
    """The names the parser checks are the ones the combine and weighting registries hold."""
    from fedbip_cli import defaults
    from fedbip_cli.merge import COMBINERS
    from fedbip_cli.options import OUTPUT_DTYPES
    from fedbip_cli.weights import WEIGHTINGS

    assert tuple(COMBINERS) == defaults.COMBINE_NAMES and tuple(WEIGHTINGS) == defaults.WEIGHTING_NAMES
    assert defaults.DTYPE_NAMES == ("auto", *OUTPUT_DTYPES)
