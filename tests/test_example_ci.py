"""The CI example (``examples/ci``) run locally: the workflow's own ``fedbip`` commands, on its
``fedbip.toml``, against a Hub cache laid out here (offline, huggingface_hub's real code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from factories import base_model_files, random_adapter
from hubcache import make_hub_cache, repository_files

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ci"
# MiniLM's attention projections, two of its six blocks, at a small width: the test checks the
# pipeline's mechanics, not the numbers.
SHAPES = {f"encoder.layer.{b}.attention.self.{m}": (8, 8) for b in range(2) for m in ("query", "value")}


def workflow_steps() -> list[dict]:
    workflow = yaml.safe_load((EXAMPLE / "merge-adapters.yml").read_text())
    return workflow["jobs"]["merge"]["steps"]


def fedbip_commands() -> list[str]:
    """The workflow's ``run`` lines that call fedbip, in order."""
    return [step["run"] for step in workflow_steps() if step.get("run", "").startswith("fedbip ")]


class Pipeline:
    """A checkout of a pipeline repository: the example's fedbip.toml, local adapters, and a Hub cache."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        shutil.copy(EXAMPLE / "fedbip.toml", self.repo)
        config = tomllib.loads((self.repo / "fedbip.toml").read_text())
        hub_spec, local_spec = config["sources"]
        self.hub_repo = hub_spec.removeprefix("hf://")
        self.base_repo = config["base"].removeprefix("hf://")
        for i, name in enumerate(("in-house-a", "in-house-b")):
            random_adapter(self.repo / local_spec / name, SHAPES, torch.Generator().manual_seed(100 + i), r=4)
        self.hub = tmp_path / "hub"
        self.commit = self.push_hub_adapters(seed=0)
        make_hub_cache(self.hub, self.base_repo, base_model_files(SHAPES, {"model_type": "bert"}))
        self.out = self.repo / config["out"]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
            "HF_HUB_CACHE": str(self.hub),
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the fedbip console script
        }

    def push_hub_adapters(self, seed: int) -> str:
        """A commit on the Hub repository's main: four community adapters (seeded)."""
        built = {
            name: random_adapter(self.tmp / f"build{seed}" / name, SHAPES, torch.Generator().manual_seed(seed + i), r=4)
            for i, name in enumerate(("billing", "returns", "shipping", "warranty"))
        }
        return make_hub_cache(self.hub, self.hub_repo, repository_files(built))

    def sh(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True, check=False
        )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("example-ci"))


def test_workflow_runs_the_locked_merge_and_uploads_its_outputs() -> None:
    commands = fedbip_commands()
    assert commands == [
        "fedbip merge --config fedbip.toml --locked --dry-run",
        "fedbip merge --config fedbip.toml --locked --json > merge-summary.json",
    ]
    upload = next(step for step in workflow_steps() if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"].split() == ["merged/", "merge-summary.json"]
    config = tomllib.loads((EXAMPLE / "fedbip.toml").read_text())
    assert config["lock"] == "fedbip.lock" and config["out"] == "merged"


def test_the_workflow_commands_locally(pipeline: Pipeline) -> None:
    # The developer's side: a merge without --locked writes fedbip.lock, which is committed.
    first = pipeline.sh("fedbip merge --config fedbip.toml")
    assert first.returncode == 0, first.stderr
    lock = json.loads((pipeline.repo / "fedbip.lock").read_text())
    assert {e["revision"] for e in lock["sources"][f"hf://{pipeline.hub_repo}"].values()} == {pipeline.commit}

    # CI's side: exactly the workflow's commands.
    for command in fedbip_commands():
        done = pipeline.sh(command)
        assert done.returncode == 0, (command, done.stderr)
    summary = json.loads((pipeline.repo / "merge-summary.json").read_text())
    schema = json.loads((ROOT / "schemas" / "merge-summary.schema.json").read_text())
    jsonschema.validate(summary, schema)
    clients = ["billing", "returns", "shipping", "warranty", "in-house-a", "in-house-b"]
    assert summary["clients"] == clients and summary["granularity"] == "block"
    assert summary["lock"] == {"file": str(pipeline.repo / "fedbip.lock"), "locked": True, "written": False}
    assert summary["cache"]["dir"] == str(pipeline.repo / ".fedbip-cache")
    assert summary["cache"]["computed"] == 0  # the developer's run filled the cache with every pair
    for client in clients:
        assert (pipeline.out / client / "README.md").is_file() and (
            pipeline.out / client / "adapter_model.safetensors"
        ).is_file()
    manifest = json.loads((pipeline.out / "fedbip-manifest.json").read_text())
    assert manifest["options"]["top_k"] == 4 and manifest["base"]["source"] == f"hf://{pipeline.base_repo}"
    assert all(1 <= sum(1 for w in row if w) <= 4 for w in summary["weights"].values() for row in w)


def test_the_workflow_fails_when_the_hub_moves(pipeline: Pipeline) -> None:
    assert pipeline.sh("fedbip merge --config fedbip.toml").returncode == 0
    manifest = (pipeline.out / "fedbip-manifest.json").read_bytes()
    moved = pipeline.push_hub_adapters(seed=50)
    for command in fedbip_commands():
        done = pipeline.sh(command)
        assert done.returncode == 1, (command, done.stdout)
        # the error: a line on stderr, or under --json one JSON object on stdout (here the redirect's file)
        said = done.stderr + done.stdout
        if "--json >" in command:
            error = json.loads((pipeline.repo / command.rsplit(">", 1)[1].strip()).read_text())
            said += error["message"]
        assert f"hf://{pipeline.hub_repo}" in said and moved in said and pipeline.commit in said
    assert (pipeline.out / "fedbip-manifest.json").read_bytes() == manifest  # nothing merged from the moved inputs

    # Accepting the new revisions (the developer's run again) makes the workflow pass, computing
    # only the pairs that involve the four changed adapters.
    accepted = pipeline.sh("fedbip merge --config fedbip.toml --json")
    assert accepted.returncode == 0, accepted.stderr
    modules, moved_clients, total = len(SHAPES), 4, 6
    cache = json.loads(accepted.stdout)["cache"]
    assert cache["computed"] == modules * (
        moved_clients * (moved_clients + 1) // 2 + moved_clients * (total - moved_clients)
    )
    assert all(pipeline.sh(command).returncode == 0 for command in fedbip_commands())
