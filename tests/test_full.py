"""Full fine-tuned checkpoints against a dense float64 reference written out here.

The reference reads every model with safetensors' own ``load_file`` (not fedbip's reader), takes
ΔW = W − W_base in float64, groups tensors by their module path with a regex written here, and
computes cosines, FedBip weights, W_base + Σ_j P_ij ΔW_j and dense truncated SVDs directly. Outputs
are read back with ``load_file``, ``AutoModel.from_pretrained`` and ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from factories import random_adapter
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, invoke
from test_engine import reference_cosine, reference_paper_weights, tree_bytes
from test_peft_roundtrip import energy_kept, forward, load_peft, peft_loras, relative_error
from tinybase import FullSet, full_bert, full_gpt2
from transformers import AutoModel

from fedbip_cli import pipeline
from fedbip_cli.checkpoints import INDEX_NAME, WEIGHTS_NAME
from fedbip_cli.manifest import MANIFEST_NAME
from fedbip_cli.pipeline import MergeOptions

GRANULARITIES = ("model", "block", "module")
SIM_ATOL = 1e-10  # similarities are float64 throughout
CHUNK = 64  # elements per range read: every matrix of the tiny models is read in several ranges
BERT_LINEAR = 13  # 6 linear layers per block, 2 blocks, and the pooler


# --- the dense float64 reference -------------------------------------------------------------------


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, as stored (all safetensors files, sharded or not)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@dataclass(frozen=True)
class Reference:
    full: FullSet
    base: dict[str, torch.Tensor]  # as stored
    deltas: list[dict[str, torch.Tensor]]  # per client, float64 W − W_base for every floating tensor

    @property
    def names(self) -> list[str]:
        return sorted(self.deltas[0])


def reference(full: FullSet) -> Reference:
    base = read_model(full.base)
    deltas = []
    for client in full.clients:
        tensors = read_model(full.checkpoints / client)
        deltas.append({n: tensors[n].double() - t.double() for n, t in base.items() if t.is_floating_point()})
    return Reference(full, base, deltas)


def reference_group(name: str, granularity: str) -> str:
    """model: one group; module: the tensor's owner; block: the transformer block, else the owner."""
    module = name.rsplit(".", 1)[0]
    block = re.match(r"(encoder\.layer\.\d+|h\.\d+)\.", name)
    return {"model": "model", "module": module, "block": block[1] if block else module}[granularity]


def reference_groups(ref: Reference, granularity: str) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for name in ref.names:
        groups.setdefault(reference_group(name, granularity), set()).add(name)
    return groups


def reference_weights(ref: Reference, granularity: str) -> dict[str, torch.Tensor]:
    """Tensor -> the (K, K) FedBip weight matrix of its group, from dense cosines."""
    weights = {}
    for members in reference_groups(ref, granularity).values():
        p = reference_paper_weights(reference_cosine(ref.deltas, sorted(members)))
        weights.update({name: p for name in members})
    return weights


def reference_merged(ref: Reference, granularity: str) -> list[dict[str, torch.Tensor]]:
    """M_i = Σ_j P_ij ΔW_j for every client i and floating tensor, in float64."""
    weights = reference_weights(ref, granularity)
    return [
        {n: sum(float(weights[n][i, j]) * d[n] for j, d in enumerate(ref.deltas)) for n in ref.names}
        for i in range(len(ref.deltas))
    ]


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(full_bert(tmp_path_factory.mktemp("full-bert")))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(full_gpt2(tmp_path_factory.mktemp("full-gpt2")))


def load(ref: Reference, chunk: int | None = CHUNK) -> pipeline.Workspace:
    workspace = pipeline.load([str(ref.full.checkpoints)], base=str(ref.full.base))
    workspace.chunk_elements = chunk
    return workspace


# --- task vectors and similarity -------------------------------------------------------------------


def test_the_fixture_is_not_trivial(bert: Reference) -> None:
    """Frozen tensors are exact zeros, the others change, and clients both agree and conflict."""
    a, b, c, _ = bert.deltas
    assert all(float(d.abs().max()) == 0.0 for n, d in b.items() if n.startswith("embeddings."))
    assert all(float(d.abs().max()) > 0.0 for n, d in a.items())
    s = reference_cosine(bert.deltas, bert.names)
    assert s[0, 1] > 0.3 and s[0, 2] < -0.3


@pytest.mark.parametrize("chunk", [None, CHUNK])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_similarity_matches_dense_reference(
    model: str, granularity: str, chunk: int | None, request: pytest.FixtureRequest
) -> None:
    ref: Reference = request.getfixturevalue(model)
    result = pipeline.inspect(load(ref, chunk), granularity=granularity, device="cpu")
    expected = reference_groups(ref, granularity)
    assert result.clients == ref.full.clients
    assert {name: set(g.modules) for name, g in result.groups.items()} == expected
    if granularity == "block":
        outside = (
            {"embeddings.word_embeddings", "embeddings.LayerNorm", "pooler.dense"}
            if model == "bert"
            else {"wte", "wpe", "ln_f"}
        )
        assert outside | {"encoder.layer.1" if model == "bert" else "h.1"} <= set(expected)
    for name, group in result.groups.items():
        dense = reference_cosine(ref.deltas, sorted(expected[name]))
        assert torch.allclose(group.similarity, dense, atol=SIM_ATOL, rtol=0), name
        norms = torch.stack([torch.cat([d[n].flatten() for n in expected[name]]).norm() for d in ref.deltas])
        assert torch.allclose(group.norms, norms, rtol=1e-12, atol=0), name
    if (
        granularity == "module" and model == "bert"
    ):  # a client that left the embeddings alone is similar to no one there
        s = result.groups["embeddings.word_embeddings"].similarity
        assert s[1].tolist() == [0.0, 1.0, 0.0, 0.0]


# --- merged full checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["model", "block"])
def test_merged_checkpoints_equal_base_plus_weighted_deltas_and_load(
    bert: Reference, granularity: str, tmp_path: Path
) -> None:
    out = pipeline.merge(load(bert), MergeOptions(granularity=granularity, device="cpu"), tmp_path / "out").out
    merged = reference_merged(bert, granularity)
    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = forward(AutoModel.from_pretrained(bert.full.base).eval(), input_ids)
    worst = 0.0
    for i, client in enumerate(bert.full.clients):
        assert sorted(p.name for p in (out / client).iterdir()) == [
            "README.md",
            "config.json",
            WEIGHTS_NAME,
        ]  # README.md: the card
        assert (out / client / "config.json").read_bytes() == (bert.full.base / "config.json").read_bytes()
        got = load_file(out / client / WEIGHTS_NAME)
        assert set(got) == set(bert.base)
        expected = {n: bert.base[n].double() + merged[i][n] for n in bert.names}
        for name, value in expected.items():
            assert got[name].dtype == bert.base[name].dtype
            error = float((got[name].double() - value).abs().max() / value.abs().max())
            worst = max(worst, error)
        model = AutoModel.from_pretrained(out / client).eval()
        output = forward(model, input_ids)
        assert (output - plain).abs().max() > 1e-2, f"{client}: the merge changed nothing"
        twin = AutoModel.from_pretrained(bert.full.base).double().eval()
        twin.load_state_dict(expected)
        assert torch.allclose(output.double(), forward(twin, input_ids), atol=1e-4, rtol=0)
    assert worst < 2**-23, worst  # float32 rounding of the stored result


def test_manifest_and_byte_identical_reruns(bert: Reference, tmp_path: Path) -> None:
    options = MergeOptions(granularity="block", device="cpu")
    first = pipeline.merge(load(bert), options, tmp_path / "one")
    pipeline.merge(load(bert), options, tmp_path / "two")
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    # Reading whole tensors instead of ranges changes no weight (the manifest's cosines may differ in
    # their last bits: the Grams are summed in another order).
    pipeline.merge(load(bert, chunk=None), options, tmp_path / "whole")
    whole = tree_bytes(tmp_path / "whole")
    assert {k: v for k, v in tree_bytes(tmp_path / "one").items() if k != MANIFEST_NAME} == {
        k: v for k, v in whole.items() if k != MANIFEST_NAME
    }

    record = json.loads((tmp_path / "one" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert record == first.manifest
    assert (record["kind"], record["output"], record["rank"], record["to_lora"]) == ("full", "checkpoint", None, None)
    assert record["base"]["files"] == {WEIGHTS_NAME: sha256(bert.full.base / WEIGHTS_NAME)}
    for entry, client in zip(record["inputs"], bert.full.clients):
        assert entry["files"] == {WEIGHTS_NAME: sha256(bert.full.checkpoints / client / WEIGHTS_NAME)}
        assert entry["tensors"] == len(bert.base)
    outputs = {path: digest for files in record["outputs"].values() for path, digest in files.items()}
    assert outputs == {
        str(p.relative_to(tmp_path / "one")): sha256(p)
        for p in (tmp_path / "one").rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    weights = reference_weights(bert, "block")
    for group in record["groups"].values():
        assert torch.allclose(
            torch.tensor(group["weights"], dtype=torch.float64), weights[group["modules"][0]], atol=1e-12
        )


def test_integer_buffers_dtype_and_tokenizer_come_from_the_base(tmp_path: Path) -> None:
    """A bfloat16 base with integer and boolean buffers that the clients changed: the outputs keep the
    base's, in the base's dtype, beside the base's generation and tokenizer files."""
    gen = torch.Generator().manual_seed(5)

    def save(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})

    base = {
        "layers.0.proj.weight": torch.randn(6, 5, generator=gen).bfloat16(),
        "layers.0.proj.bias": torch.randn(6, generator=gen).bfloat16(),
        "norm.weight": torch.randn(5, generator=gen).bfloat16(),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }
    save(tmp_path / "base", base)
    extras = {
        "generation_config.json": '{"max_length": 9}',
        "tokenizer.json": '{"model": {}}',
        "vocab.txt": "a\nb\n",
        "notes.md": "not copied",
    }
    for name, text in extras.items():
        (tmp_path / "base" / name).write_text(text)
    for i in range(3):
        client = {
            n: (t + 0.1 * torch.randn(t.shape, generator=gen)).bfloat16() if t.is_floating_point() else t
            for n, t in base.items()
        }
        client["position_ids"] = torch.arange(7) * (i + 2)
        client["mask"] = ~base["mask"]
        save(tmp_path / "ft" / f"c{i}", client)
    ref = reference(FullSet(tmp_path / "base", tmp_path / "ft", ["c0", "c1", "c2"]))
    workspace = load(ref, chunk=4)
    assert workspace.tensors == ["layers.0.proj.bias", "layers.0.proj.weight", "norm.weight"]
    out = pipeline.merge(workspace, MergeOptions(granularity="block", device="cpu"), tmp_path / "out").out
    merged = reference_merged(ref, "block")
    for i, client in enumerate(ref.full.clients):
        assert sorted(p.name for p in (out / client).iterdir()) == sorted(
            ["README.md", "config.json", WEIGHTS_NAME, *extras.keys() - {"notes.md"}]
        )
        assert all((out / client / n).read_text() == extras[n] for n in extras if n != "notes.md")
        got = load_file(out / client / WEIGHTS_NAME)
        assert torch.equal(got["position_ids"], base["position_ids"]) and torch.equal(got["mask"], base["mask"])
        for name in ref.names:
            expected = base[name].double() + merged[i][name]
            assert got[name].dtype == torch.bfloat16
            assert torch.allclose(got[name].double(), expected, rtol=2**-8, atol=0), name  # one bfloat16 rounding


def test_sharded_output_through_the_cli(bert: Reference, tmp_path: Path) -> None:
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    args = ("merge", bert.full.checkpoints, "--base", bert.full.base, "--json", "--device", "cpu")
    assert invoke(*args, "--out", whole).exit_code == 0
    result = invoke(*args, "--out", sharded, "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["clients"] == bert.full.clients and summary["combine"] == "exact"
    for client in bert.full.clients:
        index = json.loads((sharded / client / INDEX_NAME).read_text(encoding="utf-8"))
        shards = sorted(p for p in (sharded / client).glob("model-*.safetensors"))
        assert len(shards) > 3 and not (sharded / client / WEIGHTS_NAME).exists()
        assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in bert.base.values())
        for shard in shards:
            tensors = load_file(shard)
            assert set(tensors) == {n for n, f in index["weight_map"].items() if f == shard.name}
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            assert size <= 20_000 or len(tensors) == 1  # a tensor larger than the limit stands alone
        reference_tensors = load_file(whole / client / WEIGHTS_NAME)
        got = read_model(sharded / client)
        assert got.keys() == reference_tensors.keys() and all(torch.equal(got[n], reference_tensors[n]) for n in got)
        model = AutoModel.from_pretrained(sharded / client).eval()
        assert all(
            torch.equal(p, reference_tensors[n]) for n, p in model.state_dict().items() if n in reference_tensors
        )
        assert set(summary["outputs"][client]) == {f"{client}/{p.name}" for p in (sharded / client).iterdir()}


def test_dry_run_plans_sizes_and_writes_nothing(bert: Reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("merge", bert.full.checkpoints, "--base", bert.full.base, "--out", out, "--dry-run")
    plan = json.loads(invoke(*args, "--json", "--max-shard-size", "20KB").stdout)
    total = sum(t.numel() * t.element_size() for t in bert.base.values())
    assert (plan["kind"], plan["output"], plan["tensors"], plan["task_tensors"]) == (
        "full",
        "checkpoint",
        len(bert.base),
        len(bert.names),
    )
    assert plan["output_bytes"] == 4 * total and plan["shards"] > 3
    plan = json.loads(invoke(*args, "--json", "--to-lora", "4").stdout)
    linear = [n for n, t in bert.base.items() if t.ndim == 2 and "embeddings" not in n]
    assert plan["output"] == "lora" and plan["lora_modules"] == len(linear) == BERT_LINEAR
    assert plan["output_bytes"] == 4 * sum(4 * sum(bert.base[n].shape) * 4 for n in linear)
    table = invoke(*args)
    assert table.exit_code == 0 and "ft_d" in table.stdout and "tensors" in table.stdout
    assert not out.exists()


def test_inspect_similarity_through_the_cli(bert: Reference) -> None:
    result = invoke(
        "inspect-similarity", bert.full.checkpoints, "--base", bert.full.base, "--layerwise", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    groups = reference_groups(bert, "block")
    assert set(data["groups"]) == set(groups)
    dense = reference_cosine(bert.deltas, sorted(groups["encoder.layer.0"]))
    assert torch.allclose(
        torch.tensor(data["groups"]["encoder.layer.0"]["similarity"], dtype=torch.float64), dense, atol=1e-12
    )


# --- --to-lora -------------------------------------------------------------------------------------


def check_to_lora(
    ref: Reference, out: Path, rank: int, granularity: str, energy_atol: float, delta_rtol: float
) -> dict:
    """Every client's adapter loads in peft without complaint, its deltas are M's rank-``rank``
    truncation, and the manifest's energies are the dense SVD's. Returns the manifest."""
    record = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    merged = reference_merged(ref, granularity)
    modules = record["to_lora"]["modules"]
    for i, client in enumerate(ref.full.clients):
        model, messages = load_peft(ref.full.base, out / client)
        assert not messages, f"{client}: {messages}"
        config = json.loads((out / client / "adapter_config.json").read_text(encoding="utf-8"))
        assert sorted(config["target_modules"]) == sorted(record["energy_kept"][client])
        got = peft_loras(model)
        kept_energy, total_energy = 0.0, sum(float((m * m).sum()) for m in merged[i].values())
        for module in modules:
            m = merged[i][module + ".weight"]  # in the base's layout, as peft's get_delta_weight
            if float(m.abs().max()) == 0:  # a zero personalized delta: the module is left out
                assert module not in got and module not in record["energy_kept"][client]
                continue
            assert got[module].a.shape[0] == min(rank, *m.shape)
            assert relative_error(got[module].delta, truncated(m, rank)) < delta_rtol, (client, module)
            energy = energy_kept(m, rank)
            assert record["energy_kept"][client][module] == pytest.approx(energy, abs=energy_atol), (client, module)
            kept_energy += energy * float((m * m).sum())
        assert record["to_lora"]["delta_energy_kept"][client] == pytest.approx(
            kept_energy / total_energy, abs=energy_atol
        )
    return record


def test_to_lora_truncates_like_the_dense_svd(bert: Reference, tmp_path: Path) -> None:
    out = pipeline.merge(load(bert), MergeOptions(granularity="block", to_lora=2, device="cpu"), tmp_path / "out").out
    record = check_to_lora(bert, out, 2, "block", energy_atol=1e-9, delta_rtol=1e-5)
    assert len(record["to_lora"]["modules"]) == BERT_LINEAR
    assert record["to_lora"]["skipped"]["embeddings.word_embeddings.weight"].startswith("Embedding weight;")
    assert record["to_lora"]["skipped"]["encoder.layer.0.attention.self.query.bias"].startswith("Linear bias;")
    assert len(record["to_lora"]["skipped"]) == len(bert.names) - BERT_LINEAR
    kept = [e for per_client in record["energy_kept"].values() for e in per_client.values()]
    assert max(kept) < 0.999  # rank 2 truncates every merged delta (rank ≥ 3: shared 2 + own 1s)
    assert all(0 < v < 1 for v in record["to_lora"]["delta_energy_kept"].values())


def test_to_lora_from_float64_checkpoints_leaves_the_inputs_intact(bert: Reference, tmp_path: Path) -> None:
    """Stored float64 tensors are the float64 deltas' own storage: summing client by client must copy them."""
    copy = tmp_path / "f64"
    shutil.copytree(bert.full.base.parent, copy)
    for path in copy.rglob("*.safetensors"):
        tensors = load_file(path)
        save_file({n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}, path)
    ref = reference(FullSet(copy / bert.full.base.name, copy / bert.full.checkpoints.name, bert.full.clients))
    out = pipeline.merge(load(ref), MergeOptions(granularity="block", to_lora=2, device="cpu"), tmp_path / "out").out
    check_to_lora(ref, out, 2, "block", energy_atol=1e-9, delta_rtol=1e-5)


def test_to_lora_at_the_rank_of_the_delta_keeps_all_energy(bert: Reference, tmp_path: Path) -> None:
    """Each ΔW_j is rank 2 shared + rank 1 own, so M has rank ≤ 6 < 8 ≤ the sketch: nothing is lost."""
    out = pipeline.merge(load(bert), MergeOptions(granularity="model", to_lora=8, device="cpu"), tmp_path / "out").out
    record = check_to_lora(bert, out, 8, "model", energy_atol=1e-9, delta_rtol=1e-5)
    kept = [e for per_client in record["energy_kept"].values() for e in per_client.values()]
    assert min(kept) == pytest.approx(1.0, abs=1e-9) and max(kept) == pytest.approx(1.0, abs=1e-9)


def test_to_lora_on_conv1d_with_a_spectral_tail(gpt2: Reference, tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are (in, out): the adapter has fan_in_fan_out and ΔW = (B A)ᵀ. A dense
    tail makes every M full rank, so the randomized SVD approximates (sketch 4 + 8 < 32 columns)."""
    out = pipeline.merge(load(gpt2), MergeOptions(to_lora=4, device="cpu"), tmp_path / "out").out
    record = check_to_lora(gpt2, out, 4, "model", energy_atol=1e-4, delta_rtol=2e-2)
    assert json.loads((out / "gf_one" / "adapter_config.json").read_text(encoding="utf-8"))["fan_in_fan_out"] is True
    assert sorted(record["to_lora"]["modules"]) == sorted(
        n.removesuffix(".weight") for n in gpt2.names if re.search(r"c_\w+\.weight$", n)
    )
    assert max(e for per_client in record["energy_kept"].values() for e in per_client.values()) < 0.95
    again = pipeline.merge(load(gpt2), MergeOptions(to_lora=4, device="cpu"), tmp_path / "again").out
    assert tree_bytes(out) == tree_bytes(again)  # the sketch is seeded


# --- errors, through the command line --------------------------------------------------------------


def break_set(ref: Reference, root: Path, how: str) -> tuple[list[str], tuple[str, ...], int]:
    """Copy the checkpoints under ``root``, break them one way; return the merge arguments, the
    texts the error must contain and its exit code."""
    checkpoints = root / "checkpoints"
    shutil.copytree(ref.full.checkpoints, checkpoints)
    client = checkpoints / "ft_b"
    weights = client / WEIGHTS_NAME
    base = ["--base", str(ref.full.base)]
    name = "encoder.layer.1.attention.self.key.weight"
    if how == "no-base":
        return [str(checkpoints)], ("need --base",), 2
    if how in ("extra-tensor", "missing-tensor", "shape", "nan"):
        tensors = load_file(weights)
        if how == "extra-tensor":
            tensors["classifier.weight"] = torch.zeros(3, 32)
        elif how == "missing-tensor":
            del tensors[name]
        elif how == "shape":
            tensors[name] = torch.zeros(32, 31)
        else:
            tensors[name][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
        needles = {
            "extra-tensor": ("classifier.weight is not in the base model", str(weights)),
            "missing-tensor": (f"tensor {name} of the base", "is missing", "ft_b"),
            "shape": (name, "shape [32, 31] here but [32, 32] in the base", str(weights)),
            "nan": (name, "NaN", str(weights)),
        }[how]
        return [str(checkpoints), *base], needles, 1
    if how == "pickled":
        weights.rename(client / "pytorch_model.bin")
        return [str(checkpoints), *base], ("pickled", "ft_b"), 1
    if how == "shard-missing":
        (client / INDEX_NAME).write_text(json.dumps({"weight_map": {name: "model-00002-of-00002.safetensors"}}))
        return [str(checkpoints), *base], ("model-00002-of-00002.safetensors", "missing", "ft_b"), 1
    if how == "mixed":
        adapter = root / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        return (
            [str(checkpoints), str(adapter), *base],
            ("LoRA adapters (adapter) and full fine-tuned checkpoints (ft_a, ft_b, ft_c, ft_d)",),
            1,
        )
    if how == "copy-of-base":
        shutil.rmtree(client)
        shutil.copytree(ref.full.base, client)
        return [str(checkpoints), *base], ("task vector is zero", "ft_b"), 1
    if how == "rank":
        return [str(checkpoints), *base, "--rank", "4"], ("--rank applies to LoRA adapters",), 2
    if how == "combine":
        return [str(checkpoints), *base, "--combine", "cat"], ("--combine cat applies to LoRA adapters",), 2
    if how == "shard-size":
        return [str(checkpoints), *base, "--max-shard-size", "2 parsecs"], ("--max-shard-size",), 2
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no-base",
        "extra-tensor",
        "missing-tensor",
        "shape",
        "nan",
        "pickled",
        "shard-missing",
        "mixed",
        "copy-of-base",
        "rank",
        "combine",
        "shard-size",
    ],
)
def test_bad_checkpoints_are_one_line_errors_and_nothing_is_written(bert: Reference, tmp_path: Path, how: str) -> None:
    args, needles, code = break_set(bert, tmp_path, how)
    out = tmp_path / "merged"
    assert_user_error(invoke("merge", *args, "--out", out, "--device", "cpu"), *needles, code=code)
    assert not out.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


@pytest.mark.parametrize("where", ["base", "inside"])
def test_out_may_not_be_or_lie_in_the_base(bert: Reference, tmp_path: Path, where: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(bert.full.base, base)
    before = tree_bytes(base)
    out = base if where == "base" else base / "merged"
    result = invoke("merge", bert.full.checkpoints, "--base", base, "--out", out, "--overwrite")
    assert_user_error(result, "lies inside the source", str(base))
    assert tree_bytes(base) == before


def test_to_lora_is_refused_for_adapters(tmp_path: Path) -> None:
    shapes = {"layers.0.q": (4, 3)}
    for name in ("a", "b"):
        random_adapter(tmp_path / "adapters" / name, shapes, torch.Generator().manual_seed(len(name)))
    result = invoke("merge", tmp_path / "adapters", "--out", tmp_path / "out", "--to-lora", "4")
    assert_user_error(result, "--to-lora applies to full fine-tuned checkpoints", code=2)
    assert not (tmp_path / "out").exists()


# --- with the CI features: cards, reproducing command, schemas, config, lock -----------------------

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def schema_errors(name: str, document: dict) -> list[str]:
    import jsonschema

    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(document)]


def test_cards_and_command_reproduce_a_full_merge(bert: Reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "merge",
        bert.full.checkpoints,
        "--base",
        bert.full.base,
        "--out",
        out,
        "--layerwise",
        "--max-shard-size",
        "20KB",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    command = record["command"]
    assert command.startswith(
        f"fedbip merge {bert.full.checkpoints} --out OUT --base {bert.full.base} --granularity block"
    )
    assert "--max-shard-size 20KB --device cpu" in command and "--combine" not in command and "--rank" not in command
    for client in bert.full.clients:
        card = (out / client / "README.md").read_text(encoding="utf-8")
        assert "library_name: transformers\n" in card and "- full-fine-tuning\n" in card
        assert (
            "personalized checkpoint: W_base + Σ_j P_ij ΔW_j" in card
            and "- energy kept: all (the merge is exact)" in card
        )
        assert f"```bash\n{command}\n```" in card and str(out) not in card
        for entry in record["inputs"]:
            assert all(digest in card for digest in entry["files"].values())
        assert record["outputs"][client][f"{client}/README.md"] == sha256(out / client / "README.md")
    again = tmp_path / "again"
    words = [str(again) if w == "OUT" else w for w in shlex.split(command)]
    assert words[:2] == ["fedbip", "merge"] and invoke(*words[1:]).exit_code == 0
    assert tree_bytes(again) == tree_bytes(out)


def test_to_lora_card_summary_and_plan_match_the_schemas(bert: Reference, tmp_path: Path) -> None:
    args = ("merge", bert.full.checkpoints, "--base", bert.full.base, "--device", "cpu", "--json")
    summary = json.loads(invoke(*args, "--out", tmp_path / "lora", "--to-lora", "2").stdout)
    assert schema_errors("merge-summary.schema.json", summary) == []
    assert (summary["kind"], summary["output"], summary["combine"], summary["rank"]) == (
        "full",
        "lora",
        "randomized-svd",
        2,
    )
    assert summary["cache"] == {
        "dir": summary["cache"]["dir"],
        "hits": 0,
        "computed": 0,
        "rejected": 0,
    }  # the dense path keeps no cache
    card = (tmp_path / "lora" / bert.full.clients[0] / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft\n" in card and "rank-2 LoRA adapter of the personalized delta" in card
    assert "- combine: randomized-svd at rank 2" in card and "share of the whole delta's energy" in card
    assert "--to-lora 2" in json.loads((tmp_path / "lora" / MANIFEST_NAME).read_text(encoding="utf-8"))["command"]
    whole = json.loads(invoke(*args, "--out", tmp_path / "whole").stdout)
    assert schema_errors("merge-summary.schema.json", whole) == []
    assert (whole["output"], whole["combine"], whole["rank"]) == ("checkpoint", "exact", None)
    for extra in ((), ("--to-lora", "2")):
        plan = json.loads(invoke(*args, "--out", tmp_path / "plan", "--dry-run", *extra).stdout)
        assert schema_errors("dry-run.schema.json", plan) == [] and plan["kind"] == "full"
        assert plan["base"]["source"] == str(bert.full.base) and plan["sources"] == [
            {"spec": str(bert.full.checkpoints), "clients": bert.full.clients}
        ]
    assert schema_errors("dry-run.schema.json", {**plan, "modules": 3}) != []  # an adapters' field is not a full plan's
    inspected = json.loads(
        invoke("inspect-similarity", bert.full.checkpoints, "--base", bert.full.base, "--format", "json").stdout
    )
    assert schema_errors("inspect.schema.json", inspected) == []


def test_config_file_carries_the_full_checkpoint_options(bert: Reference, tmp_path: Path) -> None:
    # a config's paths stay inside its own directory: the inputs are copied beside it
    shutil.copytree(bert.full.checkpoints, tmp_path / "ft")
    shutil.copytree(bert.full.base, tmp_path / "base")
    config = tmp_path / "fedbip.toml"
    config.write_text(
        'sources = ["ft"]\nbase = "base"\nout = "merged"\n'
        'max_shard_size = "20KB"\ndevice = "cpu"\nlock = "fedbip.lock"\n',
        encoding="utf-8",
    )
    result = invoke("merge", "--config", config)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "merged" / bert.full.clients[0]).glob("model-*.safetensors"))) > 3
    record = json.loads((tmp_path / "merged" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert record["options"]["max_shard_size"] == "20KB"
    # The command line overrides the file: --to-lora from there.
    assert invoke("merge", "--config", config, "--out", tmp_path / "adapters", "--to-lora", "2").exit_code == 0
    assert (tmp_path / "adapters" / bert.full.clients[0] / "adapter_model.safetensors").is_file()
    config.write_text(config.read_text(encoding="utf-8") + "to_lora = 0\n", encoding="utf-8")
    assert_user_error(invoke("merge", "--config", config), "to_lora = 0", "must be a positive integer", code=2)


def test_lock_pins_full_checkpoint_weights(bert: Reference, tmp_path: Path) -> None:
    checkpoints = tmp_path / "ft"
    shutil.copytree(bert.full.checkpoints, checkpoints)
    lock = tmp_path / "fedbip.lock"
    args = ("merge", checkpoints, "--base", bert.full.base, "--lock", lock, "--device", "cpu")
    assert invoke(*args, "--out", tmp_path / "one").exit_code == 0
    pinned = json.loads(lock.read_text(encoding="utf-8"))["sources"][str(checkpoints)]
    client = bert.full.clients[1]
    assert set(pinned[client]["files"]) == {"config.json", WEIGHTS_NAME}
    assert pinned[client]["files"][WEIGHTS_NAME] == sha256(checkpoints / client / WEIGHTS_NAME)
    assert invoke(*args, "--locked", "--out", tmp_path / "two").exit_code == 0
    tensors = load_file(checkpoints / client / WEIGHTS_NAME)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, checkpoints / client / WEIGHTS_NAME, metadata={"format": "pt"})
    result = invoke(*args, "--locked", "--out", tmp_path / "three")
    assert_user_error(result, f"{WEIGHTS_NAME} has sha256", client, code=1)
    assert not (tmp_path / "three").exists()
