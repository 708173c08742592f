"""Every output of a run is committed together or not at all, whatever fails and wherever a run dies.

Faults are injected at each step of the commit (``outdir.fault_point``): in-process as an exception,
and as a real kill of a subprocess (``FEDBIP_TEST_KILL_AT``); operating-system errors (disk full,
read-only) are raised where the run writes. After each, the previous OUT and lock file are intact
(byte for byte) or the new ones complete, and a later run leaves no temporaries behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli import outdir, pipeline
from fedbip_cli.cli import app
from fedbip_cli.errors import OutputError
from fedbip_cli.manifest import MANIFEST_NAME
from fedbip_cli.pipeline import MergeOptions
from tests.factories import random_adapter, write_lora_adapter

SHAPES = {"model.layers.0.q_proj": (6, 5), "model.layers.1.q_proj": (6, 5)}
STEPS = ["staged", "journal", "swapped-0", "swapped-1", "committed"]
runner = CliRunner()


def clients(root: Path, seed: int = 0, count: int = 3) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        random_adapter(root / f"c{i}", SHAPES, gen)
    return root


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes); {} when it does not exist."""
    if not path.exists():
        return {}
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".fedbip-"))


@pytest.fixture
def previous(tmp_path: Path) -> dict[str, Path]:
    """A first merge (OUT and its lock file), then other adapters for a second merge over it."""
    first = clients(tmp_path / "first", seed=0)
    out, lock = tmp_path / "out", tmp_path / "fedbip.lock"
    merged = runner.invoke(app, ["merge", str(first), "--out", str(out), "--lock", str(lock), "--device", "cpu"])
    assert merged.exit_code == 0, merged.output
    return {"second": clients(tmp_path / "second", seed=1), "out": out, "lock": lock, "root": tmp_path}


def merge_args(p: dict[str, Path]) -> list[str]:
    return ["merge", str(p["second"]), "--out", str(p["out"]), "--lock", str(p["lock"]), "--overwrite"]


@pytest.mark.parametrize("step", STEPS)
def test_an_error_at_any_step_of_the_commit_leaves_the_previous_outputs(
    previous: dict[str, Path], monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    before = (tree(previous["out"]), tree(previous["lock"]))

    def fail(at: str) -> None:
        if at == step:
            raise OSError(errno.EIO, "injected fault")

    monkeypatch.setattr(outdir, "fault_point", fail)
    result = runner.invoke(app, [*merge_args(previous), "--device", "cpu"])
    if step == "committed":  # after the commit point: the new outputs are complete and in place
        assert result.exit_code == 1
        manifest = json.loads((previous["out"] / MANIFEST_NAME).read_text())
        assert set(manifest["outputs"]) == {"c0", "c1", "c2"}
        assert tree(previous["out"]) != before[0] and tree(previous["lock"]) != before[1]
        for client, files in manifest["outputs"].items():
            assert set(files) == {f"{client}/{p.name}" for p in (previous["out"] / client).iterdir()}
    else:
        assert result.exit_code == 1, result.output
        assert (tree(previous["out"]), tree(previous["lock"])) == before
    assert "Traceback" not in result.output
    assert leftovers(previous["root"]) == []


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_is_recovered_by_the_next_run(previous: dict[str, Path], step: str) -> None:
    before = (tree(previous["out"]), tree(previous["lock"]))
    env = {**os.environ, "FEDBIP_TEST_KILL_AT": step, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "fedbip_cli", *merge_args(previous), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr
    # Right after the kill, OUT is never missing or half-written: the old one or the complete new one.
    manifest = json.loads((previous["out"] / MANIFEST_NAME).read_text())
    assert tree(previous["out"]) == before[0] or set(manifest["outputs"]) == {"c0", "c1", "c2"}
    # The next run on the same OUT (here a dry run does not touch it; a merge does) recovers first.
    outdir.recover(previous["out"])
    after = (tree(previous["out"]), tree(previous["lock"]))
    if step == "committed":
        assert after[0] != before[0] and after[1] != before[1]  # committed: both new
    else:
        assert after == before  # rolled back: both old, byte for byte
    assert leftovers(previous["root"]) == [], leftovers(previous["root"])


def test_the_next_merge_removes_what_a_killed_one_left(previous: dict[str, Path]) -> None:
    env = {**os.environ, "FEDBIP_TEST_KILL_AT": "swapped-0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedbip_cli", *merge_args(previous), "--device", "cpu"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 137
    assert leftovers(previous["root"])  # the journal and the previous OUT of the dead process
    again = runner.invoke(app, [*merge_args(previous), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert leftovers(previous["root"]) == []
    manifest = json.loads((previous["out"] / MANIFEST_NAME).read_text())
    assert all("second" in i["source"] for i in manifest["inputs"])
    assert "second" in previous["lock"].read_text() and "first" not in previous["lock"].read_text()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".fedbip-tmp-{pid}.out" / "c0").mkdir(parents=True)
    (tmp_path / f".fedbip-tmp-{pid}.out" / "c0" / "big").write_bytes(b"x" * 1000)
    (tmp_path / f".fedbip-old-{pid}.out").mkdir()
    live = tmp_path / f".fedbip-tmp-{os.getpid() + 0}.other"  # another target: not ours to touch
    live.mkdir()
    result = runner.invoke(app, ["merge", str(clients(tmp_path / "in")), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == [live.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(
    previous: dict[str, Path], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    before = (tree(previous["out"]), tree(previous["lock"]))
    from fedbip_cli import adapters

    def refuse(self: object, data: bytes, mode: str = "ab") -> None:
        raise OSError(code, os.strerror(code))  # as a failed write(): no file name

    monkeypatch.setattr(adapters.StreamingAdapterWriter, "_append", refuse)
    result = runner.invoke(app, [*merge_args(previous), "--device", "cpu"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(previous["out"]) in lines[0]
    assert ("disk full" if code == errno.ENOSPC else "Read-only") in lines[0]
    assert (tree(previous["out"]), tree(previous["lock"])) == before
    assert leftovers(previous["root"]) == []


def test_out_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    result = runner.invoke(app, ["merge", str(clients(tmp_path / "in")), "--out", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "afile" in result.output
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_a_lock_file_that_cannot_be_written_fails_before_out_is_replaced(previous: dict[str, Path]) -> None:
    before = tree(previous["out"])
    lock = previous["root"] / "missing-dir" / "fedbip.lock"
    args = ["merge", str(previous["second"]), "--out", str(previous["out"]), "--lock", str(lock), "--overwrite"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "directory does not exist" in result.output
    assert tree(previous["out"]) == before
    assert leftovers(previous["root"]) == []


def test_two_runs_cannot_write_one_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = outdir.DirectoryLock(out.absolute())
    holder.acquire()
    try:
        result = runner.invoke(app, ["merge", str(clients(tmp_path / "in")), "--out", str(out)])
    finally:
        holder.release()
    assert result.exit_code == 1 and "another fedbip run is writing" in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def overflowing(root: Path, dtype: torch.dtype, value: float) -> Path:
    """Three clients; c0's factors near ``value``, so that merged factors overflow ``dtype``."""
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        factors = {
            m: (torch.randn(2, n_in, generator=gen), torch.full((n_out, 2), value if i == 0 else 0.5))
            for m, (n_out, n_in) in SHAPES.items()
        }
        # Scale 8: cat writes c0's B times 8 times its weight, beyond the largest finite value.
        write_lora_adapter(root / f"c{i}", factors, r=2, lora_alpha=16, dtype=dtype)
    return root


@pytest.mark.parametrize(
    ("dtype", "value", "options"),
    [(torch.float32, 3e38, []), (torch.float16, 65504.0, []), (torch.float32, 1e5, ["--dtype", "float16"])],
)
def test_non_finite_outputs_fail_the_run_before_anything_is_written(
    tmp_path: Path, dtype: torch.dtype, value: float, options: list[str]
) -> None:
    sources = overflowing(tmp_path / "in", dtype, value)
    result = runner.invoke(app, ["merge", str(sources), "--out", str(tmp_path / "out"), "--combine", "cat", *options])
    assert result.exit_code == 1, result.output
    assert "not finite" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_finite_checks_each_written_tensor() -> None:
    assert torch.equal(outdir.finite(torch.ones(3), "t", "c"), torch.ones(3))
    with pytest.raises(OutputError, match="2 of 3 values of t are not finite in float16"):
        outdir.finite(torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float16), "t", "c")


def test_inspect_writes_the_heatmap_and_the_matrix_together_or_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedbip_cli import report

    sources = clients(tmp_path / "in")
    heatmap, matrix = tmp_path / "s.png", tmp_path / "s.safetensors"

    def full_disk(result: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "write_matrices", full_disk)
    args = ["inspect-similarity", str(sources), "--heatmap", str(heatmap), "--matrix", str(matrix)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "disk full" in result.output and str(matrix) in result.output
    assert not heatmap.exists() and not matrix.exists() and leftovers(tmp_path) == []


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path: Path) -> None:
    sources = clients(tmp_path / "in")
    process = subprocess.Popen(
        [sys.executable, "-m", "fedbip_cli", "merge", str(sources), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # in the middle of importing torch
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_library_merge_commits_the_lock_with_the_outputs(tmp_path: Path) -> None:
    sources = clients(tmp_path / "in")
    workspace = pipeline.load([str(sources)], lock=tmp_path / "l.lock")
    result = pipeline.merge(workspace, MergeOptions(device="cpu"), tmp_path / "out")
    assert result.lock_written and (tmp_path / "l.lock").is_file()
    inside = pipeline.load([str(sources)], lock=tmp_path / "out2" / "l.lock")
    with pytest.raises(OutputError, match="lock file lies inside --out"):
        pipeline.merge(inside, MergeOptions(device="cpu"), tmp_path / "out2")


def killed_at(previous: dict[str, Path], step: str) -> None:
    env = {**os.environ, "FEDBIP_TEST_KILL_AT": step, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedbip_cli", *merge_args(previous), "--device", "cpu"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 137


def test_a_reused_pid_does_not_hide_a_dead_run(previous: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container a later process often gets the killed one's pid: recovery must still roll back.
    Here every pid is alive (reused); the dead run is known by the lock nobody holds on its journal."""
    before = (tree(previous["out"]), tree(previous["lock"]))
    killed_at(previous, "swapped-0")
    monkeypatch.setattr(outdir, "_pid_alive", lambda run: True)
    outdir.recover(previous["out"])
    assert (tree(previous["out"]), tree(previous["lock"])) == before
    assert leftovers(previous["root"]) == []


def test_a_rerun_with_the_dead_runs_pid_recovers_and_commits(
    previous: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    killed_at(previous, "swapped-1")
    dead = next(p.name for p in previous["root"].iterdir() if p.name.startswith(outdir.JOURNAL))
    pid = int(dead.removeprefix(outdir.JOURNAL).split("-")[0])
    monkeypatch.setattr(os, "getpid", lambda: pid)  # this run has the killed one's pid
    again = runner.invoke(app, [*merge_args(previous), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert leftovers(previous["root"]) == []
    manifest = json.loads((previous["out"] / MANIFEST_NAME).read_text())
    assert all("second" in i["source"] for i in manifest["inputs"])


def test_roll_back_never_removes_an_output_committed_since(previous: dict[str, Path]) -> None:
    """A dead run's uncommitted journal names OUT's inodes; if OUT has another inode now (a later run
    committed it), rolling back must leave it."""
    killed_at(previous, "swapped-0")
    out = previous["out"]
    later = out.parent / "later"
    later.mkdir()
    (later / "kept.txt").write_text("committed by a later run")
    os.rename(out, out.parent / "gone")
    os.rename(later, out)
    outdir.recover(out)
    assert tree(out) == {"kept.txt": b"committed by a later run"}
