"""The factor-space engine against a dense float64 reference written out here.

Every reference materialises each client's ΔW (``factories.dense_delta``: peft's get_delta_weight in
float64), flattens, and takes cosines, weighted sums and ``torch.linalg.svd`` truncations directly.
Merges go end to end through files: adapters written by ``factories``, ``pipeline.load``,
``pipeline.merge``, and the written adapters read back with ``dense_delta``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from factories import (
    dense_delta,
    dense_deltas,
    lora_rank,
    pattern_value,
    random_adapter,
    random_factors,
    read_adapter,
    write_lora_adapter,
)

from fedbip_cli import adapter_workspace, pipeline
from fedbip_cli import similarity as similarity_module
from fedbip_cli.adapters import load_adapter
from fedbip_cli.errors import AdapterError, FedbipError, OutputError, UsageError
from fedbip_cli.manifest import MANIFEST_NAME
from fedbip_cli.merge import combiner
from fedbip_cli.pipeline import MergeOptions
from fedbip_cli.sources import ResolvedSource
from fedbip_cli.taskvec import block_of, group_modules
from fedbip_cli.weights import WeightOptions, personalized_weights

Q0, D0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
Q1, D1 = "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
HEAD = "lm_head"
SHAPES = {Q0: (6, 5), D0: (5, 7), Q1: (6, 5), D1: (5, 7), HEAD: (4, 5)}  # (out, in)
GROUPS = {
    "model": {"model": [HEAD, D0, Q0, D1, Q1]},
    "block": {HEAD: [HEAD], "model.layers.0": [D0, Q0], "model.layers.1": [D1, Q1]},
    "module": {m: [m] for m in (HEAD, D0, Q0, D1, Q1)},  # natural order
}
GRANULARITIES = tuple(GROUPS)

SIM_ATOL = 1e-10  # similarities are float64 throughout
# Norm-relative error of a merged ΔW read back from the written adapter, by output dtype.
MERGE_RTOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# peft resolves per-module patterns by the first key whose regex matches the name's tail: the
# specific `layers\.0\..*q_proj` comes after `q_proj`, so it never applies.
SPECIFIC = r"layers\.0\..*q_proj"
RANK_PATTERN = {"q_proj": 3, SPECIFIC: 1, "down_proj": 1}
ALPHA_PATTERN = {"q_proj": 12, SPECIFIC: 2}


# --- scenarios and references ------------------------------------------------------------------


def build(scenario: str, root: Path, seed: int = 1234) -> list[Path]:
    """Client adapter directories for one scenario, under ``root`` (one sub-directory each)."""
    gen = torch.Generator().manual_seed(seed)

    def make(name: str, **kw: object) -> Path:
        return random_adapter(root / name, SHAPES, gen, **kw)

    if scenario == "mixed_ranks":
        return [
            make("c0", r=1, lora_alpha=4),
            make("c1", r=2, lora_alpha=8),
            make("c2", r=3, lora_alpha=2),
            make("c3", r=2, lora_alpha=16),
        ]
    if scenario == "rslora":
        return [
            make("c0", r=1, lora_alpha=8, use_rslora=True),
            make("c1", r=4, lora_alpha=8, use_rslora=True),
            make("c2", r=2, lora_alpha=3),
        ]
    if scenario == "patterns":
        return [
            make("c0", r=2, lora_alpha=4, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
            make("c1", r=2, lora_alpha=4),
            make(
                "c2", r=1, lora_alpha=2, rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 32}
            ),
        ]
    if scenario == "fan_in_fan_out":
        return [make(f"c{i}", r=r, lora_alpha=4, fan_in_fan_out=True) for i, r in enumerate((2, 3, 2))]
    if scenario == "missing":
        return [make("c0", r=2), make("c1", r=3, missing=[HEAD, D1]), make("c2", r=2, lora_alpha=6, missing=[Q0])]
    if scenario in ("float16", "bfloat16"):
        dtype = getattr(torch, scenario)
        return [make(f"c{i}", r=r, lora_alpha=4, dtype=dtype) for i, r in enumerate((2, 1, 3))]
    raise ValueError(scenario)


SCENARIOS = ("mixed_ranks", "rslora", "patterns", "fan_in_fan_out", "missing", "float16", "bfloat16")


def reference_deltas(dirs: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [dense_deltas(d, SHAPES) for d in dirs]


def reference_cosine(deltas: list[dict[str, torch.Tensor]], modules: list[str]) -> torch.Tensor:
    """Cosine of flattened ΔWs over ``modules``; a zero task vector is similar only to itself."""
    vecs = torch.stack([torch.cat([d[m].flatten() for m in modules]) for d in deltas])
    norms = vecs.norm(dim=1)
    k = len(deltas)
    cos = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            if norms[i] > 0 and norms[j] > 0:
                cos[i, j] = (vecs[i] @ vecs[j]) / (norms[i] * norms[j])
    cos.fill_diagonal_(1.0)
    return cos


def reference_paper_weights(similarity: torch.Tensor) -> torch.Tensor:
    clipped = similarity.clamp(min=0)
    return clipped / clipped.sum(dim=1, keepdim=True)


def group_of(granularity: str) -> dict[str, str]:
    return {m: g for g, members in GROUPS[granularity].items() for m in members}


def reference_merges(
    dirs: list[Path], granularity: str
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Paper/clip weights per group and M_i^m = Σ_j P_ij ΔW_j^m for every client i."""
    deltas = reference_deltas(dirs)
    weights = {g: reference_paper_weights(reference_cosine(deltas, ms)) for g, ms in GROUPS[granularity].items()}
    groups = group_of(granularity)
    merged = [
        {m: sum(weights[groups[m]][i, j] * deltas[j][m] for j in range(len(dirs))) for m in SHAPES}
        for i in range(len(dirs))
    ]
    return weights, merged


def run_merge(dirs: list[Path], out: Path, **options: object) -> pipeline.MergeResult:
    weights = WeightOptions(
        **{k: options.pop(k) for k in ("weighting", "negative", "temperature", "top_k") if k in options}
    )
    workspace = pipeline.load([str(d) for d in dirs])
    return pipeline.merge(workspace, MergeOptions(weights=weights, device="cpu", **options), out)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.to(torch.float64) - expected).abs().max())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F (the absolute error when expected is zero)."""
    diff = float((actual.to(torch.float64) - expected).norm())
    scale = float(expected.norm())
    return diff / scale if scale > 0 else diff


def assert_similarity_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = max_abs_error(actual, expected)
    assert err <= SIM_ATOL, f"{what}: similarity off by {err:.3g}"


def assert_delta_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.1g}"


def dtype_of(dirs: list[Path]) -> torch.dtype:
    return next(iter(read_adapter(dirs[0])[1].values())).dtype


# --- similarity --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_similarity_matches_dense_reference(tmp_path: Path, scenario: str, granularity: str) -> None:
    dirs = build(scenario, tmp_path)
    deltas = reference_deltas(dirs)

    result = pipeline.inspect(pipeline.load([str(d) for d in dirs]), granularity=granularity, device="cpu")

    assert result.clients == [d.name for d in dirs]
    assert {g: s.modules for g, s in result.groups.items()} == GROUPS[granularity]
    assert list(result.groups) == list(GROUPS[granularity])
    for name, members in GROUPS[granularity].items():
        group = result.groups[name]
        assert group.similarity.dtype == torch.float64
        assert_similarity_close(group.similarity, reference_cosine(deltas, members), f"{scenario}/{name}")
        norms = torch.stack([torch.cat([d[m].flatten() for m in members]).norm() for d in deltas])
        assert torch.allclose(group.norms, norms, rtol=1e-12, atol=0)


def test_similarity_is_not_trivial(tmp_path: Path) -> None:
    """The scenarios give off-diagonal similarities of both signs, so clipping and weighting matter."""
    result = pipeline.inspect(pipeline.load([str(d) for d in build("mixed_ranks", tmp_path)]), device="cpu")
    off = result.groups["model"].similarity[~torch.eye(4, dtype=torch.bool)]
    assert (off > 0.01).any() and (off < -0.01).any()


def test_missing_module_is_a_zero_delta(tmp_path: Path) -> None:
    """A client that does not target a module is orthogonal to everyone there and similar only to itself."""
    dirs = build("missing", tmp_path)
    result = pipeline.inspect(pipeline.load([str(d) for d in dirs]), granularity="module", device="cpu")
    head = result.groups[HEAD]
    assert head.norms[1] == 0
    assert head.similarity[1].tolist() == [0.0, 1.0, 0.0]
    assert head.similarity[:, 1].tolist() == [0.0, 1.0, 0.0]
    assert personalized_weights(head.similarity, WeightOptions())[1].tolist() == [0.0, 1.0, 0.0]


def test_zero_task_vector_is_refused(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    good = random_adapter(tmp_path / "good", SHAPES, gen)
    factors = {m: (a, torch.zeros_like(b)) for m, (a, b) in random_factors(SHAPES, gen).items()}
    untrained = write_lora_adapter(tmp_path / "untrained", factors, r=2, lora_alpha=4)
    with pytest.raises(AdapterError, match="untrained"):
        pipeline.inspect(pipeline.load([str(good), str(untrained)]), device="cpu")


def test_block_grouping_and_natural_order() -> None:
    names = [
        "encoder.layer.10.x",
        "encoder.layer.3.x",
        "model.layers.12.y",
        "transformer.h.0.z",
        "lm_head",
        "blocks.7.w",
        "encoder.layer.2.x",
        "encoder.layer.2.attn.q",
    ]
    assert block_of("encoder.layer.3.x") == "encoder.layer.3"
    assert block_of("model.layers.12.y") == "model.layers.12"
    assert block_of("transformer.h.0.z") == "transformer.h.0"
    assert block_of("blocks.7.w") == "blocks.7"
    assert block_of("lm_head") == "lm_head"
    assert block_of("model.layers.12") == "model.layers.12"
    # "layers" needs the index right after it: a name merely containing the word is its own group.
    assert block_of("encoder.layernorm.weight") == "encoder.layernorm.weight"

    blocks = group_modules(names, "block")
    assert list(blocks) == [
        "blocks.7",
        "encoder.layer.2",
        "encoder.layer.3",
        "encoder.layer.10",
        "lm_head",
        "model.layers.12",
        "transformer.h.0",
    ]
    assert blocks["encoder.layer.2"] == ["encoder.layer.2.attn.q", "encoder.layer.2.x"]
    assert blocks["lm_head"] == ["lm_head"]

    ordered = group_modules(names, "model")["model"]
    assert ordered.index("encoder.layer.2.x") < ordered.index("encoder.layer.3.x") < ordered.index("encoder.layer.10.x")
    assert list(group_modules(names, "module")) == ordered
    assert all(group_modules(names, "module")[m] == [m] for m in names)


# --- LoRA config semantics ---------------------------------------------------------------------


def test_pattern_lookup_matches_peft() -> None:
    """The factories' (and so the reference's) pattern lookup is peft's own."""
    other = pytest.importorskip("peft.utils.other")
    for name in (Q0, Q1, D0, D1, HEAD, "q_proj", "model.layers.0.self_attn.xq_proj"):
        key = other.get_pattern_key(list(RANK_PATTERN), name)
        assert pattern_value(RANK_PATTERN, name, None) == RANK_PATTERN.get(key)


def tiny_base(shapes: dict[str, tuple[int, int]], conv1d: bool) -> torch.nn.Module:
    """A bare module tree with one layer per adapted module: nn.Linear, or GPT-2's Conv1D (fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    root = torch.nn.Module()
    for name, (out_features, in_features) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(
            leaf,
            Conv1D(out_features, in_features) if conv1d else torch.nn.Linear(in_features, out_features, bias=False),
        )
    return root


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reference_is_peft_get_delta_weight(tmp_path: Path, scenario: str) -> None:
    """The dense reference itself, checked against peft loading the same adapter directory."""
    peft = pytest.importorskip("peft")
    for d in build(scenario, tmp_path):
        model = peft.PeftModel.from_pretrained(tiny_base(SHAPES, conv1d=scenario == "fan_in_fan_out"), str(d))
        layers = {
            n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")
        }
        # peft adapts every module matching target_modules; one absent from the file keeps B = 0.
        for name, shape in SHAPES.items():
            want = dense_delta(d, name, shape)
            got = layers[name].get_delta_weight("default").detach() if name in layers else torch.zeros_like(want)
            assert_delta_close(got, want, MERGE_RTOL[torch.float32], f"{d.name}/{name}")


def test_rank_and_alpha_patterns_first_match_wins(tmp_path: Path) -> None:
    dirs = build("patterns", tmp_path)
    assert pattern_value({SPECIFIC: 1}, Q0, None) == 1  # alone, the specific key would apply
    assert lora_rank(dirs[0], Q0) == 3  # but `q_proj` comes first
    adapter = load_adapter(ResolvedSource("c0", dirs[0], str(dirs[0])))
    assert (adapter.modules[Q0].rank, adapter.modules[Q0].scale) == (3, 12 / 3)
    assert (adapter.modules[Q1].rank, adapter.modules[Q1].scale) == (3, 12 / 3)
    assert (adapter.modules[D0].rank, adapter.modules[D0].scale) == (1, 4 / 1)
    assert (adapter.modules[HEAD].rank, adapter.modules[HEAD].scale) == (2, 4 / 2)
    c2 = load_adapter(ResolvedSource("c2", dirs[2], str(dirs[2])))
    assert (c2.modules[D1].rank, c2.modules[D1].scale) == (4, 32 / 4)
    assert (c2.modules[D0].rank, c2.modules[D0].scale) == (4, 2 / 4)


def test_rslora_scale(tmp_path: Path) -> None:
    dirs = build("rslora", tmp_path)
    c1 = load_adapter(ResolvedSource("c1", dirs[1], str(dirs[1])))
    c2 = load_adapter(ResolvedSource("c2", dirs[2], str(dirs[2])))
    assert c1.modules[Q0].scale == pytest.approx(8 / math.sqrt(4), rel=1e-15)
    assert c2.modules[Q0].scale == pytest.approx(3 / 2, rel=1e-15)


def test_a_config_without_lora_alpha_takes_peft_default(tmp_path: Path) -> None:
    """peft's LoraConfig defaults lora_alpha to 8; an adapter_config.json without it scales by 8 / r."""
    peft = pytest.importorskip("peft")
    default = peft.LoraConfig().lora_alpha
    directory = random_adapter(tmp_path / "c0", SHAPES, torch.Generator().manual_seed(1), r=4, lora_alpha=3)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["lora_alpha"]
    config_file.write_text(json.dumps(config))

    adapter = load_adapter(ResolvedSource("c0", directory, str(directory)))

    assert {spec.scale for spec in adapter.modules.values()} == {default / 4}


def test_fan_in_fan_out_reference_is_transposed(tmp_path: Path) -> None:
    """The reference itself: same tensors, fan_in_fan_out only changes the layout of ΔW."""
    gen = torch.Generator().manual_seed(5)
    factors = random_factors(SHAPES, gen)
    plain = write_lora_adapter(tmp_path / "plain", factors, r=2, lora_alpha=4)
    fifo = write_lora_adapter(tmp_path / "fifo", factors, r=2, lora_alpha=4, fan_in_fan_out=True)
    assert dense_delta(fifo, D0, SHAPES[D0]).shape == (7, 5)
    assert torch.equal(dense_delta(fifo, D0, SHAPES[D0]), dense_delta(plain, D0, SHAPES[D0]).T)


# --- invariants --------------------------------------------------------------------------------


def refactored(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], gen: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) -> (G⁻¹ A, B G) with G = Q₁ diag(d) Q₂, d in [0.4, 2.5]: the same ΔW, other factors."""
    out = {}
    for module, (a, b) in factors.items():
        r = a.shape[0]
        q1 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
        d = 0.4 + 2.1 * torch.rand(r, generator=gen, dtype=torch.float64)
        g = q1 @ torch.diag(d) @ q2
        out[module] = (torch.linalg.solve(g, a), b @ g)
    return out


def test_refactoring_leaves_similarity_unchanged(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    originals = [random_factors(SHAPES, gen, r=r) for r in (3, 2, 4)]
    dirs = [
        write_lora_adapter(tmp_path / "orig" / f"c{i}", f, r=f[Q0][0].shape[0], lora_alpha=4)
        for i, f in enumerate(originals)
    ]
    # float64 storage, so the refactored adapter has the same ΔW to ~1e-15.
    moved = refactored(originals[0], gen)
    twin = write_lora_adapter(tmp_path / "c0_refactored", moved, r=3, lora_alpha=4)

    for granularity in GRANULARITIES:
        before = pipeline.inspect(pipeline.load([str(d) for d in dirs]), granularity=granularity, device="cpu")
        after = pipeline.inspect(pipeline.load([str(twin), *map(str, dirs[1:])]), granularity=granularity, device="cpu")
        for name, group in before.groups.items():
            assert_similarity_close(after.groups[name].similarity, group.similarity, f"refactored/{name}")
    pair = pipeline.inspect(pipeline.load([str(dirs[0]), str(twin)]), granularity="module", device="cpu")
    for group in pair.groups.values():
        assert_similarity_close(group.similarity, torch.ones(2, 2, dtype=torch.float64), "original vs refactored")

    # The invariance is real: cosine of the flattened [A; B] factors does change.
    for module in SHAPES:
        (a, b), (a2, b2) = originals[0][module], moved[module]
        flat, flat2 = torch.cat([a.flatten(), b.flatten()]), torch.cat([a2.flatten(), b2.flatten()])
        assert float(flat @ flat2 / (flat.norm() * flat2.norm())) < 0.99


def test_identical_adapters_have_similarity_one(tmp_path: Path) -> None:
    first = random_adapter(tmp_path / "a", SHAPES, torch.Generator().manual_seed(3), r=3)
    shutil.copytree(first, tmp_path / "b")
    shutil.copytree(first, tmp_path / "c")
    for granularity in GRANULARITIES:
        result = pipeline.inspect(
            pipeline.load([str(tmp_path / n) for n in "abc"]), granularity=granularity, device="cpu"
        )
        for group in result.groups.values():
            assert_similarity_close(group.similarity, torch.ones(3, 3, dtype=torch.float64), granularity)


@pytest.mark.parametrize(
    "options",
    [
        WeightOptions(),
        WeightOptions(negative="keep"),
        WeightOptions(weighting="softmax", temperature=0.3),
        WeightOptions(weighting="softmax", negative="keep", temperature=2.0),
        WeightOptions(top_k=2),
        WeightOptions(weighting="softmax", top_k=3),
    ],
    ids=["paper", "paper-keep", "softmax", "softmax-keep", "topk", "softmax-topk"],
)
def test_weight_rows_sum_to_one(options: WeightOptions) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64) + 0.6  # mostly positive similarities
    x = x / x.norm(dim=1, keepdim=True)
    similarity = x @ x.T
    assert (similarity < 0).any()
    weights = personalized_weights(similarity, options)
    assert torch.allclose(weights.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-14, rtol=0)
    assert (weights.diagonal() > 0).all()
    if options.negative == "clip":
        assert (weights[similarity < 0] == 0).all()


@pytest.mark.parametrize("combine", ["cat", "svd"])
def test_top_k_one_merges_to_own_delta(tmp_path: Path, combine: str) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    result = run_merge(dirs, tmp_path / "out", combine=combine, top_k=1)
    assert torch.equal(result.weights["model"], torch.eye(4, dtype=torch.float64))
    for i, (client, expected) in enumerate(zip(result.similarity.clients, reference_deltas(dirs))):
        assert lora_rank(tmp_path / "out" / client, Q0) == lora_rank(dirs[i], Q0)
        for m in SHAPES:
            assert_delta_close(
                dense_delta(tmp_path / "out" / client, m, SHAPES[m]),
                expected[m],
                MERGE_RTOL[torch.float32],
                f"{client}/{m}",
            )


def test_identical_clients_merge_to_their_delta(tmp_path: Path) -> None:
    first = random_adapter(tmp_path / "in" / "a", SHAPES, torch.Generator().manual_seed(4), r=2, lora_alpha=8)
    for name in "bc":
        shutil.copytree(first, tmp_path / "in" / name)
    expected = dense_deltas(first, SHAPES)
    result = run_merge([tmp_path / "in" / n for n in "abc"], tmp_path / "out")  # svd at the input rank
    assert torch.allclose(result.weights["model"], torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=1e-12)
    for client in "abc":
        assert lora_rank(tmp_path / "out" / client, Q0) == 2
        for m in SHAPES:
            assert_delta_close(
                dense_delta(tmp_path / "out" / client, m, SHAPES[m]),
                expected[m],
                MERGE_RTOL[torch.float32],
                f"{client}/{m}",
            )
            assert result.energy[client][m] == pytest.approx(1.0, abs=1e-12)


# --- weights ---------------------------------------------------------------------------------

S = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, 0.3], [-0.2, 0.3, 1.0]], dtype=torch.float64)


def e(x: float) -> float:
    return math.exp(x)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (WeightOptions(), [[2 / 3, 1 / 3, 0], [0.5 / 1.8, 1 / 1.8, 0.3 / 1.8], [0, 0.3 / 1.3, 1 / 1.3]]),
        (
            WeightOptions(negative="keep"),
            [[1 / 1.3, 0.5 / 1.3, -0.2 / 1.3], [0.5 / 1.8, 1 / 1.8, 0.3 / 1.8], [-0.2 / 1.1, 0.3 / 1.1, 1 / 1.1]],
        ),
        (
            WeightOptions(weighting="softmax", temperature=0.5),
            [
                [e(2) / (e(2) + e(1)), e(1) / (e(2) + e(1)), 0],
                [e(1) / (e(1) + e(2) + e(0.6)), e(2) / (e(1) + e(2) + e(0.6)), e(0.6) / (e(1) + e(2) + e(0.6))],
                [0, e(0.6) / (e(0.6) + e(2)), e(2) / (e(0.6) + e(2))],
            ],
        ),
        (
            WeightOptions(weighting="softmax", negative="keep", temperature=2.0),
            [
                [
                    e(0.5) / (e(0.5) + e(0.25) + e(-0.1)),
                    e(0.25) / (e(0.5) + e(0.25) + e(-0.1)),
                    e(-0.1) / (e(0.5) + e(0.25) + e(-0.1)),
                ],
                [
                    e(0.25) / (e(0.25) + e(0.5) + e(0.15)),
                    e(0.5) / (e(0.25) + e(0.5) + e(0.15)),
                    e(0.15) / (e(0.25) + e(0.5) + e(0.15)),
                ],
                [
                    e(-0.1) / (e(-0.1) + e(0.15) + e(0.5)),
                    e(0.15) / (e(-0.1) + e(0.15) + e(0.5)),
                    e(0.5) / (e(-0.1) + e(0.15) + e(0.5)),
                ],
            ],
        ),
        (WeightOptions(top_k=2), [[2 / 3, 1 / 3, 0], [0.5 / 1.5, 1 / 1.5, 0], [0, 0.3 / 1.3, 1 / 1.3]]),
        (
            WeightOptions(top_k=2, negative="keep"),
            [[2 / 3, 1 / 3, 0], [0.5 / 1.5, 1 / 1.5, 0], [0, 0.3 / 1.3, 1 / 1.3]],
        ),
        (WeightOptions(top_k=1), [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        (
            WeightOptions(top_k=3, negative="keep"),
            [[1 / 1.3, 0.5 / 1.3, -0.2 / 1.3], [0.5 / 1.8, 1 / 1.8, 0.3 / 1.8], [-0.2 / 1.1, 0.3 / 1.1, 1 / 1.1]],
        ),
    ],
    ids=["paper", "paper-keep", "softmax-T0.5", "softmax-keep-T2", "top2", "top2-keep", "top1", "top3-keep"],
)
def test_weights_hand_computed(options: WeightOptions, expected: list[list[float]]) -> None:
    weights = personalized_weights(S, options)
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)


def test_top_k_keeps_self_and_breaks_ties_to_lower_index() -> None:
    ones = torch.ones(4, 4, dtype=torch.float64)  # every client ties with every other, and with itself
    mask = personalized_weights(ones, WeightOptions(top_k=2)) > 0
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, False, False, True],
    ]
    tied = torch.tensor([[1.0, 0.4, 0.4], [0.4, 1.0, 0.4], [0.4, 0.4, 1.0]], dtype=torch.float64)
    weights = personalized_weights(tied, WeightOptions(top_k=2))
    assert torch.allclose(
        weights, torch.tensor([[1, 0.4, 0], [0.4, 1, 0], [0.4, 0, 1]], dtype=torch.float64) / 1.4, atol=1e-15
    )
    softmax = personalized_weights(tied, WeightOptions(weighting="softmax", top_k=2))
    assert ((softmax > 0) == (weights > 0)).all()


def test_keep_with_non_positive_row_sum_raises() -> None:
    similarity = torch.tensor([[1.0, -0.6, -0.6], [-0.6, 1.0, 0.1], [-0.6, 0.1, 1.0]], dtype=torch.float64)
    with pytest.raises(FedbipError, match=r"row\(s\) \[0\]"):
        personalized_weights(similarity, WeightOptions(negative="keep"))
    assert torch.allclose(
        personalized_weights(similarity, WeightOptions())[0], torch.tensor([1.0, 0, 0], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("make", "valid"),
    [
        (lambda: WeightOptions(weighting="mean"), ("paper", "softmax")),
        (lambda: WeightOptions(negative="abs"), ("clip", "keep")),
        (lambda: combiner("ties"), ("svd", "cat", "linear")),
        (lambda: MergeOptions(combine="ties"), ("svd", "cat", "linear")),
        (lambda: group_modules(["a"], "layer"), ("model", "block", "module")),
        (lambda: pipeline.resolve_device("tpu"), ("auto", "cpu", "cuda")),
    ],
    ids=["weighting", "negative", "combiner", "merge-options", "granularity", "device"],
)
def test_unknown_names_list_the_valid_ones(make: Callable[[], object], valid: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as info:
        make()
    assert all(name in str(info.value) for name in valid)


@pytest.mark.parametrize(
    "make",
    [lambda: WeightOptions(temperature=0), lambda: WeightOptions(top_k=0), lambda: MergeOptions(rank=0)],
    ids=["temperature", "top-k", "rank"],
)
def test_invalid_numbers_are_usage_errors(make: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        make()


# --- merges end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["model", "block"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cat_merge_is_exact(tmp_path: Path, scenario: str, granularity: str) -> None:
    dirs = build(scenario, tmp_path / "in")
    weights, expected = reference_merges(dirs, granularity)

    result = run_merge(dirs, tmp_path / "out", combine="cat", granularity=granularity)

    dtype = dtype_of(dirs)
    for name, w in weights.items():
        assert torch.allclose(result.weights[name], w, atol=1e-10, rtol=0)
    for i, client in enumerate(result.similarity.clients):
        config, tensors = read_adapter(tmp_path / "out" / client)
        assert {t.dtype for t in tensors.values()} == {dtype}
        assert config["fan_in_fan_out"] == (scenario == "fan_in_fan_out")
        for m in SHAPES:
            got = dense_delta(tmp_path / "out" / client, m, SHAPES[m])
            assert_delta_close(got, expected[i][m], MERGE_RTOL[dtype], f"{scenario}/{client}/{m}")
            contributing = [
                j
                for j, d in enumerate(dirs)
                if weights[group_of(granularity)[m]][i, j] != 0 and f"{m}.lora_A.weight" in read_adapter(d)[1]
            ]
            rank = sum(lora_rank(dirs[j], m) for j in contributing)
            assert (lora_rank(tmp_path / "out" / client, m) if rank else 0) == rank


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_svd_at_full_rank_is_lossless(tmp_path: Path, scenario: str) -> None:
    dirs = build(scenario, tmp_path / "in")
    _, expected = reference_merges(dirs, "block")

    result = run_merge(dirs, tmp_path / "out", combine="svd", granularity="block", rank=64)

    assert result.rank == 64
    for i, client in enumerate(result.similarity.clients):
        for m in SHAPES:
            got = dense_delta(tmp_path / "out" / client, m, SHAPES[m])
            assert_delta_close(got, expected[i][m], MERGE_RTOL[dtype_of(dirs)], f"{scenario}/{client}/{m}")
            if float(expected[i][m].norm()) > 0:
                assert result.energy[client][m] == pytest.approx(1.0, abs=1e-12)
                assert lora_rank(tmp_path / "out" / client, m) <= min(SHAPES[m])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_truncation_equals_dense_truncated_svd(tmp_path: Path, rank: int) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    _, expected = reference_merges(dirs, "block")

    result = run_merge(dirs, tmp_path / "out", combine="svd", granularity="block", rank=rank)

    truncated_modules = 0
    for i, client in enumerate(result.similarity.clients):
        for m in SHAPES:
            row = result.weights[group_of("block")[m]][i]
            stacked = sum(lora_rank(d, m) for j, d in enumerate(dirs) if row[j] != 0)
            keep = min(rank, stacked, *SHAPES[m])
            u, sigma, vh = torch.linalg.svd(expected[i][m], full_matrices=False)
            if keep < len(sigma) and sigma[keep] > 1e-9 * sigma[0]:
                assert sigma[keep - 1] > sigma[keep] * (1 + 1e-3)  # a unique best rank-R approximation
                truncated_modules += 1
            truncated = (u[:, :keep] * sigma[:keep]) @ vh[:keep]
            energy = float((sigma[:keep] ** 2).sum() / (sigma**2).sum())
            assert lora_rank(tmp_path / "out" / client, m) == keep
            assert_delta_close(
                dense_delta(tmp_path / "out" / client, m, SHAPES[m]),
                truncated,
                MERGE_RTOL[torch.float32],
                f"{client}/{m}",
            )
            assert result.energy[client][m] == pytest.approx(energy, rel=1e-10)
            assert result.manifest["energy_kept"][client][m] == result.energy[client][m]
    assert truncated_modules >= len(SHAPES)  # the truncation really drops something, often


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_merge_averages_factors(tmp_path: Path, fan_in_fan_out: bool) -> None:
    gen = torch.Generator().manual_seed(21)
    alphas = (4, 16, 2)
    # A shared initialisation plus client noise (FedIT's setting): positive similarities, dense weights.
    shared = random_factors(SHAPES, gen, r=2)
    raw = [
        {
            m: (a + 0.7 * n[0], b + 0.7 * n[1])
            for (m, (a, b)), n in zip(shared.items(), random_factors(SHAPES, gen, r=2).values())
        }
        for _ in alphas
    ]
    dirs = [
        write_lora_adapter(
            tmp_path / "in" / f"c{i}", f, r=2, lora_alpha=alpha, fan_in_fan_out=fan_in_fan_out, dtype=torch.float32
        )
        for i, (f, alpha) in enumerate(zip(raw, alphas))
    ]
    stored = [read_adapter(d)[1] for d in dirs]
    weights, _ = reference_merges(dirs, "model")
    p = weights["model"]
    assert (p > 0.1).all()

    run_merge(dirs, tmp_path / "out", combine="linear")

    for i in range(3):
        for m in SHAPES:
            b = sum(p[i, j] * (alphas[j] / 2) * stored[j][f"{m}.lora_B.weight"].double() for j in range(3))
            a = sum(p[i, j] * stored[j][f"{m}.lora_A.weight"].double() for j in range(3))
            want = (b @ a).T if fan_in_fan_out else b @ a
            assert_delta_close(
                dense_delta(tmp_path / "out" / f"c{i}", m, SHAPES[m]), want, MERGE_RTOL[torch.float32], f"c{i}/{m}"
            )
            assert lora_rank(tmp_path / "out" / f"c{i}", m) == 2
    exact = sum(p[0, j] * dense_delta(dirs[j], Q0, SHAPES[Q0]) for j in range(3))
    assert relative_error(dense_delta(tmp_path / "out" / "c0", Q0, SHAPES[Q0]), exact) > 1e-2  # linear is not Σ P ΔW


def test_linear_merge_with_unequal_ranks_raises(tmp_path: Path) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    with pytest.raises(FedbipError, match="equal ranks"):
        run_merge(dirs, tmp_path / "out", combine="linear")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("combine", ["cat", "svd"])
def test_zero_weight_clients_are_skipped(tmp_path: Path, combine: str) -> None:
    """c2 = -c0 (S = -1): with clip, c0 and c1 give it weight 0 and do not stack its factors."""
    gen = torch.Generator().manual_seed(9)
    base = random_factors(SHAPES, gen, r=2)
    extra = random_factors(SHAPES, gen, r=1)
    near = {m: (torch.cat([a, extra[m][0]]), torch.cat([b, 0.3 * extra[m][1]], dim=1)) for m, (a, b) in base.items()}
    opposite = {m: (torch.cat([a, extra[m][0]]), torch.cat([-b, 0 * extra[m][1]], dim=1)) for m, (a, b) in base.items()}
    dirs = [
        write_lora_adapter(tmp_path / "in" / "c0", base, r=2, lora_alpha=4, dtype=torch.float32),
        write_lora_adapter(tmp_path / "in" / "c1", near, r=3, lora_alpha=6, dtype=torch.float32),
        write_lora_adapter(tmp_path / "in" / "c2", opposite, r=3, lora_alpha=6, dtype=torch.float32),  # scale 2, as c0
    ]
    weights, expected = reference_merges(dirs, "model")
    p = weights["model"]
    assert p[0, 2] == 0 and p[1, 2] == 0 and p[2, 0] == 0 and p[2, 1] == 0 and p[0, 1] > 0.3

    result = run_merge(dirs, tmp_path / "out", combine=combine, rank=64)

    assert torch.allclose(result.weights["model"], p, atol=1e-10)
    stacked = {"c0": 2 + 3, "c1": 2 + 3, "c2": 3}  # Σ r over the clients with non-zero weight
    for i, client in enumerate(["c0", "c1", "c2"]):
        for m in SHAPES:
            want = stacked[client] if combine == "cat" else min(stacked[client], *SHAPES[m])
            assert lora_rank(tmp_path / "out" / client, m) == want
            assert_delta_close(
                dense_delta(tmp_path / "out" / client, m, SHAPES[m]),
                expected[i][m],
                MERGE_RTOL[torch.float32],
                f"{client}/{m}",
            )


@pytest.mark.parametrize("combine", ["cat", "svd"])
def test_negative_keep_merge_matches_dense_reference(tmp_path: Path, combine: str) -> None:
    """End to end through files: ``--negative keep`` merges with S/Σ_j S_ij, negative entries included."""
    dirs = build("mixed_ranks", tmp_path / "in")
    deltas = reference_deltas(dirs)
    similarity = reference_cosine(deltas, list(SHAPES))
    p = similarity / similarity.sum(dim=1, keepdim=True)
    assert (p < -0.01).any() and (similarity.sum(dim=1) > 0).all()

    result = run_merge(dirs, tmp_path / "out", combine=combine, rank=64, negative="keep")

    assert torch.allclose(result.weights["model"], p, atol=1e-10, rtol=0)
    for i, client in enumerate(result.similarity.clients):
        for m, shape in SHAPES.items():
            want = sum(p[i, j] * deltas[j][m] for j in range(len(dirs)))
            got = dense_delta(tmp_path / "out" / client, m, shape)
            assert_delta_close(got, want, MERGE_RTOL[torch.float32], f"{client}/{m}")


# --- determinism and manifest --------------------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_merge_is_byte_identical_and_manifest_is_faithful(tmp_path: Path) -> None:
    dirs = build("missing", tmp_path / "in")
    first = run_merge(dirs, tmp_path / "one", granularity="block", rank=2)
    run_merge(dirs, tmp_path / "two", granularity="block", rank=2)

    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert sorted(one) == sorted(
        [MANIFEST_NAME]
        + [
            f"{c}/{f}"
            for c in ("c0", "c1", "c2")
            for f in ("README.md", "adapter_config.json", "adapter_model.safetensors")
        ]
    )
    assert one == two

    record = json.loads(one[MANIFEST_NAME])
    assert record == first.manifest
    assert record["options"] == {
        "granularity": "block",
        "weighting": "paper",
        "negative": "clip",
        "temperature": 1.0,
        "top_k": None,
        "combine": "svd",
        "rank": 2,
        "dtype": "auto",
        "similarity": {"method": "exact"},
        "clip_norm": None,
        "heads": None,
    }
    assert [i["name"] for i in record["inputs"]] == ["c0", "c1", "c2"]
    for entry, d in zip(record["inputs"], dirs):
        assert entry["sha256"] == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert entry["source"] == str(d)  # as given (run_merge passes each directory)
    assert record["clients"] == ["c0", "c1", "c2"]
    assert record["granularity"] == "block"
    deltas = reference_deltas(dirs)
    assert {g: v["modules"] for g, v in record["groups"].items()} == GROUPS["block"]
    for name, members in GROUPS["block"].items():
        similarity = torch.tensor(record["groups"][name]["similarity"], dtype=torch.float64)
        assert torch.equal(similarity, first.similarity.groups[name].similarity)  # full precision in JSON
        assert_similarity_close(similarity, reference_cosine(deltas, members), f"manifest/{name}")
        weights = torch.tensor(record["groups"][name]["weights"], dtype=torch.float64)
        assert torch.equal(weights, first.weights[name])
        assert torch.allclose(weights, reference_paper_weights(similarity), atol=1e-15)
    assert record["combine"] == "svd" and record["rank"] == 2
    assert set(record["energy_kept"]) == {"c0", "c1", "c2"}
    assert all(0 < v <= 1 for per in record["energy_kept"].values() for v in per.values())
    assert HEAD not in record["energy_kept"]["c1"]  # c1 does not target lm_head and takes only itself there
    assert set(record["outputs"]) == {"c0", "c1", "c2"}
    for client, files in record["outputs"].items():
        assert sorted(files) == [
            f"{client}/README.md",
            f"{client}/adapter_config.json",
            f"{client}/adapter_model.safetensors",
        ]
        for rel, digest in files.items():
            assert digest == hashlib.sha256(one[rel]).hexdigest()


def test_merged_adapter_loads_back(tmp_path: Path) -> None:
    """fedbip's output is itself a valid input, with per-module ranks in rank_pattern (scale 1)."""
    dirs = build("missing", tmp_path / "in")
    run_merge(dirs, tmp_path / "out", combine="cat")
    for client in ("c0", "c1", "c2"):
        adapter = load_adapter(ResolvedSource(client, tmp_path / "out" / client, client))
        assert all(spec.scale == 1.0 for spec in adapter.modules.values())
        assert {m: spec.rank for m, spec in adapter.modules.items()} == {
            m: lora_rank(tmp_path / "out" / client, m) for m in adapter.modules
        }


# --- output safety -----------------------------------------------------------------------------


def test_non_empty_out_is_refused_without_overwrite(tmp_path: Path) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        run_merge(dirs, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    workspace = pipeline.load([str(d) for d in dirs])
    with pytest.raises(OutputError, match="keep.txt"):  # a user's file: not even --overwrite replaces it
        pipeline.merge(workspace, MergeOptions(device="cpu"), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    pipeline.merge(workspace, MergeOptions(device="cpu"), out)
    pipeline.merge(workspace, MergeOptions(device="cpu"), out, overwrite=True)  # its own earlier merge
    assert sorted(p.name for p in out.iterdir()) == sorted(["c0", "c1", "c2", "c3", MANIFEST_NAME])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_out_is_accepted(tmp_path: Path) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    (tmp_path / "out").mkdir()
    run_merge(dirs, tmp_path / "out")
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("where", ["inside-client", "inside-parent-spec", "contains-sources"])
def test_out_overlapping_a_source_is_refused(tmp_path: Path, where: str) -> None:
    dirs = build("mixed_ranks", tmp_path / "clients")
    specs = [str(tmp_path / "clients")] if where == "inside-parent-spec" else [str(d) for d in dirs]
    out = {
        "inside-client": dirs[0] / "merged",
        "inside-parent-spec": tmp_path / "clients" / "merged",
        "contains-sources": tmp_path,
    }[where]
    before = tree_bytes(tmp_path)
    with pytest.raises(OutputError):
        pipeline.merge(pipeline.load(specs), MergeOptions(device="cpu"), out, overwrite=True)
    assert tree_bytes(tmp_path) == before
    assert not (dirs[0] / "merged").exists() and not (tmp_path / "clients" / "merged").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    dirs = build("mixed_ranks", tmp_path / "in")
    out = tmp_path / "out"
    if existing:  # a previous merge's OUT, which --overwrite may replace
        pipeline.merge(pipeline.load([str(d) for d in dirs]), MergeOptions(device="cpu"), out)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    real = adapter_workspace.write_config
    written: list[Path] = []

    def fail_after_first(directory: Path, *args: object, **kwargs: object) -> None:
        if written:
            raise RuntimeError("disk full")
        real(directory, *args, **kwargs)
        written.append(directory)

    monkeypatch.setattr(adapter_workspace, "write_config", fail_after_first)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.merge(pipeline.load([str(d) for d in dirs]), MergeOptions(device="cpu"), out, overwrite=existing)

    assert len(written) == 1 and not written[0].exists()
    if existing:
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in", "out"] if existing else ["in"])


@pytest.mark.parametrize("block", [1024, 7])
def test_cosine_is_exactly_symmetric_even_from_an_asymmetric_gram(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(similarity_module, "SYMMETRIC_BLOCK", block)
    x = torch.randn(50, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = x @ x.T
    gram += 1e-13 * torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cosine, norms = similarity_module.cosine_from_inner(gram)
    assert torch.equal(cosine, cosine.T)
    upper = torch.triu(gram) + torch.triu(gram, 1).T  # the reference: the upper triangle, mirrored
    expected = upper / (norms[:, None] * norms[None, :])
    expected.fill_diagonal_(1.0)
    assert torch.equal(cosine, expected)
    in_place, _ = similarity_module.cosine_from_inner(gram.clone(), in_place=True)
    assert torch.equal(in_place, cosine)
