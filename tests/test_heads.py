"""Saved modules (``modules_to_save``: classifier heads) are never merged blindly (``--heads``).

The scenario a new user meets first: five SEQ_CLS adapters of two conflicting tasks (three clients of task
A, two of task B, every head trained from one shared random initialisation), merged

- against the plain encoder (``BertModel``, no classifier), all a user of community adapters has: refused
  by default, naming ``--heads``; with ``--heads own`` each head is written byte for byte as its client
  saved it while the LoRA parts are compared and merged (P from the LoRA deltas alone); with ``--heads
  exclude`` the outputs carry no head; with ``--heads merge`` the heads are merged against zero, knowingly;
- against the model the adapters were trained from (``BertForSequenceClassification``, initial head
  included): merged, and no head weight crosses the tasks.

The reference is written here in float64 from the adapter files: ΔW = s·B·A per LoRA module, cosines,
FedBip's P (S⁺ normalised per row).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peftkinds import FAMILIES, perturb
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import BertModel
from typer.testing import CliRunner

from fedbip_cli.cli import app

TASKS = {"a0": 1.0, "a1": 1.0, "a2": 1.0, "b0": -1.0, "b1": -1.0}  # the sign of each client's task
HEAD = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")
SCALE = 2.0  # lora_alpha / r
runner = CliRunner()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The with-head base, the plain encoder (its ``bert`` part), and the five clients' adapters."""
    root = tmp_path_factory.mktemp("heads")
    family = FAMILIES["bert"]
    with_head = family.save_base(root / "with-head")
    plain = root / "encoder"
    BertModel.from_pretrained(with_head).save_pretrained(plain, safe_serialization=True)
    config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
    for i, (name, sign) in enumerate(TASKS.items()):
        model = get_peft_model(family.load(with_head), config)
        perturb(model, "default", sign=sign, seed=100 + i)
        model.save_pretrained(root / "clients" / name, safe_serialization=True)
    return {"with_head": with_head, "plain": plain, "clients": root / "clients", "root": root}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def lora_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """s·B·A in float64 per adapted module of the adapter in ``directory``."""
    tensors = load_file(directory / "adapter_model.safetensors")
    config = json.loads((directory / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removesuffix(".lora_A.weight"): scale
        * tensors[key.replace("lora_A", "lora_B")].double()
        @ tensors[key].double()
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def paper_weights(deltas: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """FedBip's P from the cosine of the clients' concatenated deltas."""
    names = sorted(deltas[0])
    x = torch.stack([torch.cat([d[n].flatten() for n in names]) for d in deltas])
    norms = x.norm(dim=1)
    positive = ((x @ x.T) / torch.outer(norms, norms)).clamp(min=0)
    return positive / positive.sum(dim=1, keepdim=True)


def manifest(out: Path) -> dict:
    return json.loads((out / "fedbip-manifest.json").read_text())


def raw(path: Path, key: str) -> bytes:
    """A stored tensor's bytes, dtype and shape as written."""
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        tensor = f.get_tensor(key)
    return tensor.numpy().tobytes() + str((tensor.dtype, tuple(tensor.shape))).encode()


def test_against_the_plain_encoder_a_merge_is_refused_naming_heads(scenario: dict[str, Path]) -> None:
    for command in ("merge", "inspect-similarity"):
        extra = ("--out", scenario["root"] / "refused") if command == "merge" else ()
        result = invoke(command, scenario["clients"], "--base", scenario["plain"], *extra)
        assert result.exit_code == 1, result.output
        assert "classifier" in result.stderr and "--heads own" in result.stderr and "--heads merge" in result.stderr
        assert "--base" in result.stderr
    assert not (scenario["root"] / "refused").exists()
    # Without --base, the adapters' own base_model_name_or_path (the model they were trained from, initial
    # head included) is the base: no refusal.
    declared = invoke("merge", scenario["clients"], "--out", scenario["root"] / "declared")
    assert declared.exit_code == 0, declared.output
    assert manifest(scenario["root"] / "declared")["base"]["source"] == str(scenario["with_head"])


def test_heads_own_keeps_every_head_byte_identical_and_merges_the_lora_parts(
    scenario: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "own"
    result = invoke(
        "merge", scenario["clients"], "--base", scenario["plain"], "--heads", "own", "--combine", "cat", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "--heads own" in result.stdout  # the table says what the similarity covers
    record = manifest(out)
    names = record["clients"]
    assert record["covers"] == {"parts": {"lora": 4}, "heads": "own", "left_out": ["classifier"]}
    assert "--heads own" in record["command"] and record["parts"]["against_zero"] == []
    inputs = [lora_deltas(scenario["clients"] / n) for n in names]
    weights = paper_weights(inputs)
    got = torch.tensor(record["groups"]["model"]["weights"], dtype=torch.float64)
    assert torch.allclose(got, weights, atol=1e-9), (got - weights).abs().max()
    sign = torch.tensor([TASKS[n] for n in names])
    assert float(weights[torch.outer(sign, sign) < 0].max()) == 0.0  # the LoRA parts tell the tasks apart
    for i, name in enumerate(names):
        for key in HEAD:
            assert raw(out / name, key) == raw(scenario["clients"] / name, key), (name, key)
        merged = lora_deltas(out / name)
        for module, delta in merged.items():
            want = sum(float(weights[i, j]) * inputs[j][module] for j in range(len(names)))
            assert torch.allclose(delta, want, atol=1e-6, rtol=0), (name, module)
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier"] and config["bias"] == "none"


def test_heads_exclude_writes_no_head_and_merge_takes_them_against_zero(
    scenario: dict[str, Path], tmp_path: Path
) -> None:
    common = (scenario["clients"], "--base", scenario["plain"])
    assert invoke("merge", *common, "--heads", "exclude", "--out", tmp_path / "x").exit_code == 0
    excluded = manifest(tmp_path / "x")
    assert excluded["covers"]["heads"] == "exclude" and excluded["covers"]["parts"] == {"lora": 4}
    for name in excluded["clients"]:
        with safe_open(str(tmp_path / "x" / name / "adapter_model.safetensors"), framework="pt") as f:
            assert not [k for k in f.keys() if "classifier" in k]
        assert json.loads((tmp_path / "x" / name / "adapter_config.json").read_text())["modules_to_save"] is None
    assert invoke("merge", *common, "--heads", "merge", "--out", tmp_path / "m").exit_code == 0
    merged = manifest(tmp_path / "m")
    assert merged["covers"] == {"parts": {"lora": 4, "saved": 2}, "heads": "merge", "left_out": []}
    assert sorted(merged["parts"]["against_zero"]) == ["classifier.bias", "classifier.weight"]


def test_with_the_base_holding_the_initial_head_no_head_weight_crosses_the_tasks(
    scenario: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", scenario["clients"], "--base", scenario["with_head"], "--out", out)
    assert result.exit_code == 0, result.output
    record = manifest(out)
    names = record["clients"]
    assert record["covers"]["heads"] == "merge" and record["parts"]["against_zero"] == []
    weights = torch.tensor(record["groups"]["model"]["weights"], dtype=torch.float64)
    sign = torch.tensor([TASKS[n] for n in names])
    assert float(weights[torch.outer(sign, sign) < 0].max()) == 0.0
    assert float((weights - torch.diag(weights.diagonal())).max()) > 0.1  # clients of one task do borrow
    initial = load_file(scenario["with_head"] / "model.safetensors")
    heads = [load_file(scenario["clients"] / n / "adapter_model.safetensors") for n in names]
    for i, name in enumerate(names):
        written = load_file(out / name / "adapter_model.safetensors")
        for key in HEAD:
            base = initial[key.removeprefix("base_model.model.")].double()
            want = base + sum(float(weights[i, j]) * (heads[j][key].double() - base) for j in range(len(names)))
            assert torch.allclose(written[key].double(), want, atol=1e-6), (name, key)
            other = [j for j in range(len(names)) if sign[j] != sign[i]]
            assert all(float(weights[i, j]) == 0.0 for j in other)
