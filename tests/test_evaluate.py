"""``fedbip evaluate`` and ``simulate --export-data``: scores against references computed here (a plain
peft forward pass for accuracy, a float64 forward of a tiny GPT-2 for the token loss), the paired
interval's coverage on synthetic pairs, the gate, --pick, and a simulation's own accuracies reproduced.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import SourceError, UsageError
from fedbip_cli.evaluate.run import EvaluateOptions, evaluate
from fedbip_cli.evaluate.stats import HELPS, HURTS, UNDECIDED, Scores, paired_interval, verdict, worse_beyond
from fedbip_cli.simulate.data import load_client_files
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.runner import simulate

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "evaluate.schema.json"
CONFIG = SimulationConfig(
    strategies=("local",),
    num_layers=2,
    batch_size=8,
    lr=1e-2,
    local_steps=20,
    rounds=2,
    clients=3,
    groups=2,
    max_examples=500,
    examples_per_client=None,
    eval_every=1,
)
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# --- the paired interval ------------------------------------------------------------------------


def test_paired_interval_covers_the_true_difference_at_its_nominal_rate() -> None:
    """On 300 synthetic paired data sets of 150 examples (own right with p=0.7, the candidate right with
    p=0.75, correlated through a shared difficulty), the 95% interval holds the true difference 0.05 in
    about 95% of them: between 91% and 98.5% allows for 300 draws of a 0.94-0.95 coverage."""
    generator = torch.Generator().manual_seed(7)
    covered, trials, n = 0, 300, 150
    for _ in range(trials):
        easy = torch.rand(n, generator=generator, dtype=torch.float64)
        own = (easy < 0.7).double()
        candidate = (easy < 0.75).double()  # right wherever own is, and on 5% more: a paired gain of 0.05
        flips = torch.rand(n, generator=generator, dtype=torch.float64) < 0.2  # noise both ways, mean-neutral
        candidate = torch.where(
            flips, (torch.rand(n, generator=generator, dtype=torch.float64) < 0.75).double(), candidate
        )
        low, high = paired_interval(
            Scores(own, torch.ones(n, dtype=torch.float64)),
            Scores(candidate, torch.ones(n, dtype=torch.float64)),
            resamples=1000,
            confidence=0.95,
            generator=generator,
        )
        covered += low <= 0.05 <= high
    assert 0.91 <= covered / trials <= 0.985, covered


def test_paired_interval_is_zero_for_identical_scores_and_seeded() -> None:
    scores = Scores(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    assert paired_interval(scores, scores, resamples=50, confidence=0.9, generator=torch.Generator()) == (0.0, 0.0)
    other = Scores(torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    draws = [paired_interval(scores, other, resamples=200, confidence=0.9, generator=torch.Generator().manual_seed(3))]
    draws.append(
        paired_interval(scores, other, resamples=200, confidence=0.9, generator=torch.Generator().manual_seed(3))
    )
    assert draws[0] == draws[1] and draws[0][1] <= 0 < -draws[0][0]


def test_verdicts_and_the_gate_follow_the_direction_of_the_metric() -> None:
    assert verdict(0.01, 0.05, higher_is_better=True) == HELPS
    assert verdict(0.01, 0.05, higher_is_better=False) == HURTS  # a loss that went up
    assert verdict(-0.01, 0.05, higher_is_better=True) == UNDECIDED
    assert worse_beyond(-0.08, -0.03, 0.02, higher_is_better=True)  # worse by at least 0.03 > 0.02
    assert not worse_beyond(-0.08, -0.01, 0.02, higher_is_better=True)
    assert worse_beyond(0.03, 0.08, 0.02, higher_is_better=False)  # the loss rose by at least 0.03
    assert not worse_beyond(0.0, 0.0, 0.0, higher_is_better=True)  # identical never fails


# --- a simulation's clients ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulation with its clients' data exported, a copy of its adapters, and a broken copy
    whose head predicts, whatever the sentence, the label rarest in the client's test split."""
    root = tmp_path_factory.mktemp("evaluate")
    simulate(CONFIG, root / "run", device="cpu", export=root / "data")
    shutil.copytree(root / "run" / "adapters", root / "copy")
    shutil.copytree(root / "run" / "adapters", root / "broken")
    labels = json.loads((root / "run" / "summary.json").read_text())["labels"]
    for directory in (root / "broken").iterdir():
        rows = (root / "data" / "test" / f"{directory.name}.jsonl").read_text().splitlines()
        rarest = min(range(len(labels)), key=lambda i: sum(json.loads(r)["label"] == labels[i] for r in rows))
        path = directory / "adapter_model.safetensors"
        tensors = load_file(path)
        for key in [k for k in tensors if "classifier" in k]:
            tensors[key] = torch.zeros_like(tensors[key])
            if key.endswith("bias"):
                tensors[key][rarest] = 1.0
        save_file(tensors, path, metadata={"format": "pt"})
    return root


def test_export_data_round_trips_through_simulate_data(run: Path) -> None:
    summary = json.loads((run / "run" / "summary.json").read_text())
    clients = [c["name"] for c in summary["clients"]]
    assert sorted(p.stem for p in (run / "data" / "train").iterdir()) == clients
    for info in summary["clients"]:
        rows = (run / "data" / "test" / f"{info['name']}.jsonl").read_text().splitlines()
        assert len(rows) == info["test_examples"]
        assert set(json.loads(rows[0])) == {"text", "label"} and json.loads(rows[0])["label"] in summary["labels"]
    back, labels = load_client_files(run / "data" / "train", test_fraction=0.2)
    for client in back:
        exported = [json.loads(r) for r in (run / "data" / "train" / f"{client.name}.jsonl").read_text().splitlines()]
        read = sorted(zip(client.train_texts + client.test_texts, client.train_labels + client.test_labels))
        assert read == sorted((r["text"], labels.index(r["label"])) for r in exported)


def test_evaluate_reproduces_the_simulations_own_accuracies_exactly(run: Path) -> None:
    result = evaluate(
        str(run / "run" / "adapters"), [str(run / "copy")], run / "data" / "test", str(run / "run" / "base")
    )
    accuracy = json.loads((run / "run" / "summary.json").read_text())["strategies"]["local"]["accuracy"]
    assert {r.client: r.own for r in result.clients} == accuracy
    for r in result.clients:  # an identical candidate: no difference, an interval of zero width
        assert [(c.score, c.difference, c.low, c.high, c.verdict) for c in r.comparisons] == [
            (r.own, 0.0, 0.0, 0.0, UNDECIDED)
        ]
        assert r.best == "own"


def test_accuracy_matches_a_plain_peft_forward_pass(run: Path) -> None:
    """One sentence at a time, unpadded, through PeftModel.from_pretrained: the accuracy of each broken adapter."""
    result = evaluate(str(run / "broken"), [str(run / "copy")], run / "data" / "test", str(run / "run" / "base"))
    tokenizer = AutoTokenizer.from_pretrained(run / "run" / "base")
    for r in result.clients:
        base = AutoModelForSequenceClassification.from_pretrained(run / "run" / "base")
        model = PeftModel.from_pretrained(base, run / "broken" / r.client).eval()
        rows = [json.loads(line) for line in (run / "data" / "test" / f"{r.client}.jsonl").read_text().splitlines()]
        right = 0
        with torch.no_grad():
            for row in rows:
                ids = tokenizer(row["text"], truncation=True, max_length=CONFIG.max_length, return_tensors="pt")
                right += model.config.id2label[int(model(**ids).logits.argmax())] == row["label"]
        assert r.own == right / len(rows) and r.examples == len(rows)
        assert r.best == (str(run / "copy") if r.comparisons[0].difference > 0 else "own")
    assert HELPS in {r.comparisons[0].verdict for r in result.clients}


def test_the_gate_fails_on_a_broken_candidate_and_passes_an_identical_one(run: Path) -> None:
    common = ["--own", run / "run" / "adapters", "--data", run / "data" / "test", "--base", run / "run" / "base"]
    broken = invoke("evaluate", run / "broken", *common, "--fail-if-worse", "0.02", "--json")
    assert broken.exit_code == 3, broken.output
    document = json.loads(broken.stdout)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(document)
    assert {f["candidate"] for f in document["gate"]["failed"]} == {str(run / "broken")}
    assert "worse than own" in broken.stderr
    same = invoke("evaluate", run / "copy", *common, "--fail-if-worse", "0", "--json")
    assert same.exit_code == 0, same.output
    verdicts = {c["verdict"] for client in json.loads(same.stdout)["clients"] for c in client["candidates"]}
    assert verdicts == {"undecided"}


def test_pick_copies_the_best_adapter_with_its_card(run: Path) -> None:
    pick = run / "picked"
    common = ["--data", run / "data" / "test", "--base", run / "run" / "base", "--pick", pick]
    result = invoke("evaluate", "--own", run / "broken", run / "copy", *common, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["clients"]
    record = json.loads((pick / "fedbip-pick.json").read_text())
    for client in shown:  # the best: the candidate where it scores higher, own where they tie
        better = client["candidates"][0]["accuracy"] > client["own"]["accuracy"]
        assert client["best"] == record["picked"][client["client"]] == (str(run / "copy") if better else "own")
    assert str(run / "copy") in record["picked"].values()
    for client, chosen in record["picked"].items():
        source = run / ("broken" if chosen == "own" else "copy") / client
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (pick / client / name).read_bytes() == (source / name).read_bytes()
        card = (pick / client / "README.md").read_text()
        assert f"picked from {run / 'broken' if chosen == 'own' else run / 'copy'}" in card
        assert str(run / "run" / "base") in card and "| own: " in card
    again = invoke("evaluate", "--own", run / "broken", run / "copy", *common)
    assert again.exit_code == 1 and "not empty" in again.stderr  # never over an existing directory
    inside = invoke("evaluate", "--own", run / "broken", run / "copy", *common[:-1], run / "copy" / "x")
    assert inside.exit_code == 1 and "inside" in inside.stderr
    replaced = invoke("evaluate", "--own", run / "broken", run / "copy", *common, "--overwrite")
    assert replaced.exit_code == 0, replaced.output  # its own earlier pick: the record lists every file
    mine = pick / next(iter(record["picked"])) / "notes.txt"
    mine.write_text("mine")
    refused = invoke("evaluate", "--own", run / "broken", run / "copy", *common, "--overwrite")
    assert refused.exit_code == 1 and "notes.txt" in refused.stderr  # a user's file: never replaced
    assert mine.read_text() == "mine"


def test_user_errors_name_the_input(run: Path, tmp_path: Path) -> None:
    own, base = str(run / "run" / "adapters"), str(run / "run" / "base")
    with pytest.raises(UsageError, match="named twice"):
        evaluate(own, [own], run / "data" / "test", base)
    with pytest.raises(UsageError, match="a candidate named 'own'"):
        evaluate(own, ["own"], run / "data" / "test", base)
    partial = tmp_path / "partial"
    shutil.copytree(run / "copy", partial)
    shutil.rmtree(next(partial.iterdir()))
    with pytest.raises(SourceError, match="no adapter for client"):
        evaluate(own, [str(partial)], run / "data" / "test", base)
    with pytest.raises(SourceError, match="no .jsonl or .csv file for client"):
        evaluate(own, [str(run / "copy")], run / "data" / "train" / "missing", base)
    (tmp_path / "data").mkdir()
    for path in (run / "data" / "test").iterdir():
        text = path.read_text().replace('"label": "', '"label": "x')
        (tmp_path / "data" / path.name).write_text(text)
    with pytest.raises(SourceError, match="is not one of the base's labels") as raised:
        evaluate(own, [str(run / "copy")], tmp_path / "data", base)
    assert raised.value.where.endswith(":1")
    with pytest.raises(UsageError, match="--resamples 0"):
        EvaluateOptions(resamples=0)


# --- a causal language model --------------------------------------------------------------------

WORDS = "the a cat dog sat ran on under mat log and then".split()
SENTENCES = ["the cat sat on the mat", "a dog ran under the log", "the dog sat", "a cat ran on a mat and then sat"]


def _gpt2(directory: Path) -> Path:
    """A tiny GPT-2 language model with a word-level tokenizer, random weights, saved with its tokenizer."""
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>").save_pretrained(directory)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=len(vocab), n_positions=32, bos_token_id=0, eos_token_id=0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


def _lm_adapters(base: Path, out: Path, seed: int) -> Path:
    for index, client in enumerate(("x", "y")):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        )
        generator = torch.Generator().manual_seed(seed * 10 + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        model.save_pretrained(out / client)
    return out


def _reference_loss(base: Path, adapter: Path, max_length: int) -> float:
    """Mean next-token loss over every sentence's tokens: float64, one sentence at a time."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in SENTENCES:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_causal_lm_loss_and_perplexity_match_a_float64_reference(tmp_path: Path) -> None:
    base = _gpt2(tmp_path / "base")
    own, other = _lm_adapters(base, tmp_path / "own", 1), _lm_adapters(base, tmp_path / "other", 2)
    (tmp_path / "data").mkdir()
    for client in ("x", "y"):
        (tmp_path / "data" / f"{client}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    options = EvaluateOptions(max_length=6, batch_size=3, device="cpu")
    result = evaluate(str(own), [str(other)], tmp_path / "data", str(base), options)
    assert result.task == "causal-lm" and not result.metric.higher_is_better
    for r in result.clients:
        own_loss, other_loss = _reference_loss(base, own / r.client, 6), _reference_loss(base, other / r.client, 6)
        assert r.own == pytest.approx(own_loss, rel=1e-5) and r.comparisons[0].score == pytest.approx(
            other_loss, rel=1e-5
        )
        assert r.tokens == sum(min(len(s.split()), 6) - 1 for s in SENTENCES)
        assert r.best == ("own" if own_loss < other_loss else str(other))
    shown = invoke(
        "evaluate", "--own", own, other, "--data", tmp_path / "data", "--base", base, "--json", "--max-length", 6
    )
    assert shown.exit_code == 0, shown.output
    first = json.loads(shown.stdout)["clients"][0]
    assert first["own"]["perplexity"] == pytest.approx(math.exp(first["own"]["loss"]))


def test_the_ci_example_gates_publication_with_existing_options() -> None:
    """examples/ci/publish-if-better.yml: merge --sweep, then evaluate --fail-if-worse before the upload."""
    import typer.main
    import yaml

    workflow = yaml.safe_load((SCHEMA.parent.parent / "examples" / "ci" / "publish-if-better.yml").read_text())
    steps = next(iter(workflow["jobs"].values()))["steps"]
    runs = [step["run"].split(" > ")[0].split() for step in steps if step.get("run", "").startswith("fedbip ")]
    assert [words[1] for words in runs] == ["merge", "evaluate"]
    assert "--sweep" in runs[0] and "--fail-if-worse" in runs[1] and "--pick" in runs[1]
    assert [s.get("uses", "").split("@")[0] for s in steps].index("actions/upload-artifact") == len(steps) - 1
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # a command group, whichever click typer runs on
    for words in runs:
        command = group.commands[words[1]]
        known = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
        assert {w for w in words[2:] if w.startswith("--")} <= known


def test_unlabelled_rows_are_read_for_a_language_model(tmp_path: Path) -> None:
    from fedbip_cli.simulate.data import read_client_rows

    (tmp_path / "a.csv").write_text("text\nthe cat sat\n\nthe dog ran\n")
    assert read_client_rows(tmp_path / "a.csv", labelled=False) == [(2, "the cat sat", None), (4, "the dog ran", None)]
    with pytest.raises(SourceError, match="no 'label' column"):
        read_client_rows(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(SourceError, match="'text' is empty") as raised:
        read_client_rows(tmp_path / "b.jsonl", labelled=False)
    assert raised.value.where == f"{tmp_path / 'b.jsonl'}:1"


def test_export_data_never_writes_over_files_or_into_the_run(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    small = ["--num-layers", "2", "--clients", "3", "--rounds", "1", "--device", "cpu"]
    busy = invoke("simulate", *small, "--out", tmp_path / "out", "--export-data", tmp_path / "busy")
    assert busy.exit_code == 1 and "not empty" in busy.stderr
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep" and not (tmp_path / "out").exists()
    inside = invoke("simulate", *small, "--out", tmp_path / "out", "--export-data", tmp_path / "out" / "data")
    assert inside.exit_code == 1 and "inside" in inside.stderr and not (tmp_path / "out").exists()
    flower = invoke("simulate", *small, "--engine", "flower", "--export-data", tmp_path / "x")
    assert flower.exit_code == 2 and "--engine inprocess" in flower.stderr
