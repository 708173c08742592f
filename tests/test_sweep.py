"""``fedbip merge --sweep``: each swept set byte-identical to the single merge with its options, the
similarity computed once, and the sweep's options checked before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinybase import TinySet, tiny_bert
from typer.testing import CliRunner

from fedbip_cli import pipeline
from fedbip_cli.cli import app
from fedbip_cli.errors import UsageError
from fedbip_cli.options import MergeOptions
from fedbip_cli.sweep import sweep_settings
from fedbip_cli.weights import WeightOptions

runner = CliRunner()
SWEEP = ["--sweep", "temperature=0.5,2", "--sweep", "top-k=2,4"]
SETS = ["temperature=0.5,top-k=2", "temperature=0.5,top-k=4", "temperature=2,top-k=2", "temperature=2,top-k=4"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> TinySet:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def merge(bert: TinySet, out: Path, *options: str) -> None:
    args = ["merge", str(bert.adapters), "--base", str(bert.base), "--out", str(out), "--device", "cpu", "--no-cache"]
    result = runner.invoke(app, [*args, "--weighting", "softmax", *options])
    assert result.exit_code == 0, result.output


def test_each_swept_set_is_the_single_merge_byte_for_byte(bert: TinySet, tmp_path: Path) -> None:
    merge(bert, tmp_path / "sweep", *SWEEP)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted([*SETS, "fedbip-sweep.json"])
    record = json.loads((tmp_path / "sweep" / "fedbip-sweep.json").read_text())
    assert record["sets"]["temperature=2,top-k=4"]["temperature"] == 2.0
    assert record["sets"]["temperature=2,top-k=4"]["top_k"] == 4
    single = {}
    for name in SETS:
        options = [f"--{part.replace('=', ' ')}" for part in name.split(",")]
        merge(bert, tmp_path / name, *" ".join(options).split())
        single[name] = files(tmp_path / name)
        assert files(tmp_path / "sweep" / name) == single[name]
    assert len({json.dumps(sorted(map(str, s.values()))) for s in single.values()}) == len(SETS)  # 4 different merges


def test_a_sweep_replaces_only_its_own_sets(bert: TinySet, tmp_path: Path) -> None:
    """--overwrite replaces an earlier sweep (its record names the sets, each set's manifest its
    files) but never a directory holding anything else, a user's file inside a set included."""
    merge(bert, tmp_path / "sweep", *SWEEP)
    merge(bert, tmp_path / "sweep", *SWEEP, "--overwrite")
    mine = tmp_path / "sweep" / SETS[0] / "notes.txt"
    mine.write_text("mine")
    args = ["merge", str(bert.adapters), "--base", str(bert.base), "--out", str(tmp_path / "sweep"), "--no-cache"]
    result = runner.invoke(app, [*args, "--weighting", "softmax", *SWEEP, "--overwrite"])
    assert result.exit_code != 0 and "notes.txt" in result.output
    assert mine.read_text() == "mine"


def test_the_similarity_is_computed_once(bert: TinySet, tmp_path: Path) -> None:
    stages: list[str] = []

    def progress(stage: str, total: int):
        stages.append(stage)
        return lambda n: None

    workspace = pipeline.load([str(bert.adapters)], base=str(bert.base))
    settings = sweep_settings(MergeOptions(device="cpu", weights=WeightOptions("softmax")), ["temperature=0.5,1,2"])
    results = pipeline.merge_sweep(workspace, settings, tmp_path / "out", progress=progress)
    assert stages.count("similarity") == 1 and stages.count("write") == 3
    assert [r.out for r in results] == [(tmp_path / "out" / name).absolute() for name, _ in settings]
    assert results[0].similarity is results[2].similarity


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["heat=1,2"], "KEY one of weighting, negative, temperature, top-k, combine, rank"),
        (["temperature"], "expected KEY=V1,V2"),
        (["top-k=2,2"], "every value once"),
        (["top-k=2", "top-k=3"], "given twice"),
        (["top-k=two"], "not an integer"),
        (["temperature=0.5,inf"], "temperature: inf is outside 1e-06 - 1e+06"),
        (["negative=keep,none"], "sweep setting negative=none: unknown negative mode 'none'"),
        (["combine=svd,best"], "unknown combine"),
    ],
)
def test_bad_sweeps_are_refused_with_the_setting_named(entries: list[str], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        sweep_settings(MergeOptions(), entries)
    assert message in str(raised.value) or message in (raised.value.hint or "")


def test_a_sweep_is_refused_before_any_output(bert: TinySet, tmp_path: Path) -> None:
    args = ["merge", str(bert.adapters), "--base", str(bert.base), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--sweep", "top-k=1,0"])
    assert result.exit_code == 2 and "top-k 0 must be at least 1" in result.stderr
    result = runner.invoke(app, [*args, "--sweep", "top-k=1,2", "--dry-run"])
    assert result.exit_code == 2 and "--dry-run" in result.stderr
    assert not (tmp_path / "out").exists()
