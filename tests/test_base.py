"""``--base`` as peft reads it: a local directory, or an ``owner/name`` Hub id resolved through the Hugging
Face cache (offline here, in a cache the test builds); without ``--base``, the base every adapter names in
``base_model_name_or_path``, when it resolves.

The adapters below save a classifier head whose initial value the base holds; without a base the merge
is refused (their heads would be measured against zero), so a merge that succeeds and records the base
shows that the base was found, read and used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import base_model_files, random_adapter
from hubcache import make_hub_cache, use_offline_cache
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedbip_cli.cli import app

SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.value": (8, 6)}
HEAD = "base_model.model.classifier.weight"
runner = CliRunner()


def head_adapter(directory: Path, seed: int, declared: str) -> Path:
    """A random LoRA adapter that also saves a (3, 8) classifier and names ``declared`` as its base."""
    random_adapter(directory, SHAPES, torch.Generator().manual_seed(seed))
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=declared, modules_to_save=["classifier"])
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors[HEAD] = torch.randn(3, 8, generator=torch.Generator().manual_seed(100 + seed))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def base_files() -> dict[str, bytes]:
    """The base: zero weights at every adapted module, and the classifier's initial value."""
    return base_model_files({**SHAPES, "classifier": (3, 8)})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An offline Hub cache holding ``org/encoder``; the working directory is ``tmp_path``. Returns its commit."""
    use_offline_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    return make_hub_cache(tmp_path / "hub", "org/encoder", base_files())


def merge(*args: object):
    return runner.invoke(app, ["merge", *map(str, args), "--no-cache"])


def manifest(out: Path) -> dict:
    return json.loads((out / "fedbip-manifest.json").read_text())


def test_a_hub_id_is_a_base_as_peft_reads_it(hub: str, tmp_path: Path) -> None:
    for i in range(2):
        head_adapter(tmp_path / "clients" / f"c{i}", i, "tiny-base")
    result = merge("clients", "--base", "org/encoder", "--out", "merged")
    assert result.exit_code == 0, result.output
    record = manifest(tmp_path / "merged")
    assert record["base"] == {"source": "hf://org/encoder", "revision": hub}
    assert f"--base hf://org/encoder@{hub}" in record["command"] and record["parts"]["against_zero"] == []
    # A Hub id missing from the offline cache says so, naming the cache.
    missing = merge("clients", "--base", "org/other", "--out", "other")
    assert missing.exit_code == 1 and "not in the local Hub cache" in missing.stderr


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(hub: str, tmp_path: Path) -> None:
    for i in range(2):
        head_adapter(tmp_path / "clients" / f"c{i}", i, "tiny-base")
    (tmp_path / "org" / "encoder").mkdir(parents=True)
    for name, data in base_files().items():
        (tmp_path / "org" / "encoder" / name).write_bytes(data)
    assert merge("clients", "--base", "org/encoder", "--out", "merged").exit_code == 0
    assert manifest(tmp_path / "merged")["base"] == {"source": "org/encoder", "revision": None}


def test_without_base_the_adapters_own_base_is_used_when_it_resolves(hub: str, tmp_path: Path) -> None:
    for i in range(2):
        head_adapter(tmp_path / "named" / f"c{i}", i, "org/encoder")
    result = merge("named", "--out", "merged")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "merged")["base"] == {"source": "hf://org/encoder", "revision": hub}

    # One that does not resolve, or two different ones: no base, and the heads are refused as before.
    for i, declared in enumerate(("org/nowhere", "org/nowhere")):
        head_adapter(tmp_path / "lost" / f"c{i}", i, declared)
    for i, declared in enumerate(("org/encoder", "org/nowhere")):
        head_adapter(tmp_path / "mixed" / f"c{i}", i, declared)
    for clients, said in (("lost", "--heads own"), ("mixed", "different base models")):
        refused = merge(clients, "--out", f"out-{clients}")
        assert refused.exit_code == 1 and said in refused.stderr, refused.output
    # With --heads own no base is needed; the run records none.
    assert merge("lost", "--heads", "own", "--out", "own").exit_code == 0
    assert manifest(tmp_path / "own")["base"] is None
