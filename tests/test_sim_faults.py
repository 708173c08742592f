"""Faults of ``fedbip simulate`` end in one clean line and lose nothing.

An infinite learning rate, a concentration of 0, training that diverges (NaN is not JSON, and would
poison the server step), a full disk while safetensors writes, a checkpoint that is a directory or
a link to a device, and a run killed while ``--overwrite`` swaps it in (merge's journal recovers it).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

from fedbip_cli import outdir
from fedbip_cli.cli import app
from fedbip_cli.errors import AdapterError, FedbipError, UsageError
from fedbip_cli.simulate import checkpoint, runner
from fedbip_cli.simulate.loop import RUN_RECORD, SimulationConfig, check_finite

TINY = SimulationConfig(
    strategies=("fedavg",),
    num_layers=1,
    batch_size=4,
    max_length=16,
    local_steps=1,
    rounds=1,
    clients=2,
    groups=1,
    max_examples=40,
    examples_per_client=None,
    eval_every=1,
)
cli = CliRunner()


def one_error_line(result, needle: str, code: int) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), result.stderr


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--lr", "inf"], "--lr inf"),
        (["--lr", "nan"], "--lr nan"),
        (["--alpha", "0"], "--alpha 0"),
        (["--alpha", "0", "--partition", "dirichlet"], "--alpha 0"),
    ],
)
def test_bad_numbers_are_refused_not_replaced(tmp_path: Path, options: list[str], needle: str) -> None:
    out = tmp_path / "out"
    args = ["simulate", *options, "--rounds", "1", "--clients", "2", "--num-layers", "1", "--out", str(out)]
    one_error_line(cli.invoke(app, args), needle, 2)
    assert not out.exists()


def test_diverged_training_stops_before_the_server_step() -> None:
    good = {"w": torch.ones(2)}
    check_finite("fedavg", 1, {"c0": 0.5}, {"c0": good})
    with pytest.raises(FedbipError, match="fedavg round 3, client c1 has a non-finite loss"):
        check_finite("fedavg", 3, {"c0": 0.5, "c1": float("nan")}, {"c0": good, "c1": good})
    with pytest.raises(FedbipError, match="client c0 has a non-finite weight"):
        check_finite("fedavg", 1, {"c0": 0.5}, {"c0": {"w": torch.tensor([1.0, float("inf")])}})
    with pytest.raises(FedbipError, match=r"client \\x1b\]0;x has"):  # a name is shown escaped
        check_finite("fedavg", 1, {"\x1b]0;x": float("inf")}, {"\x1b]0;x": good})


def test_a_huge_learning_rate_ends_in_one_line_and_no_nan_is_written(tmp_path: Path) -> None:
    with pytest.raises(FedbipError, match="training diverged"):
        runner.simulate(replace(TINY, lr=1e3, local_steps=3), tmp_path / "out", device="cpu")
    metrics = tmp_path / "out" / "metrics.jsonl"
    if metrics.exists():  # rounds before the divergence: valid JSON only
        for line in metrics.read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_a_checkpoint_that_is_not_a_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "fedavg.safetensors"
    assert not checkpoint.present(path)
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(AdapterError, match="not a file fedbip wrote"):
        checkpoint.present(path)


def test_resume_over_a_checkpoint_directory_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / "fedavg.safetensors").mkdir(parents=True)
    (out / RUN_RECORD).write_text('{"fedbip_run": 1}\n')
    args = ["simulate", *tiny_options()]
    one_error_line(cli.invoke(app, [*args, "--out", str(out), "--resume"]), "is a directory", 1)
    assert (out / "checkpoints" / "fedavg.safetensors").is_dir()


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as caught, runner.written_as_os_errors():
        runner.simulate(TINY, tmp_path / "out", device="cpu")
    assert caught.value.errno == errno.ENOSPC
    assert not list((tmp_path / "out" / "checkpoints").glob(".*.tmp"))
    result = cli.invoke(app, ["simulate", *tiny_options(), "--out", str(tmp_path / "cli")])
    one_error_line(result, "No space left on device", 1)


def tiny_options() -> list[str]:
    return [
        "--strategy",
        "fedavg",
        "--rounds",
        "1",
        "--clients",
        "2",
        "--groups",
        "1",
        "--num-layers",
        "1",
        "--batch-size",
        "4",
    ]


def test_a_killed_overwrite_is_recovered_by_the_journal(tmp_path: Path) -> None:
    """simulate --overwrite swaps with merge's journal: killed between its renames, the previous run
    is back after recovery, and nothing it staged is left."""
    out = tmp_path / "out"
    first = cli.invoke(app, ["simulate", *tiny_options(), "--examples-per-client", "4", "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    configs = list(out.glob("adapters/*/adapter_config.json"))
    assert len(configs) == 2
    for config in configs:  # peft's set, written in sorted order
        modules = json.loads(config.read_text())["target_modules"]
        assert modules == sorted(modules) and len(modules) == 2
    env = {**os.environ, "FEDBIP_TEST_KILL_AT": "swapped-0", "HF_HUB_OFFLINE": "1"}
    args = ["simulate", *tiny_options(), "--examples-per-client", "4", "--seed", "1", "--overwrite"]
    killed = subprocess.run(
        [sys.executable, "-m", "fedbip_cli", *args, "--out", str(out)], env=env, capture_output=True, timeout=600
    )
    assert killed.returncode == 137, killed.stderr
    outdir.recover(out)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".fedbip-")]


def test_usage_error_type_for_the_bad_numbers() -> None:
    with pytest.raises(UsageError):
        SimulationConfig(lr=float("inf"))
