"""The simulated client's model: seeded initial state, state swapping, training, evaluation, and
adapters that peft loads back to the same outputs.

Fast on purpose: the embedded MiniLM cut to its first 2 encoder layers, batches of 8, 32 tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel

from fedbip_cli.adapters import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import model as model_module
from fedbip_cli.simulate.model import HEAD_NAME, ClientModel, Tokens, embedded_model_dir

LAYERS = 2
NUM_LABELS = 5
RANK = 8
BATCH = 8
SPORT, BUSINESS = 1, 3
SENTENCES = [
    ("the striker scored twice as the team won the cup final", SPORT),
    ("the bank reported lower quarterly profits and shares fell", BUSINESS),
    ("tennis champion wins the open in straight sets", SPORT),
    ("the central bank raised interest rates again", BUSINESS),
    ("the coach praised his players after the league match", SPORT),
    ("oil prices pushed inflation to a record high", BUSINESS),
    ("olympic sprinter breaks the world record in the final", SPORT),
    ("the company cut jobs after its sales slumped", BUSINESS),
]
MODULES = [f"encoder.layer.{i}.attention.self.{name}" for i in range(LAYERS) for name in ("query", "value")]


def make_model(seed: int = 0) -> ClientModel:
    return ClientModel(
        embedded_model_dir(), num_labels=NUM_LABELS, rank=RANK, max_length=32, seed=seed, num_layers=LAYERS
    )


@pytest.fixture(scope="module")
def model() -> ClientModel:
    return make_model()


@pytest.fixture(scope="module")
def data(model: ClientModel) -> tuple[Tokens, torch.Tensor]:
    return model.tokenize([text for text, _ in SENTENCES]), torch.tensor([label for _, label in SENTENCES])


def random_state(model: ClientModel, seed: int) -> dict[str, torch.Tensor]:
    """A state with every tensor non-zero (lora_B included, unlike the initial state)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.05 * torch.randn(t.shape, generator=generator) for key, t in model.initial_state().items()}


def assert_states_equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_initial_state_is_seeded_and_named_after_base_modules(model: ClientModel) -> None:
    rng = torch.get_rng_state()
    again = make_model(seed=0)
    other = make_model(seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "building a model must not consume the global RNG"

    state = model.initial_state()
    assert model.lora_modules == MODULES
    expected_keys = [f"{m}.lora_{w}" for m in MODULES for w in "AB"] + ["classifier.weight", "classifier.bias"]
    assert list(state) == expected_keys
    assert state[f"{MODULES[0]}.lora_A"].shape == (RANK, 384)
    assert state[f"{MODULES[0]}.lora_B"].shape == (384, RANK)
    assert state["classifier.weight"].shape == (NUM_LABELS, 384)
    assert model.scale == 16 / RANK

    assert_states_equal(state, model.initial_state())
    assert_states_equal(state, again.initial_state())
    for key, tensor in state.items():
        if key.endswith(".lora_B"):
            assert not tensor.any(), f"{key} must start at zero so the adapter starts as the base model"
        else:
            assert tensor.abs().max() > 0
            assert not torch.equal(tensor, other.initial_state()[key]), f"{key} does not depend on the seed"


def test_state_round_trip_and_checks(model: ClientModel) -> None:
    target = random_state(model, seed=3)
    model.load_state(target)
    state = model.state()
    assert_states_equal(state, target)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())

    state["classifier.bias"].add_(1.0)  # a copy: editing it leaves the model alone
    assert torch.equal(model.state()["classifier.bias"], target["classifier.bias"])

    with pytest.raises(ValueError, match="missing"):
        model.load_state({k: v for k, v in target.items() if k != "classifier.bias"})
    with pytest.raises(ValueError, match="shape"):
        model.load_state({**target, "classifier.bias": torch.zeros(NUM_LABELS + 1)})


def test_train_learns_and_changes_only_the_trainable_state(
    model: ClientModel, data: tuple[Tokens, torch.Tensor]
) -> None:
    tokens, labels = data
    initial = model.initial_state()
    model.load_state(initial)
    base_pooled = model.pooled(tokens)
    rng = torch.get_rng_state()

    generator = torch.Generator().manual_seed(0)
    first = model.train(tokens, labels, steps=5, batch_size=BATCH, lr=1e-2, generator=generator)
    last = model.train(tokens, labels, steps=5, batch_size=BATCH, lr=1e-2, generator=generator)
    assert last < 0.5 * first, (first, last)
    assert model.evaluate(tokens, labels) == 1.0
    assert torch.equal(torch.get_rng_state(), rng), "batches must come from the generator passed in"

    trained = model.state()
    for key in initial:
        assert not torch.equal(trained[key], initial[key]), f"{key} was not trained"
    # The frozen base is untouched: with the initial state back in (lora_B = 0), outputs are the base's.
    model.load_state(initial)
    assert torch.equal(model.pooled(tokens), base_pooled)


def test_train_is_reproducible_from_the_generator_seed(model: ClientModel, data: tuple[Tokens, torch.Tensor]) -> None:
    tokens, labels = data
    runs = []
    for seed in (7, 7, 8):
        model.load_state(model.initial_state())
        # 3 steps of 3 over 8 sentences: the batches cross a pass boundary, so the order matters.
        loss = model.train(
            tokens, labels, steps=3, batch_size=3, lr=1e-3, generator=torch.Generator().manual_seed(seed)
        )
        runs.append((loss, model.state()))
    assert runs[0][0] == runs[1][0]
    assert_states_equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1]["classifier.weight"], runs[2][1]["classifier.weight"]), "the seed must matter"


def test_evaluate_counts_argmax_predictions(model: ClientModel, data: tuple[Tokens, torch.Tensor]) -> None:
    tokens, _ = data
    state = random_state(model, seed=5)
    model.load_state(state)
    pooled = model.pooled(tokens, batch_size=3)
    # Batched, length-sorted pooling returns rows in input order, as one sentence at a time does.
    one_by_one = torch.cat([model.pooled(tokens[i : i + 1]) for i in range(len(tokens))])
    torch.testing.assert_close(pooled, one_by_one, atol=1e-5, rtol=1e-5)

    predictions = (pooled @ state["classifier.weight"].T + state["classifier.bias"]).argmax(dim=1)
    labels = predictions.clone()
    wrong = torch.tensor([0, 3, 4])
    labels[wrong] = (labels[wrong] + 1) % NUM_LABELS
    expected = (len(labels) - len(wrong)) / len(labels)
    assert model.evaluate(tokens, labels, batch_size=3) == pytest.approx(expected)
    assert model.evaluate(tokens, predictions) == 1.0
    assert model.evaluate(tokens, (predictions + 1) % NUM_LABELS) == 0.0


def mean_pooled(encoder: torch.nn.Module, tokens: Tokens) -> torch.Tensor:
    with torch.inference_mode():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    mask = tokens.attention_mask.unsqueeze(-1).float()
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


# PeftModel.from_pretrained calls a transformers API that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapter_loads_in_peft_with_the_same_outputs(
    model: ClientModel, data: tuple[Tokens, torch.Tensor], tmp_path: Path
) -> None:
    tokens, _ = data
    state = random_state(model, seed=9)
    model.save_adapter(state, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME}
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{KEY_PREFIX}{m}.lora_{w}.weight" for m in MODULES for w in "AB")
    head = load_file(tmp_path / HEAD_NAME)
    assert torch.equal(head["classifier.weight"], state["classifier.weight"])
    assert torch.equal(head["classifier.bias"], state["classifier.bias"])

    # Into the full base model: LoRA lands on exactly the sliced model's modules, with its ΔW.
    full = PeftModel.from_pretrained(AutoModel.from_pretrained(embedded_model_dir()), tmp_path)
    layers = {n.removeprefix(KEY_PREFIX): m for n, m in full.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(MODULES)
    for name in MODULES:
        expected = model.scale * state[f"{name}.lora_B"] @ state[f"{name}.lora_A"]
        torch.testing.assert_close(layers[name].get_delta_weight("default"), expected, atol=1e-6, rtol=1e-5)

    # Into a base cut like the model: the same pooled outputs as the ClientModel holding that state,
    # which differ from the base's own (so the comparison sees the adapter).
    base = AutoModel.from_pretrained(embedded_model_dir(), num_hidden_layers=LAYERS).eval()
    base_pooled = mean_pooled(base, tokens)
    sliced = PeftModel.from_pretrained(base, tmp_path).eval()
    model.load_state(state)
    torch.testing.assert_close(mean_pooled(sliced, tokens), model.pooled(tokens), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model.pooled(tokens), base_pooled, atol=1e-3)


def test_bad_options_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="num_layers=7"):
        ClientModel(embedded_model_dir(), num_labels=2, num_layers=7)
    with pytest.raises(UsageError, match="match no layer"):
        ClientModel(embedded_model_dir(), num_labels=2, target_modules=("no_such_module",), num_layers=1)
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="not installed"):
        embedded_model_dir()
