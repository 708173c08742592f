"""Several seeds in one run (mean ± sd, per-seed numbers, resume per seed and strategy) and
``--overwrite`` that keeps the previous run until the new one has succeeded.

Tiny runs: the embedded MiniLM cut to 2 layers, 4 clients, 300 sentences, 2 rounds of 1 step.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.runner import simulate
from fedbip_cli.simulate.seeds import aggregate, mean_sd, parse_seeds

CONFIG = SimulationConfig(
    strategies=("fedbip", "local"),
    num_layers=2,
    batch_size=8,
    local_steps=1,
    rounds=2,
    clients=4,
    groups=2,
    max_examples=300,
    examples_per_client=None,
    eval_every=1,
)


class Interrupted(Exception):
    pass


pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py


def without_seconds(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary with every wall-clock timing removed, at any depth."""
    if isinstance(summary, dict):
        return {k: without_seconds(v) for k, v in summary.items() if k != "seconds"}
    if isinstance(summary, list):
        return [without_seconds(v) for v in summary]
    return summary


def test_parse_seeds() -> None:
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    assert parse_seeds("7") == [7]
    for bad, needle in (("0,x", "'x' is not"), ("1,-2", "'-2' is not"), ("1,1", "given twice"), ("", "'' is not")):
        with pytest.raises(UsageError, match=needle):
            parse_seeds(bad)


def test_mean_and_sample_sd_by_hand() -> None:
    # 0.5, 0.7, 0.9: mean 0.7, sample variance (0.04 + 0 + 0.04) / 2 = 0.04, sd 0.2
    stat = mean_sd([0.5, 0.7, 0.9])
    assert stat["mean"] == pytest.approx(0.7) and stat["sd"] == pytest.approx(0.2)
    assert mean_sd([0.3])["sd"] is None
    per_seed = {
        0: {"strategies": {"a": {"mean_accuracy": 0.5, "worst_accuracy": 0.1, "seconds": {"train": 1.0}}}},
        1: {"strategies": {"a": {"mean_accuracy": 0.9, "worst_accuracy": 0.3, "seconds": {"train": 2.0}}}},
    }
    result = aggregate(per_seed)["a"]
    assert result["mean_accuracy"]["values"] == [0.5, 0.9]
    assert result["worst_accuracy"]["mean"] == pytest.approx(0.2)
    assert result["worst_accuracy"]["sd"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert "ari" not in result and result["seconds"] == {"train": 3.0}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("seeds") / "run"
    return out, simulate(CONFIG, out, seed_list=[0, 1], device="cpu").summary


def test_each_seed_is_a_full_run_and_the_summary_holds_mean_sd_and_per_seed_numbers(
    two_seeds: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, summary = two_seeds
    assert summary["seeds"] == [0, 1]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("accuracy.png", "separation.png", "weights.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for seed in (0, 1):
        seed_summary = json.loads((out / f"seed-{seed}" / "summary.json").read_text())
        assert json.loads(json.dumps(summary["per_seed"][str(seed)])) == seed_summary
        assert seed_summary["config"]["seed"] == seed
        assert (out / f"seed-{seed}" / "checkpoints" / "fedbip.safetensors").is_file()
    for strategy in CONFIG.strategies:
        for measure in ("mean_accuracy", "worst_accuracy", "ari", "self_weight", "own_group_weight"):
            values = [summary["per_seed"][str(s)]["strategies"][strategy][measure] for s in (0, 1)]
            stat = summary["strategies"][strategy][measure]
            assert stat["values"] == values
            assert stat["mean"] == pytest.approx(statistics.fmean(values))
            assert stat["sd"] == pytest.approx(statistics.stdev(values))
    # local training keeps all of each client's weight on itself, hence on its own group
    assert summary["strategies"]["local"]["own_group_weight"]["values"] == [1.0, 1.0]
    assert summary["strategies"]["local"]["self_weight"]["values"] == [1.0, 1.0]
    # seed 1 of the multi-seed run is exactly the single-seed run with --seed 1
    single = simulate(replace(CONFIG, seed=1), tmp_path / "single", device="cpu").summary
    assert without_seconds(single) == without_seconds(summary["per_seed"]["1"])
    for name in ("metrics.jsonl", "similarity.jsonl"):
        assert (tmp_path / "single" / name).read_bytes() == (out / "seed-1" / name).read_bytes()


def test_resume_continues_per_seed_and_strategy(two_seeds: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, whole = two_seeds
    out = tmp_path / "run"
    done: list[tuple[str, int]] = []

    def stop(name: str, round_: int, accuracy: float | None) -> None:
        done.append((name, round_))
        if (name, round_) == ("seed 1 local", 1):
            raise Interrupted

    with pytest.raises(Interrupted):
        simulate(CONFIG, out, seed_list=[0, 1], device="cpu", round_done=stop)
    assert (out / "seed-0" / "summary.json").is_file() and not (out / "summary.json").exists()
    done.clear()
    resumed = simulate(CONFIG, out, seed_list=[0, 1], device="cpu", resume=True, round_done=stop)
    # only the rounds left ran: seed 0 and seed 1's fedbip were complete, seed 1's local had round 1
    assert done == [("seed 1 local", 2)]
    assert without_seconds(resumed.summary) == without_seconds(whole)


def test_overwrite_keeps_the_previous_run_until_the_new_one_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("previous run\n")
    (out / "fedbip-run.json").write_text('{"fedbip_run": 1}\n')  # a fedbip run's record: --overwrite may replace it

    def fail(name: str, round_: int, accuracy: float | None) -> None:
        raise Interrupted

    config = replace(CONFIG, strategies=("local",), rounds=1)
    with pytest.raises(Interrupted):
        simulate(config, out, overwrite=True, device="cpu", round_done=fail)
    assert sorted(p.name for p in out.iterdir()) == ["fedbip-run.json", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary sibling left

    simulate(config, out, overwrite=True, device="cpu")
    assert (out / "summary.json").is_file() and "previous run" not in (out / "metrics.jsonl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # the adapters were written beside OUT, yet name OUT/base, where the base is now
    adapter = json.loads((out / "adapters" / "client-00" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())


def test_a_flipped_bit_in_a_checkpoint_is_one_line_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = replace(CONFIG, strategies=("local",), rounds=1)
    simulate(config, out, device="cpu")
    path = out / "checkpoints" / "local.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    options = ["--compare", "local", "--rounds", "1", "--num-layers", "2", "--batch-size", "8", "--local-steps", "1"]
    options += ["--clients", "4", "--groups", "2", "--max-examples", "300", "--examples-per-client", "0"]
    result = CliRunner().invoke(app, ["simulate", *options, "--eval-every", "1", "--out", str(out), "--resume"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert str(path) in " ".join(result.stderr.split()) and "checksum does not match" in result.stderr
