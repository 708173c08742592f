"""The machine interface: ``--json`` outputs match the JSON schemas in ``schemas/``, exit codes are
0 / 1 / 2, and nothing carries colour or progress when stdout and stderr are not a terminal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from factories import base_model_files, random_adapter
from hubcache import make_hub_cache, repository_files, use_offline_cache
from safetensors import safe_open
from typer.testing import CliRunner

from fedbip_cli.cli import app

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.value": (8, 6)}
runner = CliRunner()
ANSI = "\x1b"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def json_output(*args: str) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SOURCES mixing a Hub repository of two adapters and a local directory of two, plus ``--base`` on the Hub."""
    use_offline_cache(monkeypatch, tmp_path / "hub")
    built = {
        n: random_adapter(tmp_path / "build" / n, SHAPES, torch.Generator().manual_seed(i)) for i, n in enumerate("ab")
    }
    make_hub_cache(tmp_path / "hub", "org/adapters", repository_files(built))
    make_hub_cache(tmp_path / "hub", "org/base", base_model_files(SHAPES))
    for i, name in enumerate("cd"):
        random_adapter(tmp_path / "local" / name, SHAPES, torch.Generator().manual_seed(10 + i))
    return ["hf://org/adapters", str(tmp_path / "local"), "--base", "hf://org/base"]


def test_merge_summaries_match_the_schema(inputs: list[str], tmp_path: Path) -> None:
    schema = validator("merge-summary.schema.json")
    outputs = [
        json_output("merge", *inputs, "--out", tmp_path / "o1", "--json", "--lock", tmp_path / "fedbip.lock"),
        json_output(
            "merge", *inputs, "--out", tmp_path / "o2", "--json", "--layerwise", "--combine", "linear", "--no-cache"
        ),
        json_output(
            "merge", *inputs, "--out", tmp_path / "o3", "--json", "--granularity", "module", "--combine", "cat"
        ),
    ]
    for summary in outputs:
        schema.validate(summary)
    assert outputs[0]["lock"]["written"] is True and outputs[1]["lock"] is None
    assert outputs[1]["energy_kept"]["a"] == {"min": None, "mean": None} and outputs[2]["rank"] is None
    # The schema is not vacuous: an undocumented field or a missing one is caught.
    for broken in ({**outputs[0], "extra": 1}, {k: v for k, v in outputs[0].items() if k != "clients"}):
        assert not schema.is_valid(broken)
    bad_hash = copy.deepcopy(outputs[0])
    bad_hash["outputs"]["a"]["a/README.md"] = "not-a-sha256"
    assert not schema.is_valid(bad_hash)


def test_inspect_json_matches_the_schema(inputs: list[str]) -> None:
    schema = validator("inspect.schema.json")
    for granularity in ("model", "block", "module"):
        data = json_output("inspect-similarity", *inputs, "--format", "json", "--granularity", granularity)
        schema.validate(data)
        assert data["cache"]["computed"] + data["cache"]["hits"] > 0
    assert not schema.is_valid({**data, "groups": {"model": {"similarity": [[2.0]], "modules": ["m"], "norms": [1.0]}}})


def test_matrix_file_holds_what_the_json_leaves_out(inputs: list[str], tmp_path: Path) -> None:
    """``--matrix FILE``: the float64 matrices in a safetensors file, bit for bit the JSON's, and the
    JSON (still valid against the schema) without them."""
    schema = validator("inspect.schema.json")
    full = json_output("inspect-similarity", *inputs, "--format", "json", "--layerwise")
    path = tmp_path / "sim.safetensors"
    lean = json_output("inspect-similarity", *inputs, "--format", "json", "--layerwise", "--matrix", path)
    schema.validate(lean)
    assert lean["matrix"] == str(path) and all("similarity" not in g for g in lean["groups"].values())
    assert {k: v for k, v in lean.items() if k not in ("matrix", "groups", "cache")} == {
        k: v for k, v in full.items() if k not in ("groups", "cache")
    }
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert json.loads(metadata["clients"]) == full["clients"] and metadata["granularity"] == "block"
        assert json.loads(metadata["similarity"]) == {"method": "exact"}
        assert sorted(f.keys()) == sorted(full["groups"])
        for name, group in full["groups"].items():
            matrix = f.get_tensor(name)
            assert matrix.dtype == torch.float64 and matrix.tolist() == group["similarity"]
            assert lean["groups"][name]["norms"] == group["norms"]
    assert not list(tmp_path.glob(".sim.safetensors.*"))  # written atomically, nothing left behind
    result = runner.invoke(
        app, ["inspect-similarity", *inputs, "--matrix", str(tmp_path / "missing" / "m.safetensors")]
    )
    assert result.exit_code == 1 and "directory does not exist" in result.output


def test_dry_run_plan_matches_the_schema(inputs: list[str], tmp_path: Path) -> None:
    schema = validator("dry-run.schema.json")
    plan = json_output(
        "merge",
        *inputs,
        "--out",
        tmp_path / "o",
        "--dry-run",
        "--json",
        "--lock",
        tmp_path / "l.json",
        "--cache",
        tmp_path / "c",
    )
    schema.validate(plan)
    assert [c["revision"] is not None for c in plan["clients"]] == [True, True, False, False]
    assert plan["base"]["revision"] is not None and plan["lock"] == {"file": str(tmp_path / "l.json"), "locked": False}
    assert not any((tmp_path / name).exists() for name in ("o", "l.json", "c"))  # a dry run writes nothing
    broken = copy.deepcopy(plan)
    broken["clients"][0]["revision"] = "main"  # a branch name is not a resolved commit
    assert not schema.is_valid(broken)


def test_exit_codes(inputs: list[str], tmp_path: Path) -> None:
    assert runner.invoke(app, ["merge", *inputs, "--out", str(tmp_path / "ok")]).exit_code == 0
    assert (
        runner.invoke(
            app, ["merge", "hf://org/missing", str(tmp_path / "local"), "--out", str(tmp_path / "x")]
        ).exit_code
        == 1
    )
    assert runner.invoke(app, ["merge", *inputs, "--out", str(tmp_path / "x"), "--combine", "mean"]).exit_code == 2
    assert runner.invoke(app, ["merge", *inputs, "--out", str(tmp_path / "x"), "--no-such-flag"]).exit_code == 2


# --- no colour, no progress when piped ------------------------------------------------------------


def run_piped(args: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run fedbip in a subprocess with stdout and stderr on pipes, in an environment that asks for colour when it can."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "NO_COLOR", "PY_COLORS", "TTY_COMPATIBLE", "GITHUB_ACTIONS")
    }
    env.update(TERM="xterm-256color", COLORTERM="truecolor", **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "fedbip_cli", *args], capture_output=True, text=True, env=env, check=False
    )


def test_no_ansi_escapes_when_piped(tmp_path: Path) -> None:
    for i in range(3):
        random_adapter(tmp_path / "clients" / f"c{i}", SHAPES, torch.Generator().manual_seed(i))
    clients, out = str(tmp_path / "clients"), str(tmp_path / "out")
    runs = [
        (["inspect-similarity", clients, "--layerwise"], {}, 0),  # coloured cells on a terminal
        (["merge", clients, "--out", out], {}, 0),  # progress bar and table on a terminal
        (["merge", clients, "--out", out], {}, 1),  # busy --out: an error with a hint
        (["merge", clients, "--out", out, "--combine", "mean"], {}, 2),
        # GitHub Actions runs commands on pipes; its log viewer is no reason to colour them.
        (["inspect-similarity", clients], {"GITHUB_ACTIONS": "true"}, 0),
        (["merge", clients, "--out", out], {"GITHUB_ACTIONS": "true"}, 1),
    ]
    for args, extra, code in runs:
        done = run_piped(args, **extra)
        assert done.returncode == code, (args, done.stderr)
        assert ANSI not in done.stdout and ANSI not in done.stderr, (args, extra, done.stdout, done.stderr)
        assert (done.stdout + done.stderr).strip()
    usage = run_piped(["merge", clients, "--no-such-flag"])  # typer's own usage message
    assert usage.returncode == 2 and ANSI not in usage.stderr and "No such option" in usage.stderr

    # The check can fail: asked explicitly, colour is there.
    forced = run_piped(["inspect-similarity", clients], FORCE_COLOR="1")
    assert forced.returncode == 0 and ANSI in forced.stdout


def test_no_ansi_escapes_under_clirunner(tmp_path: Path) -> None:
    for i in range(3):
        random_adapter(tmp_path / "clients" / f"c{i}", SHAPES, torch.Generator().manual_seed(i))
    table = runner.invoke(app, ["inspect-similarity", str(tmp_path / "clients")], env={"TERM": "xterm-256color"})
    error = runner.invoke(app, ["inspect-similarity", str(tmp_path / "missing")], env={"TERM": "xterm-256color"})
    assert table.exit_code == 0 and error.exit_code == 1
    for result in (table, error):
        assert ANSI not in result.stdout and ANSI not in result.stderr
    assert "c2" in table.stdout and "error:" in error.stderr


# --- one interface for every command: --json, JSON errors, --config --------------------------------


def test_errors_under_json_are_one_json_object_with_the_same_exit_code(inputs: list[str], tmp_path: Path) -> None:
    """Every kind of failure, from the parser to the operating system, of every command: under --json,
    stdout holds exactly one object of ``error.schema.json`` and the exit code is the one without --json."""
    schema = validator("error.schema.json")
    (tmp_path / "bad.toml").write_text("combine = 3\n")
    cases = [
        (["merge", *inputs, "--out", tmp_path / "x", "--combine", "mean"], 2, "usage"),
        (["merge", *inputs, "--out", tmp_path / "x", "--no-such-flag"], 2, "usage"),
        (["merge", "--config", tmp_path / "bad.toml"], 2, "usage"),
        (["merge", "hf://org/missing", "--out", tmp_path / "x"], 1, "source"),
        (["inspect-similarity", tmp_path / "missing"], 1, "source"),
        (["inspect-similarity", *inputs, "--heads", "mine"], 2, "usage"),
        (["simulate", "--engine", "grpc", "--out", tmp_path / "s"], 2, "usage"),
        (["simulate", "--compare", "fedbip,fedprox", "--out", tmp_path / "s"], 2, "usage"),
    ]
    for args, code, kind in cases:
        plain = runner.invoke(app, [str(a) for a in args])
        result = runner.invoke(app, [*map(str, args), "--json"])
        assert (plain.exit_code, result.exit_code) == (code, code), (args, plain.output, result.output)
        error = json.loads(result.stdout)  # one object, nothing else
        schema.validate(error)
        assert error["code"] == kind and error["message"], (args, error)
        assert result.stderr == "", (args, result.stderr)
    assert not schema.is_valid({"code": "usage", "message": "m"})  # the schema can fail: hint is required


def test_inspect_takes_json_and_a_config_file(inputs: list[str], tmp_path: Path) -> None:
    schema = validator("inspect.schema.json")
    by_format = json_output("inspect-similarity", *inputs, "--format", "json", "--layerwise")
    by_flag = json_output("inspect-similarity", *inputs, "--json", "--layerwise")
    schema.validate(by_flag)
    strip = lambda d: {k: v for k, v in d.items() if k != "cache"}  # noqa: E731 -- the second run hits the cache
    assert strip(by_flag) == strip(by_format)
    both = runner.invoke(app, ["inspect-similarity", *inputs, "--json", "--format", "csv"])
    assert both.exit_code == 2 and json.loads(both.stdout)["code"] == "usage"

    # The file a merge reads: sources, base and options (out, a merge's own key, is checked, not used).
    # A config names paths inside its own directory: it sits beside the local adapters.
    config = tmp_path / "fedbip-inspect.toml"
    config.write_text(f'sources = ["{inputs[0]}", "local"]\nbase = "{inputs[3]}"\nlayerwise = true\nout = "merged"\n')
    from_file = json_output("inspect-similarity", "--config", config, "--json")
    assert strip(from_file) == strip(by_format)
    model = json_output("inspect-similarity", "--config", config, "--json", "--granularity", "model")
    assert model["granularity"] == "model"  # the command line overrides the file


def test_every_json_output_has_a_schema() -> None:
    """Each command with --json names the schema of what it prints; every schema is a valid one."""
    names = {p.name for p in SCHEMAS.glob("*.schema.json")}
    assert {
        "merge-summary.schema.json",
        "dry-run.schema.json",
        "inspect.schema.json",
        "simulate-summary.schema.json",
        "error.schema.json",
    } <= names
    for name in names:
        validator(name)
