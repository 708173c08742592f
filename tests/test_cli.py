"""The fedbip command line end to end: every command, its output formats, and every user error.

Errors must be one line naming the file and the problem, plus a hint, exit code 1 (2 for usage),
no traceback, and nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import random_adapter, random_factors, write_lora_adapter
from hubcache import make_hub_cache, use_offline_cache
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedbip_cli.cli import app

SHAPES = {
    "encoder.layer.0.attention.self.query": (8, 6),
    "encoder.layer.0.attention.self.value": (8, 6),
    "encoder.layer.1.attention.self.query": (8, 6),
}
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    """Four clients: two pairs of near-identical task vectors."""
    root = tmp_path / "adapters"
    for pair in range(2):
        g = torch.Generator().manual_seed(pair)
        random_adapter(root / f"task{pair}-a", SHAPES, g)
        g = torch.Generator().manual_seed(pair)
        random_adapter(root / f"task{pair}-b", SHAPES, g, lora_alpha=5)  # same direction, other scale
    return root


def assert_user_error(result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.stderr and "hint:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_version_and_help_show_examples() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("fedbip ")
    for command in ("merge", "inspect-similarity"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.stdout and f"fedbip {command}" in result.stdout


def test_console_script_and_module_entry_points(adapters: Path) -> None:
    exe = Path(sys.executable).parent / "fedbip"
    for command in ([str(exe)], [sys.executable, "-m", "fedbip_cli"]):
        done = subprocess.run(
            [*command, "inspect-similarity", str(adapters), "--format", "csv"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "group,client_i,client_j,similarity"


def test_inspect_json_is_the_only_stdout(adapters: Path) -> None:
    result = invoke("inspect-similarity", adapters, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["clients"] == ["task0-a", "task0-b", "task1-a", "task1-b"]
    assert data["granularity"] == "model"
    s = data["groups"]["model"]["similarity"]
    assert s[0][1] == pytest.approx(1.0, abs=1e-6)  # same direction, other scale
    assert abs(s[0][2]) < 0.9


def test_inspect_layerwise_table_and_heatmap(adapters: Path, tmp_path: Path) -> None:
    png = tmp_path / "heat.png"
    result = invoke("inspect-similarity", adapters, "--layerwise", "--heatmap", png)
    assert result.exit_code == 0, result.output
    assert "task1-b" in result.stdout and "encoder.layer.1" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(invoke("inspect-similarity", adapters, "--granularity", "module", "--format", "json").stdout)
    assert list(data["groups"]) == list(SHAPES)


def test_merge_writes_adapters_and_manifest(adapters: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", adapters, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["clients"] == sorted(p.name for p in adapters.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["fedbip-manifest.json", *summary["clients"]]
    for client in summary["clients"]:
        assert {p.name for p in (out / client).iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }
    weights = summary["weights"]["model"]
    assert all(abs(sum(row) - 1) < 1e-12 for row in weights)
    assert weights[0][0] == pytest.approx(weights[0][1]) and weights[0][1] > weights[0][2]
    manifest = json.loads((out / "fedbip-manifest.json").read_text())
    assert manifest["options"]["combine"] == "svd" and manifest["rank"] == 2
    # human output, layer-wise
    result = invoke("merge", adapters, "--out", out, "--layerwise", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "energy kept" in result.stdout and "task0-b" in result.stdout
    assert json.loads((out / "fedbip-manifest.json").read_text())["granularity"] == "block"


def test_dry_run_prints_plan_and_writes_nothing(adapters: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", adapters, "--out", out, "--dry-run", "--json", "--combine", "cat")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and [c["name"] for c in plan["clients"]][0] == "task0-a"
    assert plan["modules"] == 3 and plan["groups"] == {"model": 3}
    # cat: rank 4 x 2 per module, (8 + 6) float32 per rank, 3 modules, 4 clients
    assert plan["output_bytes"] == 8 * 14 * 4 * 3 * 4
    result = invoke("merge", adapters, "--out", out, "--dry-run", "--layerwise")
    assert result.exit_code == 0 and "task1-b" in result.stdout
    assert not out.exists()


def test_hub_sources_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, adapters: Path) -> None:
    cache = tmp_path / "hub"
    files = {f"{c.name}/{f.name}": f.read_bytes() for c in sorted(adapters.iterdir()) for f in sorted(c.iterdir())}
    commit = make_hub_cache(cache, "org/community-adapters", files)
    use_offline_cache(monkeypatch, cache)
    out = tmp_path / "merged"
    result = invoke("merge", "hf://org/community-adapters", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "fedbip-manifest.json").read_text())
    assert [i["revision"] for i in manifest["inputs"]] == [commit] * 4
    assert manifest["inputs"][0]["source"].startswith("hf://org/community-adapters")
    result = invoke("inspect-similarity", "hf://org/missing-repo", "--format", "json")
    assert result.exit_code == 1 and result.stderr == ""  # --format json: the error is JSON on stdout
    assert json.loads(result.stdout)["message"].startswith("hf://org/missing-repo")
    assert_user_error(invoke("inspect-similarity", "hf://org/missing-repo"), "hf://org/missing-repo")


def corrupt(root: Path, how: str) -> str:
    """Break client task0-a in one way; return text the error must contain."""
    client = root / "task0-a"
    config_path = client / "adapter_config.json"
    weights = client / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    module = "base_model.model.encoder.layer.0.attention.self.query"
    if how == "bad-json":
        config_path.write_text("{not json")
        return "adapter_config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-20])
        return "corrupt or truncated"
    if how == "garbage":
        weights.write_bytes(b"\x00" * 64)
        return "corrupt or truncated"
    if how in ("ab-mismatch", "nan", "zero", "dora-tensor", "lora-bias"):
        g = torch.Generator().manual_seed(7)
        factors = {m: (torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)) for m in SHAPES}
        if how == "nan":
            factors["encoder.layer.0.attention.self.query"][0][0, 0] = float("nan")
        if how == "zero":
            factors = {m: (a, torch.zeros_like(b)) for m, (a, b) in factors.items()}
        write_lora_adapter(client, factors, r=2, lora_alpha=4)
        if how in ("dora-tensor", "lora-bias", "ab-mismatch"):
            tensors = load_file(str(weights))
            if how == "ab-mismatch":
                tensors[f"{module}.lora_B.weight"] = torch.randn(8, 3)
            else:
                extra = "lora_magnitude_vector" if how == "dora-tensor" else "lora_B.bias"
                tensors[f"{module}.{extra}"] = torch.ones(8)
            save_file(tensors, str(weights))
        return {
            "ab-mismatch": "ranks differ",
            "nan": "NaN",
            "zero": "task vector is zero",
            "dora-tensor": "DoRA",
            "lora-bias": "LoRA bias",
        }[how]
    if how == "shape-across":
        g = torch.Generator().manual_seed(3)
        random_adapter(client, {**SHAPES, "encoder.layer.0.attention.self.query": (8, 5)}, g)
        return "in client"
    if how == "use-dora":
        config["use_dora"] = True
    elif how == "prefix-tuning":
        config["peft_type"] = "PREFIX_TUNING"
    elif how == "bias-all":  # a trained bias is a change of the base's: it needs --base
        config["bias"] = "all"
        tensors = load_file(str(weights))
        tensors[f"{module}.bias"] = torch.ones(8)
        save_file(tensors, str(weights))
    elif how == "rank-0":
        config["r"] = 0
    elif how == "pickle":
        weights.rename(client / "adapter_model.bin")
        return "pickled"
    elif how == "config-rank":
        config["r"] = 3
        config_path.write_text(json.dumps(config))
        return "r=3"
    config_path.write_text(json.dumps(config))
    return {"use-dora": "DoRA", "prefix-tuning": "PREFIX_TUNING", "bias-all": "--base", "rank-0": "r=0"}[how]


@pytest.mark.parametrize(
    "how",
    [
        "bad-json",
        "truncated",
        "garbage",
        "ab-mismatch",
        "nan",
        "zero",
        "dora-tensor",
        "lora-bias",
        "shape-across",
        "use-dora",
        "prefix-tuning",
        "bias-all",
        "rank-0",
        "pickle",
        "config-rank",
    ],
)
def test_bad_adapter_is_one_line_error_and_nothing_written(adapters: Path, tmp_path: Path, how: str) -> None:
    needle = corrupt(adapters, how)
    out = tmp_path / "merged"
    result = invoke("merge", adapters, "--out", out)
    assert_user_error(result, needle, "task0-a")
    assert not out.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_missing_config_in_explicit_adapter_dir(adapters: Path, tmp_path: Path) -> None:
    (adapters / "task0-a" / "adapter_config.json").unlink()
    result = invoke("merge", adapters / "task0-a", adapters / "task0-b", "--out", tmp_path / "o")
    assert_user_error(result, "task0-a")


def test_source_and_output_errors(adapters: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("merge", adapters / "task0-a", "--out", tmp_path / "o"), "at least 2 clients")
    other = tmp_path / "other"
    random_adapter(other / "task0-a", SHAPES, torch.Generator().manual_seed(9))
    assert_user_error(invoke("merge", adapters, other, "--out", tmp_path / "o"), "task0-a")  # duplicate name
    assert_user_error(invoke("merge", tmp_path / "nope", "--out", tmp_path / "o"), "nope")
    assert_user_error(invoke("merge", adapters, "--out", adapters / "merged"), "inside the source")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    assert_user_error(invoke("merge", adapters, "--out", busy), "not empty", "--overwrite")
    assert (busy / "keep.txt").read_text() == "precious"


def test_usage_errors_exit_2(adapters: Path, tmp_path: Path) -> None:
    # Named values are choices of the parser, refused before any import of torch (tests/test_startup.py).
    result = invoke("merge", adapters, "--out", tmp_path / "o", "--combine", "mean")
    assert result.exit_code == 2 and "'svd', 'cat', 'linear'" in result.stderr, result.output
    result = invoke("merge", adapters, "--out", tmp_path / "o", "--weighting", "magic")
    assert result.exit_code == 2 and "'paper', 'softmax'" in result.stderr, result.output
    assert invoke("inspect-similarity", adapters, "--format", "xml").exit_code == 2
    assert invoke("merge", adapters).exit_code == 2  # --out is required
    assert not (tmp_path / "o").exists()


def test_debug_variable_shows_traceback(adapters: Path, tmp_path: Path) -> None:
    corrupt(adapters, "nan")
    env = {**os.environ, "FEDBIP_DEBUG": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedbip_cli", "merge", str(adapters), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr and "AdapterError" in done.stderr


def test_a_client_and_its_negated_copy_fail_cleanly_under_keep(tmp_path: Path) -> None:
    """Rows of S/Σ_j S_ij that sum to exactly 0 under --negative keep: one error line, no ±inf weights, no output."""
    gen = torch.Generator().manual_seed(8)
    factors = random_factors(SHAPES, gen)
    write_lora_adapter(tmp_path / "in" / "c0", factors, r=2, lora_alpha=4)
    negated = {m: (a, -b) for m, (a, b) in factors.items()}
    write_lora_adapter(tmp_path / "in" / "c1", negated, r=2, lora_alpha=4)
    out = tmp_path / "out"

    result = invoke("merge", tmp_path / "in", "--out", out, "--negative", "keep")

    assert_user_error(result, "sum to", "unbounded", "--negative clip")
    assert not out.exists()
