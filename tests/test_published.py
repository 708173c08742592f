"""Nothing local in what a merge publishes: cards, manifest and lock name every source as the user gave it.

A CI runner merges from its temporary directory and pushes the outputs, cards included, to the Hub; the
runner's absolute paths must not go with them. The merge here runs inside ``tmp_path`` with relative
SOURCES (a directory, a single adapter, an @list), a relative ``--base`` and a relative lock file, then
again from a config file; no byte of any file it wrote may hold ``tmp_path`` (as given or resolved).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import base_model_files, random_adapter
from typer.testing import CliRunner

from fedbip_cli.cli import app

SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.value": (8, 6)}
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Adapters, a base and an @list under ``tmp_path``, which becomes the working directory."""
    for i, name in enumerate(("a", "b")):
        random_adapter(tmp_path / "adapters" / name, SHAPES, torch.Generator().manual_seed(i))
    random_adapter(tmp_path / "more" / "c", SHAPES, torch.Generator().manual_seed(7))
    random_adapter(tmp_path / "listed" / "d", SHAPES, torch.Generator().manual_seed(8))
    (tmp_path / "sources.txt").write_text("listed/d\n")
    (tmp_path / "base").mkdir()
    for name, data in base_model_files(SHAPES).items():
        (tmp_path / "base" / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def leaks(root: Path, files: list[Path]) -> dict[str, str]:
    """Each file under ``files`` (directories walked) whose bytes hold ``root``, as given or resolved."""
    needles = {str(root).encode(), str(root.resolve()).encode()}
    found = {}
    for item in files:
        for path in sorted(item.rglob("*")) if item.is_dir() else [item]:
            if path.is_file() and any(n in path.read_bytes() for n in needles):
                found[str(path.relative_to(root))] = path.read_text(errors="replace")[:200]
    return found


def test_no_absolute_local_path_reaches_any_output(workdir: Path) -> None:
    args = ["adapters/", "more/c", "@sources.txt", "--base", "base", "--lock", "fedbip.lock", "--out", "merged"]
    result = runner.invoke(app, ["merge", *args, "--no-cache"])
    assert result.exit_code == 0, result.output
    assert leaks(workdir, [workdir / "merged", workdir / "fedbip.lock"]) == {}
    record = json.loads((workdir / "merged" / "fedbip-manifest.json").read_text())
    assert [i["source"] for i in record["inputs"]] == ["adapters/a", "adapters/b", "more/c", "listed/d"]
    assert record["base"]["source"] == "base"
    assert "adapters/ more/c @sources.txt --out OUT --base base" in record["command"]
    card = (workdir / "merged" / "a" / "README.md").read_text()
    assert "`adapters/a`" in card

    # The check can fail: a source given by its absolute path is published as given.
    absolute = runner.invoke(app, ["merge", str(workdir / "adapters"), "more/c", "--out", "abs", "--no-cache"])
    assert absolute.exit_code == 0, absolute.output
    assert "abs/fedbip-manifest.json" in leaks(workdir, [workdir / "abs"])


def test_a_config_file_publishes_its_sources_as_written(workdir: Path) -> None:
    (workdir / "merge.toml").write_text('sources = ["adapters", "more/c"]\nout = "merged"\n')
    result = runner.invoke(app, ["merge", "--config", "merge.toml", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert leaks(workdir, [workdir / "merged"]) == {}
    record = json.loads((workdir / "merged" / "fedbip-manifest.json").read_text())
    assert [i["source"] for i in record["inputs"]] == ["adapters/a", "adapters/b", "more/c"]
