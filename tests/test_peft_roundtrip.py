"""Round trip through real peft: every merged adapter loads with ``PeftModel.from_pretrained`` and
carries exactly the personalized delta Σ_j P_ij ΔW_j.

The reference is independent of fedbip's own reading of the inputs: each input adapter is loaded by
peft and its deltas are taken from peft (``get_delta_weight``, which applies alpha/r, rsLoRA,
rank/alpha patterns and fan_in_fan_out itself), in float64 and in the base weight's layout. The
weights P come from ``fedbip-manifest.json``. The merged adapters are read back through peft too.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tinybase import (
    BERT_CLIENTS,
    BERT_EQUAL_RANK,
    TinySet,
    lora_layers,
    save_adapters,
    save_bert_base,
    tiny_bert,
    tiny_gpt2,
)
from transformers import AutoModel

from fedbip_cli import pipeline
from fedbip_cli.adapters import check_against_base, load_adapter
from fedbip_cli.errors import AdapterError
from fedbip_cli.manifest import MANIFEST_NAME
from fedbip_cli.sources import ResolvedSource, model_shapes

EXACT = 1e-5  # relative Frobenius error allowed for exact merges (outputs are stored in float32)
FORWARD = 1e-4  # absolute error allowed between forward passes
FULL_RANK = 32  # ≥ Σ r over all clients for every module


@dataclass(frozen=True)
class PeftLora:
    """One module of one input adapter as peft sees it, in float64 and the base weight's layout."""

    delta: torch.Tensor  # get_delta_weight: scale · B @ A, transposed under fan_in_fan_out
    b: torch.Tensor  # scale · lora_B, (out, r)
    a: torch.Tensor  # lora_A, (r, in)


@dataclass(frozen=True)
class Inputs:
    tiny: TinySet
    loras: dict[str, dict[str, PeftLora]]  # client -> module -> factors and delta


@dataclass(frozen=True)
class Case:
    model: str  # the name of a fixture giving Inputs
    combine: str
    granularity: str
    rank: int | None = None
    clients: tuple[str, ...] | None = None  # default: every client of the set

    def __str__(self) -> str:
        rank = "" if self.rank is None else f"-r{self.rank}"
        return f"{self.model}-{self.combine}{rank}-{self.granularity}"


CASES = [
    Case("bert", "svd", "model"),
    Case("bert", "svd", "block"),
    Case("bert", "svd", "model", rank=FULL_RANK),
    Case("bert", "svd", "block", rank=FULL_RANK),
    Case("bert", "cat", "model"),
    Case("bert", "cat", "block"),
    Case("bert", "cat", "module"),
    Case("bert", "linear", "model", clients=BERT_EQUAL_RANK),
    Case("bert", "linear", "block", clients=BERT_EQUAL_RANK),
    Case("gpt2", "svd", "model"),
    Case("gpt2", "svd", "block", rank=FULL_RANK),
    Case("gpt2", "cat", "block"),
    Case("gpt2", "linear", "model", clients=("g_one", "g_three")),
]


# --- peft, as the independent reference path -------------------------------------------------------


@contextmanager
def complaints() -> Iterator[list[str]]:
    """Collect what is warned inside: warnings other than deprecation notices, and WARNING+ log records
    (root, transformers, peft). Loading a well-formed adapter into its own base warns of nothing."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("", "transformers", "peft")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield messages
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            # transformers' own deprecation notices are no statement about the adapter.
            messages.extend(
                str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))
            )


def load_peft(base: Path, adapter: Path) -> tuple[PeftModel, list[str]]:
    """``PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter)`` and what it complained of."""
    with complaints() as messages:
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter)
    return model.eval(), messages


def peft_loras(model: PeftModel) -> dict[str, PeftLora]:
    """Every LoRA layer's delta and factors, computed by peft in float64."""
    model = model.double()
    with torch.no_grad():
        return {
            name: PeftLora(
                layer.get_delta_weight("default").clone(),
                layer.lora_B["default"].weight * layer.scaling["default"],
                layer.lora_A["default"].weight.clone(),
            )
            for name, layer in lora_layers(model).items()
        }


def read_inputs(tiny: TinySet) -> Inputs:
    loras = {}
    for client in tiny.clients:
        model, messages = load_peft(tiny.base, tiny.adapter(client))
        assert not messages, f"{client}: {messages}"
        loras[client] = peft_loras(model)
    return Inputs(tiny, loras)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run single-threaded: on these tiny matrices intra-op threads cost far more than they save
    (a 32 x 10 QR takes ~8 ms with 2 threads against ~0.06 ms with one), tripling this file's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return read_inputs(tiny_bert(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return read_inputs(tiny_gpt2(tmp_path_factory.mktemp("gpt2")))


# --- the dense float64 reference -------------------------------------------------------------------


def manifest_weights(manifest: dict) -> dict[str, torch.Tensor]:
    """Module -> the (K, K) weight matrix P of its group, as recorded in the manifest."""
    return {
        module: torch.tensor(group["weights"], dtype=torch.float64)
        for group in manifest["groups"].values()
        for module in group["modules"]
    }


def weighted_sum(row: torch.Tensor, terms: list[torch.Tensor | None]) -> torch.Tensor:
    """Σ_j row_j · term_j over the clients that have the term (a missing module is a zero delta)."""
    return sum(w * t for w, t in zip(row.tolist(), terms) if t is not None)


def merged_delta(row: torch.Tensor, loras: list[PeftLora | None]) -> torch.Tensor:
    """M = Σ_j P_ij ΔW_j, dense, from peft's own deltas."""
    return weighted_sum(row, [None if f is None else f.delta for f in loras])


def reference_delta(
    combine: str, rank: int | None, row: torch.Tensor, loras: list[PeftLora | None], fifo: bool
) -> torch.Tensor:
    """What client i's merged delta must be, in the base weight's layout.

    cat: M exactly; svd: the best rank-``rank`` approximation of M (dense SVD); linear (FedIT, not
    M): (Σ_j P_ij s_j B_j)(Σ_j P_ij A_j), transposed under fan_in_fan_out.
    """
    if combine == "linear":
        b = weighted_sum(row, [None if f is None else f.b for f in loras])
        a = weighted_sum(row, [None if f is None else f.a for f in loras])
        return (b @ a).T if fifo else b @ a
    merged = merged_delta(row, loras)
    if combine == "cat":
        return merged
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


def energy_kept(delta: torch.Tensor, rank: int) -> float:
    sigma = torch.linalg.svdvals(delta)
    return float((sigma[:rank] ** 2).sum() / (sigma**2).sum())


def relative_error(got: torch.Tensor | None, expected: torch.Tensor) -> float:
    """||got − expected|| / ||expected||, or ||got|| when nothing is expected (an absent module is 0)."""
    got = torch.zeros_like(expected) if got is None else got
    scale = float(expected.norm())
    return float((got - expected).norm()) / (scale if scale > 0 else 1.0)


def forward(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).last_hidden_state


def reference_forward(base: Path, deltas: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """The base model in float64 with the reference deltas added to its weights."""
    model = AutoModel.from_pretrained(base).double().eval()
    with torch.no_grad():
        for module, delta in deltas.items():
            model.get_submodule(module).weight += delta
    return forward(model, input_ids)


# --- the round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merged_adapters_load_in_peft_and_match_the_dense_reference(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    inputs: Inputs = request.getfixturevalue(case.model)
    tiny = inputs.tiny
    clients = list(case.clients or tiny.clients)
    workspace = pipeline.load([str(tiny.adapter(c)) for c in clients], base=str(tiny.base))
    options = pipeline.MergeOptions(granularity=case.granularity, combine=case.combine, rank=case.rank, device="cpu")
    out = pipeline.merge(workspace, options, tmp_path / "out").out

    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["clients"] == clients
    weights = manifest_weights(manifest)
    modules = sorted({m for c in clients for m in inputs.loras[c]})
    assert sorted(weights) == modules
    # Clients do borrow from each other; else this would only check that each keeps its own delta.
    assert max(float((p - torch.diag(p.diagonal())).max()) for p in weights.values()) > 0.05
    largest_input_rank = max(f.a.shape[0] for c in clients for f in inputs.loras[c].values())
    assert manifest["rank"] == ((case.rank or largest_input_rank) if case.combine == "svd" else None)
    if case.combine == "svd":  # the default rank truncates (so the reference is Eckart–Young), full rank does not
        kept = [e for per_client in manifest["energy_kept"].values() for e in per_client.values()]
        assert (min(kept) < 0.999) if case.rank is None else min(kept) == pytest.approx(1.0, abs=1e-12)

    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = forward(AutoModel.from_pretrained(tiny.base).eval(), input_ids)
    for i, client in enumerate(clients):
        loras = {m: [inputs.loras[c].get(m) for c in clients] for m in modules}
        rows = {m: weights[m][i] for m in modules}
        expected = {
            m: reference_delta(case.combine, manifest["rank"], rows[m], loras[m], tiny.fan_in_fan_out) for m in modules
        }

        merged, messages = load_peft(tiny.base, out / client)
        assert not messages, f"{client}: {messages}"
        output = forward(merged, input_ids)
        assert (output - plain).abs().max() > 1e-2, f"{client}: the merged adapter changes nothing"
        target = reference_forward(tiny.base, expected, input_ids)
        assert torch.allclose(output.double(), target, atol=FORWARD, rtol=0), float(
            (output.double() - target).abs().max()
        )

        got = peft_loras(merged)
        assert set(got) <= set(modules)
        errors = {m: relative_error(got[m].delta if m in got else None, expected[m]) for m in modules}
        assert max(errors.values()) < EXACT, f"{client}: {errors}"
        check_ranks_and_energy(case.combine, manifest, client, got, rows, loras)


def check_ranks_and_energy(
    combine: str,
    manifest: dict,
    client: str,
    got: dict[str, PeftLora],
    rows: dict[str, torch.Tensor],
    loras: dict[str, list[PeftLora | None]],
) -> None:
    """svd: rank ≤ R and the manifest's energy is the dense SVD's; cat: rank Σ r over clients with weight."""
    for m, merged in got.items():
        rank = merged.a.shape[0]
        if combine == "svd":
            assert rank <= manifest["rank"]
            kept = energy_kept(merged_delta(rows[m], loras[m]), manifest["rank"])
            assert manifest["energy_kept"][client][m] == pytest.approx(kept, abs=1e-9)
        elif combine == "cat":
            used = [f for f, w in zip(loras[m], rows[m].tolist()) if f is not None and w != 0]
            assert rank == sum(f.a.shape[0] for f in used)
            assert manifest["energy_kept"][client][m] == 1.0


def test_a_missing_lora_tensor_is_caught_by_the_warning_check(bert: Inputs, tmp_path: Path) -> None:
    """The 'no complaints' assertion above can fail: peft's warning about a missing LoRA key is seen."""
    broken = tmp_path / "broken"
    shutil.copytree(bert.tiny.adapter("alpha"), broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    dropped = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    del tensors[dropped]
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    _, messages = load_peft(bert.tiny.base, broken)
    assert any("missing adapter keys" in m and dropped.removesuffix(".weight") in m for m in messages), messages


# --- check_against_base ----------------------------------------------------------------------------


def test_adapters_for_a_wider_base_are_refused_naming_the_module(bert: Inputs, tmp_path: Path) -> None:
    wide_base = save_bert_base(tmp_path / "wide", hidden_size=48)
    wide = save_adapters(wide_base, tmp_path / "adapters", BERT_CLIENTS[:2])
    pipeline.load([str(wide)], base=str(wide_base))  # consistent with their own base

    with pytest.raises(AdapterError) as caught:
        pipeline.load([str(wide)], base=str(bert.tiny.base))
    assert caught.value.where == str((wide / BERT_CLIENTS[0].name).resolve())
    assert caught.value.message == (
        "module encoder.layer.0.attention.self.query: the factors imply a weight of shape [48, 48], the base has [32, 32]"
    )


def test_adapters_of_another_architecture_are_refused_naming_the_module(bert: Inputs, gpt2: Inputs) -> None:
    with pytest.raises(AdapterError, match=r"module h\.0\.attn\.c_attn does not exist in the base model"):
        pipeline.load([str(gpt2.tiny.adapters)], base=str(bert.tiny.base))


def test_the_base_shape_check_honours_fan_in_fan_out(gpt2: Inputs, tmp_path: Path) -> None:
    """Conv1D stores its weight as (in, out): a GPT-2 adapter claiming the Linear layout is refused."""
    original = gpt2.tiny.adapter("g_one")
    base = model_shapes(str(gpt2.tiny.base))
    check_against_base([load_adapter(ResolvedSource("g_one", original, str(original)))], base)

    flipped = tmp_path / "g_one"
    shutil.copytree(original, flipped)
    config = json.loads((flipped / "adapter_config.json").read_text(encoding="utf-8"))
    (flipped / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}), encoding="utf-8")
    with pytest.raises(AdapterError, match=r"module h\.0\.attn\.c_attn: .* shape \[96, 32\], the base has \[32, 96\]"):
        check_against_base([load_adapter(ResolvedSource("g_one", flipped, str(flipped)))], base)
