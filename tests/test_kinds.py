"""Every adapter kind users hold, end to end through the command line, against peft as the reference.

A table of peft configurations on tiny real models (``peftkinds``). Each is either

- EXACT: ``inspect-similarity --format json --base BASE`` gives the dense float64 cosine of the clients'
  deltas (peft's ``merge_and_unload`` minus the base, every differing parameter concatenated), and
  ``merge --combine cat --base BASE`` writes adapters that peft loads and merges to Σ_j P_ij ΔW_j, with
  P computed here from that cosine (FedBip: S⁺ normalised per row) and recorded in the manifest; a
  forward pass through the loaded adapter matches the base with that delta added; or
- REFUSED: both commands exit with code 1 and one ``error:`` line saying what is wrong (no traceback),
  and ``merge`` writes nothing.

Beside the table: ``--combine svd --rank 2`` is the optimal rank-2 approximation of each LoRA or DoRA
module's merged delta (and exact elsewhere); ``--layerwise`` groups by transformer block; an adapter saved
under a named sub-directory (``adapter_name="other"``) is found.

Everything is black-box: fedbip is reached only through its CLI, its outputs only through peft.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    VeraConfig,
)
from peftkinds import (
    FAMILIES,
    Client,
    base_state,
    logits,
    make_clients,
    merged_delta,
    reference_logits,
    tokens,
)
from typer.testing import CliRunner

from fedbip_cli.cli import app

SIMILARITY = 1e-6  # absolute, on cosines of float32 adapters
WEIGHTS = 1e-9  # absolute, manifest weights against P from the reference cosine
DELTA = 1e-5  # max abs error relative to the max abs of the expected delta, per parameter
FORWARD = 1e-4  # absolute, on logits
SVD = 1e-5  # relative, the rank-R error against the optimal one
SVD_RANK = 2
MERGE_DTYPE = ("--dtype", "float32")  # the outputs are compared at float32 precision
MANIFEST = "fedbip-manifest.json"
QV = ["query", "value"]
BLOCK = re.compile(r"^(?:.*\.)?(?:layer|layers|h)\.\d+(?=\.)")  # encoder.layer.N, transformer.h.N, model.layers.N

runner = CliRunner()
Configs = Callable[[], PeftConfig | list[PeftConfig]]


def lora(**options: object) -> Configs:
    """A LoraConfig factory: rank 2, alpha 4, query and value unless overridden."""
    settings = {"r": 2, "lora_alpha": 4, "target_modules": QV, "lora_dropout": 0.0, **options}
    return lambda: LoraConfig(**settings)


def mixed() -> list[PeftConfig]:
    """DoRA without a head, plain LoRA without a head, plain LoRA saving the classification head."""
    return [lora(use_dora=True)(), lora()(), lora(task_type="SEQ_CLS")()]


def rename_bases(*names: str) -> Callable[[list[Client]], None]:
    """Rewrite each client's ``base_model_name_or_path`` in adapter_config.json."""

    def edit(clients: list[Client]) -> None:
        for client, name in zip(clients, names, strict=True):
            config = client.path / "adapter_config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": name}))

    return edit


# A base the adapters name that resolves nowhere (not a directory, not in the offline Hub cache): no
# default --base, so the parts that need one are refused.
ELSEWHERE = ("elsewhere/bert", "elsewhere/bert")


@dataclass(frozen=True)
class Refused:
    """What the refusal must say (lowercase-insensitive substrings of stderr), and how the run is set up."""

    needles: tuple[str, ...]
    with_base: bool = True
    edit: Callable[[list[Client]], None] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    configs: Configs
    refused: Refused | None = None  # None: EXACT
    clients: int = 4
    anti: int = -1  # the anti-similar client (weight 0 from the others)


CASES = [
    Case("lora", "bert", lora(r=4, lora_alpha=8)),
    Case(
        "rslora_patterns",
        "bert",
        lora(
            use_rslora=True,
            target_modules=["query", "key", "value"],
            rank_pattern={"key": 4},
            alpha_pattern={"layer.1.attention.self.query": 3},
        ),
    ),
    Case("gpt2_conv1d", "gpt2", lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    Case("seq_cls", "bert", lora(task_type="SEQ_CLS")),
    Case("modules_to_save", "bert", lora(modules_to_save=["classifier"])),
    Case("llama_embedding_lora", "llama", lora(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    Case(
        "llama_saved_embeddings",
        "llama",
        lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    ),
    # One tensor, two kinds across clients: embedding LoRA's B·A is (dim, vocab), the saved embedding (vocab,
    # dim); the merge must turn the first into the weight's layout before adding them.
    Case(
        "llama_embedding_lora_and_saved",
        "llama",
        lambda: [
            lora(target_modules=["q_proj", "v_proj", "embed_tokens"])(),
            lora(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])(),
            lora(target_modules=["q_proj", "v_proj", "embed_tokens"])(),
        ],
        clients=3,
    ),
    Case("dora", "bert", lora(use_dora=True)),
    Case("lora_bias", "bert", lora(lora_bias=True)),
    Case("bias_lora_only", "bert", lora(bias="lora_only")),
    # The plain LoRA client is the anti-similar one, so the DoRA client borrows the head of the SEQ_CLS client.
    Case("mixed_kinds", "bert", mixed, clients=3, anti=1),
    Case(
        "pissa_raw",
        "bert",
        lora(init_lora_weights="pissa"),
        Refused(("pissa", "path_initial_model_for_weight_conversion")),
        clients=2,
    ),
    Case("olora_raw", "bert", lora(init_lora_weights="olora"), Refused(("olora",)), clients=2),
    Case("loha", "bert", lambda: LoHaConfig(r=2, target_modules=QV), Refused(("loha",)), clients=2),
    Case("lokr", "bert", lambda: LoKrConfig(r=2, target_modules=QV), Refused(("lokr",)), clients=2),
    Case("ia3", "bert", lambda: IA3Config(target_modules=QV, feedforward_modules=[]), Refused(("ia3",)), clients=2),
    Case("vera", "bert", lambda: VeraConfig(r=2, target_modules=QV), Refused(("vera",)), clients=2),
    Case(
        "prompt_tuning",
        "bert",
        lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        Refused(("prompt_tuning",)),
        clients=2,
    ),
    Case(
        "other_base_models_without_base",
        "bert",
        lora(),
        Refused(("base model",), with_base=False, edit=rename_bases("bert-a", "bert-a", "llama-b")),
        clients=3,
    ),
    Case(
        "dora_without_base",
        "bert",
        lora(use_dora=True),
        Refused(("--base",), with_base=False, edit=rename_bases(*ELSEWHERE)),
        clients=2,
    ),
    Case(
        "modules_to_save_without_base",
        "bert",
        lora(modules_to_save=["classifier"]),
        Refused(("--base",), with_base=False, edit=rename_bases(*ELSEWHERE)),
        clients=2,
    ),
    Case(
        "bias_lora_only_without_base",
        "bert",
        lora(bias="lora_only"),
        Refused(("--base",), with_base=False, edit=rename_bases(*ELSEWHERE)),
        clients=2,
    ),
]
BY_ID = {case.id: case for case in CASES}


# --- fixtures: each family's base once, each case's clients once -----------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["bert"].save_base(tmp_path_factory.mktemp("bert") / "base")


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["gpt2"].save_base(tmp_path_factory.mktemp("gpt2") / "base")


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["llama"].save_base(tmp_path_factory.mktemp("llama") / "base")


@dataclass
class Built:
    """A case's base, its adapters directory (one sub-directory per client) and clients."""

    base: Path
    adapters: Path
    clients: list[Client] = field(default_factory=list)


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Built]:
    """The clients of a case, made on first use and shared by every test of this module."""
    made: dict[str, Built] = {}

    def get(case: Case) -> Built:
        if case.id not in made:
            base = request.getfixturevalue(f"{case.family}_base")
            adapters = tmp_path_factory.mktemp(case.id)
            clients = make_clients(
                FAMILIES[case.family],
                base,
                case.configs(),
                adapters,
                clients=case.clients,
                anti=case.anti,
                reference=not case.refused,
            )
            if case.refused and case.refused.edit:
                case.refused.edit(clients)
            made[case.id] = Built(base, adapters, clients)
        return made[case.id]

    return get


# --- the dense float64 reference -------------------------------------------------------------------


def flat(deltas: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> torch.Tensor:
    """(K, N): each client's deltas at ``names`` concatenated (an absent parameter is zero)."""
    shapes = {n: next(d[n] for d in deltas if n in d) for n in names}
    return torch.stack([torch.cat([d.get(n, torch.zeros_like(shapes[n])).flatten() for n in names]) for d in deltas])


def cosine(deltas: Sequence[dict[str, torch.Tensor]], names: Sequence[str] | None = None) -> torch.Tensor:
    """S_ij: the cosine of the clients' deltas over ``names`` (default: every parameter any client changes)."""
    x = flat(deltas, sorted({n for d in deltas for n in d}) if names is None else names)
    norms = x.norm(dim=1)
    return (x @ x.T) / torch.outer(norms, norms)


def paper_weights(similarity: torch.Tensor) -> torch.Tensor:
    """FedBip's P: max(S, 0) normalised per row."""
    positive = similarity.clamp(min=0)
    return positive / positive.sum(dim=1, keepdim=True)


def group_of(name: str) -> str:
    """The transformer block a parameter belongs to, or its module (the name less ``.weight`` / ``.bias``)."""
    match = BLOCK.match(name)
    return match.group(0) if match else name.rsplit(".", 1)[0]


def combined(row: torch.Tensor, deltas: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ_j row_j ΔW_j per parameter."""
    names = sorted({n for d in deltas for n in d})
    return {n: sum(float(w) * d[n] for w, d in zip(row, deltas) if n in d) for n in names}


def max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max())


def relative_errors(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], size: Callable[[torch.Tensor], float] = max_abs
) -> dict[str, float]:
    """Per parameter: size(got − expected) / size(expected), max |·| by default (a parameter not expected
    to change: over the largest expected change of any parameter)."""
    top = max(size(t) for t in expected.values())
    errors = {}
    for name in sorted(set(got) | set(expected)):
        want = expected.get(name)
        have = got.get(name)
        want = torch.zeros_like(have) if want is None else want
        have = torch.zeros_like(want) if have is None else have
        errors[name] = size(have - want) / (size(want) or top)
    return errors


# --- the command line ------------------------------------------------------------------------------


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def summary(result) -> str:
    """A failed run in a few lines: exit code, the start of stderr and stdout, any exception."""
    return (
        f"exit {result.exit_code}; stderr: {result.stderr.strip()[:400]!r}; "
        f"stdout: {result.stdout.strip()[:100]!r}; exception: {result.exception!r}"
    )


def ok(result) -> str:
    assert result.exit_code == 0 and result.exception is None, summary(result)
    return result.stdout


def ordered(names: list[str], clients: list[Client]) -> list[int]:
    """The index in ``names`` (fedbip's client order) of each client, matched by name."""
    assert sorted(names) == sorted(c.name for c in clients), names
    return [names.index(c.name) for c in clients]


def inspect_json(built: Built, *options: str) -> dict:
    out = ok(invoke("inspect-similarity", built.adapters, "--base", built.base, "--format", "json", *options))
    return json.loads(out)


def group_similarity(report: dict, group: str, order: list[int]) -> torch.Tensor:
    matrix = torch.tensor(report["groups"][group]["similarity"], dtype=torch.float64)
    return matrix[order][:, order]


def merge(built: Built, out: Path, *options: str) -> torch.Tensor:
    """Run ``merge`` and return the manifest's model-group weights in the clients' order."""
    ok(invoke("merge", built.adapters, "--out", out, "--base", built.base, "--device", "cpu", *MERGE_DTYPE, *options))
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    order = ordered(manifest["clients"], built.clients)
    return torch.tensor(manifest["groups"]["model"]["weights"], dtype=torch.float64)[order][:, order]


def check_refused(case: Case, built: Built, out: Path) -> None:
    base = ("--base", built.base) if case.refused.with_base else ()
    for command in (
        ("inspect-similarity", built.adapters, *base),  # (under --format json the error is JSON on stdout)
        ("merge", built.adapters, "--out", out, "--device", "cpu", *base),
    ):
        result = invoke(*command)
        context = f"{command[0]}: {summary(result)}"
        assert result.exit_code == 1, context
        assert result.exception is None or isinstance(result.exception, SystemExit), context
        assert "Traceback" not in result.output, context
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, context
        for needle in case.refused.needles:
            assert needle.lower() in result.stderr.lower(), f"{needle!r} not said; {context}"
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def loaded_adapter(case: Case, built: Built, adapter: Path) -> PeftModel:
    family = FAMILIES[case.family]
    return PeftModel.from_pretrained(family.load(built.base), adapter).eval()


def trainable(case: Case, built: Built, adapter: Path) -> set[str]:
    """The parameters ``PeftModel.from_pretrained(..., is_trainable=True)`` trains, DoRA magnitudes aside:
    a merged DoRA module is written as plain LoRA (its delta is not low-rank), so it trains no magnitude."""
    model = PeftModel.from_pretrained(FAMILIES[case.family].load(built.base), adapter, is_trainable=True)
    return {n for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" not in n}


# Cases whose clients train different parameters: the outputs train what any input trained; where some
# clients adapt a tensor with LoRA and others save it whole, it is written back whole, so the outputs
# train no parameter no input trained and every parameter all inputs trained.
MIXED_INPUTS = ("mixed_kinds",)
WHOLE_BESIDE_LORA = ("llama_embedding_lora_and_saved",)


def check_trainable(case: Case, built: Built, out: Path) -> None:
    """Fine-tuning a merged adapter further trains what its inputs trained: the config (``bias``,
    ``modules_to_save``, ``lora_bias``) is kept. With mixed inputs (``MIXED_INPUTS``), what any input trained."""
    inputs = {c.name: trainable(case, built, c.path) for c in built.clients}
    expected = set().union(*inputs.values())
    for client in built.clients:
        got = trainable(case, built, out / client.name)
        if case.id in WHOLE_BESIDE_LORA:
            shared = set.intersection(*inputs.values())
            assert shared <= got <= expected, (client.name, sorted((got - expected) | (shared - got))[:6])
            continue
        if case.id not in MIXED_INPUTS:
            assert inputs[client.name] == expected, client.name
        assert got == expected, (client.name, sorted(got ^ expected)[:6])


# --- the table -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'refused' if c.refused else 'exact'}-{c.id}")
def test_kind(case: Case, built: Callable[[Case], Built], tmp_path: Path) -> None:
    inputs = built(case)
    if case.refused:
        check_refused(case, inputs, tmp_path / "out")
        return
    clients = inputs.clients
    deltas = [c.delta for c in clients]
    similarity = cosine(deltas)
    weights = paper_weights(similarity)
    # The set is worth checking: someone is anti-similar and someone borrows from another.
    assert float(similarity.min()) < -0.1 and float((weights - torch.diag(weights.diagonal())).max()) > 0.05

    report = inspect_json(inputs)
    got = group_similarity(report, "model", ordered(report["clients"], clients))
    assert torch.allclose(got, similarity, atol=SIMILARITY, rtol=0), (got - similarity).abs().max()

    out = tmp_path / "out"
    manifest_weights = merge(inputs, out, "--combine", "cat")
    assert torch.allclose(manifest_weights, weights, atol=WEIGHTS, rtol=0), (manifest_weights - weights).abs().max()

    family = FAMILIES[case.family]
    state = base_state(family, inputs.base)
    input_ids = tokens()
    plain = logits(family.load(inputs.base), input_ids)
    for i, client in enumerate(clients):
        expected = combined(weights[i], deltas)
        model = loaded_adapter(case, inputs, out / client.name)
        output = logits(model, input_ids)
        assert (output - plain).abs().max() > 1e-2, f"{client.name}: the merged adapter changes nothing"
        target = reference_logits(family, inputs.base, expected, input_ids)
        assert torch.allclose(output, target, atol=FORWARD, rtol=0), (client.name, (output - target).abs().max())
        errors = relative_errors(merged_delta(model, state), expected)
        assert max(errors.values()) <= DELTA, (client.name, {n: e for n, e in errors.items() if e > DELTA})
    check_trainable(case, inputs, out)


# --- beside the table ------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["lora", "dora"])
def test_svd_is_the_optimal_low_rank_approximation(
    case_id: str, built: Callable[[Case], Built], tmp_path: Path
) -> None:
    """Per module ‖M_i − out_i‖_F is the rank-2 Eckart–Young error of M_i; heads and biases stay exact."""
    case = BY_ID[case_id]
    inputs = built(case)
    deltas = [c.delta for c in inputs.clients]
    weights = paper_weights(cosine(deltas))
    out = tmp_path / "out"
    manifest_weights = merge(inputs, out, "--combine", "svd", "--rank", str(SVD_RANK))
    assert torch.allclose(manifest_weights, weights, atol=WEIGHTS, rtol=0)

    low_rank = {f"{m}.weight" for c in inputs.clients for m in c.lora_modules}
    state = base_state(FAMILIES[case.family], inputs.base)
    for i, client in enumerate(inputs.clients):
        expected = combined(weights[i], deltas)
        got = merged_delta(loaded_adapter(case, inputs, out / client.name), state)
        assert set(got) <= set(expected), sorted(set(got) - set(expected))
        for name, want in expected.items():
            have = got.get(name, torch.zeros_like(want))
            if name not in low_rank:
                assert relative_errors({name: have}, {name: want})[name] <= DELTA, (client.name, name)
                continue
            optimal = float(torch.linalg.svdvals(want)[SVD_RANK:].norm())
            assert optimal > 1e-3 * float(want.norm()), "the case must need truncation"
            error = float((want - have).norm())
            assert abs(error - optimal) <= SVD * optimal, (client.name, name, error, optimal)


def test_layerwise_groups_by_transformer_block(built: Callable[[Case], Built]) -> None:
    """Blocks encoder.layer.N / transformer.h.N / model.layers.N; anything else (the head) is its own group."""
    inputs = built(BY_ID["seq_cls"])
    deltas = [c.delta for c in inputs.clients]
    groups: dict[str, list[str]] = {}
    for name in sorted({n for d in deltas for n in d}):
        groups.setdefault(group_of(name), []).append(name)
    assert len(groups) == 3 and "classifier" in groups, sorted(groups)

    report = inspect_json(inputs, "--layerwise")
    assert sorted(report["groups"]) == sorted(groups)
    order = ordered(report["clients"], inputs.clients)
    for group, names in groups.items():
        want = cosine(deltas, names)
        got = group_similarity(report, group, order)
        assert torch.allclose(got, want, atol=SIMILARITY, rtol=0), (group, (got - want).abs().max())


def test_an_adapter_in_a_named_subdirectory_is_found(bert_base: Path, tmp_path: Path) -> None:
    """``get_peft_model(..., adapter_name="other").save_pretrained(dir)`` writes ``dir/other/``."""
    clients = make_clients(FAMILIES["bert"], bert_base, lora()(), tmp_path / "clients", clients=2, adapter_name="other")
    assert all((c.path / "other" / "adapter_config.json").is_file() for c in clients)
    out = ok(invoke("inspect-similarity", tmp_path / "clients", "--base", bert_base, "--format", "json"))
    report = json.loads(out)
    assert len(set(report["clients"])) == 2, report["clients"]
    # Two clients: S is symmetric with a unit diagonal, so it does not depend on how they are named or ordered.
    want = cosine([c.delta for c in clients])
    got = group_similarity(report, "model", [0, 1])
    assert torch.allclose(got, want, atol=SIMILARITY, rtol=0), (got - want).abs().max()
