"""The simulated client's model: seeded initial state, state swapping, training, evaluation, and
adapters (LoRA and the head) that peft loads back onto the saved base to the same outputs.

Fast on purpose: the embedded MiniLM cut to its first 2 encoder layers, batches of 8, 32 tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BartConfig, BartForSequenceClassification

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate import model as model_module
from fedbip_cli.simulate.model import ClientModel, Tokens, embedded_model_dir
from fedbip_cli.simulate.strategies import parameter_groups

LAYERS = 2
LABELS = ["world", "sport", "tech", "business", "politics"]
NUM_LABELS = len(LABELS)
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
MODULES = [f"bert.encoder.layer.{i}.attention.self.{name}" for i in range(LAYERS) for name in ("query", "value")]
HEAD = ["classifier.weight", "classifier.bias"]


def make_model(seed: int = 0) -> ClientModel:
    return ClientModel(embedded_model_dir(), labels=LABELS, rank=RANK, max_length=32, seed=seed, num_layers=LAYERS)


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
    assert list(state) == [f"{m}.lora_{w}" for m in MODULES for w in "AB"] + HEAD
    assert state[f"{MODULES[0]}.lora_A"].shape == (RANK, 384)
    assert state[f"{MODULES[0]}.lora_B"].shape == (384, RANK)
    assert state["classifier.weight"].shape == (NUM_LABELS, 384)
    assert state["classifier.bias"].shape == (NUM_LABELS,)

    assert_states_equal(state, model.initial_state())
    assert_states_equal(state, again.initial_state())
    for key, tensor in state.items():
        if key.endswith(".lora_B") or key == "classifier.bias":
            # lora_B = 0: the adapter starts as the base model; transformers starts a head's bias at 0
            assert not tensor.any(), f"{key} must start at zero"
        else:
            assert tensor.abs().max() > 0
            assert not torch.equal(tensor, other.initial_state()[key]), f"{key} does not depend on the seed"

    # The server's layer-wise step sees one group per encoder block and the head as a group of its own.
    assert parameter_groups(list(state), "block") == {
        "bert.encoder.layer.0": sorted(k for k in state if k.startswith("bert.encoder.layer.0.")),
        "bert.encoder.layer.1": sorted(k for k in state if k.startswith("bert.encoder.layer.1.")),
        "classifier": ["classifier.bias", "classifier.weight"],
    }


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
    base_logits = model.logits(tokens)
    rng = torch.get_rng_state()

    generator = torch.Generator().manual_seed(0)
    first = model.train(tokens, labels, steps=5, batch_size=BATCH, lr=3e-2, generator=generator)
    last = model.train(tokens, labels, steps=5, batch_size=BATCH, lr=3e-2, generator=generator)
    assert last < 0.5 * first, (first, last)
    assert model.evaluate(tokens, labels) == 1.0
    assert torch.equal(torch.get_rng_state(), rng), "batches must come from the generator passed in"

    trained = model.state()
    for key in initial:
        assert not torch.equal(trained[key], initial[key]), f"{key} was not trained"
    # The frozen base (the head's original included) is untouched: the initial state gives its outputs.
    model.load_state(initial)
    assert torch.equal(model.logits(tokens), base_logits)


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
    logits = model.logits(tokens, batch_size=3)
    assert logits.shape == (len(tokens), NUM_LABELS)
    # Batched, length-sorted logits come back in input order, as one sentence at a time does.
    one_by_one = torch.cat([model.logits(tokens[i : i + 1]) for i in range(len(tokens))])
    torch.testing.assert_close(logits, one_by_one, atol=1e-5, rtol=1e-5)

    predictions = logits.argmax(dim=1)
    labels = predictions.clone()
    wrong = torch.tensor([0, 3, 4])
    labels[wrong] = (labels[wrong] + 1) % NUM_LABELS
    expected = (len(labels) - len(wrong)) / len(labels)
    assert model.evaluate(tokens, labels, batch_size=3) == pytest.approx(expected)
    assert model.evaluate(tokens, predictions) == 1.0
    assert model.evaluate(tokens, (predictions + 1) % NUM_LABELS) == 0.0


def sequence_logits(model: torch.nn.Module, tokens: Tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits


# PeftModel.from_pretrained calls a transformers API that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_base_and_adapter_load_in_peft_with_the_same_outputs(
    model: ClientModel, data: tuple[Tokens, torch.Tensor], tmp_path: Path
) -> None:
    tokens, _ = data
    state = random_state(model, seed=9)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    model.save_base(base)
    model.save_adapter(state, adapter, base=base)

    # The base: a plain sequence classifier with the labels, the cut encoder and the initial head.
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_hidden_layers"] == LAYERS
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert (base / "model.safetensors").is_file()
    plain = AutoModelForSequenceClassification.from_pretrained(base)
    initial = model.initial_state()
    assert torch.equal(plain.classifier.weight, initial["classifier.weight"])
    assert torch.equal(plain.classifier.bias, initial["classifier.bias"])
    again = AutoTokenizer.from_pretrained(base)(["the striker scored"], padding="max_length", max_length=32)
    assert again["input_ids"] == model.tokenize(["the striker scored"]).input_ids.tolist()

    # The adapter: peft's own files only, naming the saved base; LoRA and the head inside.
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    assert adapter_config["task_type"] == "SEQ_CLS" and "classifier" in adapter_config["modules_to_save"]
    assert sorted(adapter_config["target_modules"]) == ["query", "value"]
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("base_model.model.classifier.weight"), state["classifier.weight"])
        assert torch.equal(f.get_tensor("base_model.model.classifier.bias"), state["classifier.bias"])

    # Loaded both ways, the logits are the ClientModel's holding that state, and differ from the base's.
    model.load_state(state)
    expected = model.logits(tokens)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    onto = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter)
    for loaded in (auto, onto):
        torch.testing.assert_close(sequence_logits(loaded, tokens), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sequence_logits(plain, tokens), expected, atol=1e-3)
    layers = {n: m for n, m in onto.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(MODULES)
    for name in MODULES:  # peft's ΔW = (lora_alpha / r) · B @ A of the state
        expected_delta = 16 / RANK * state[f"{name}.lora_B"] @ state[f"{name}.lora_A"]
        torch.testing.assert_close(layers[name].get_delta_weight("default"), expected_delta, atol=1e-6, rtol=1e-5)


def save_bart_classifier(directory: Path) -> Path:
    """A tiny BART sequence classifier: its head (``classification_head``) is not one peft saves."""
    config = BartConfig(
        vocab_size=30522,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    BartForSequenceClassification(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(embedded_model_dir() / name, directory / name)
    return directory


def test_bad_options_are_usage_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="num_layers=7"):
        ClientModel(embedded_model_dir(), labels=["a", "b"], num_layers=7)
    with pytest.raises(UsageError, match="match no layer"):
        ClientModel(embedded_model_dir(), labels=["a", "b"], target_modules=("no_such_module",), num_layers=1)
    bart = save_bart_classifier(tmp_path / "bart")
    with pytest.raises(UsageError, match="no classification head"):
        ClientModel(bart, labels=["a", "b"], target_modules=("q_proj", "v_proj"))
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="not installed"):
        embedded_model_dir()
