"""``fedbip simulate`` end to end: outputs, the saved base and final adapters (loaded with peft),
resume, --data files and user errors.

Small on purpose: the embedded MiniLM cut to 2 encoder layers, 300 BBC sentences, a few clients,
rounds and local steps of batch 8. Each test reads the results it needs from a handful of runs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import AdapterError, OutputError, UsageError
from fedbip_cli.simulate.loop import RUN_RECORD, SimulationConfig, load_clients
from fedbip_cli.simulate.runner import simulate
from fedbip_cli.simulate.strategies import STRATEGIES

LAYERS = 2
ALL = ("fedbip", "fedbip-layerwise", "fedavg", "local", "oracle")
# Four clients in two task groups (client-00 and -02 in group 0, -01 and -03 in group 1), so that
# the oracle has groups of two to average within.
CONFIG = SimulationConfig(
    strategies=ALL,
    num_layers=LAYERS,
    batch_size=8,
    max_length=32,
    local_steps=2,
    rounds=2,
    clients=4,
    groups=2,
    max_examples=300,
    examples_per_client=None,
    eval_every=1,
)
CLIENTS = ["client-00", "client-01", "client-02", "client-03"]
SMALL = ["--num-layers", str(LAYERS), "--batch-size", "8", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()
SUMMARY_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).resolve().parent.parent / "schemas" / "simulate-summary.schema.json").read_text())
)


pytestmark = pytest.mark.usefixtures("bbc_once")  # tests/conftest.py


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles: str, code: int) -> None:
    """One error line plus a hint on stderr, the exit code, and no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "error:" in result.stderr and "hint:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in " ".join(result.stderr.split()), (needle, result.stderr)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def adapter_bytes(out: Path, strategy: str, client: str) -> bytes:
    """The adapter's tensors (LoRA and the head): the file in which clients' adapters differ."""
    return (out / "adapters" / strategy / client / "adapter_model.safetensors").read_bytes()


def portable_bytes(out: Path, directory: Path) -> dict[str, bytes]:
    """``file_bytes`` with the run's own absolute path (which adapters name their base by) made neutral."""
    return {name: data.replace(str(out.resolve()).encode(), b"OUT") for name, data in file_bytes(directory).items()}


def without_seconds(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary less its wall-clock timings, the only part a re-run may change."""
    strategies = {
        name: {k: v for k, v in entry.items() if k != "seconds"} for name, entry in summary["strategies"].items()
    }
    return {**summary, "strategies": strategies}


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One --compare run of every strategy on the same partition."""
    out = tmp_path_factory.mktemp("compare") / "run"
    result = simulate(CONFIG, out, device="cpu")
    assert result.out == out
    return out, result.summary


def test_compare_run_writes_metrics_similarity_summary_and_plots(compared: tuple[Path, dict[str, Any]]) -> None:
    out, summary = compared
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [c["name"] for c in summary["clients"]] == CLIENTS
    assert [c["group"] for c in summary["clients"]] == [0, 1, 0, 1]
    examples = {c["name"]: c["train_examples"] for c in summary["clients"]}

    metrics = read_jsonl(out / "metrics.jsonl")
    keys = [(r["strategy"], r["round"], r["client"]) for r in metrics]
    assert keys == [(s, r, c) for s in ALL for r in (1, 2) for c in CLIENTS]
    # every participant sends and receives one trainable state (float32: 4 bytes an entry), local none
    adapter = load_file(out / "adapters" / "fedavg" / CLIENTS[0] / "adapter_model.safetensors")
    state_bytes = 4 * sum(t.numel() for t in adapter.values())
    for row in metrics:
        fields = {"strategy", "round", "client", "train_loss", "test_accuracy", "examples"}
        assert set(row) == fields | {"uplink_bytes", "downlink_bytes"}
        assert row["train_loss"] > 0 and 0 <= row["test_accuracy"] <= 1
        assert row["examples"] == examples[row["client"]]
        sent = 0 if row["strategy"] == "local" else state_bytes
        assert row["uplink_bytes"] == row["downlink_bytes"] == sent

    similarity = read_jsonl(out / "similarity.jsonl")
    assert [(r["strategy"], r["round"]) for r in similarity] == [(s, r) for s in ALL for r in (1, 2)]
    for row in similarity:
        s = torch.tensor(row["similarity"])
        assert row["clients"] == CLIENTS and s.shape == (4, 4)
        torch.testing.assert_close(s, s.T)
        torch.testing.assert_close(s.diagonal(), torch.ones(4))
        # the Figure 3 check: every kind of vector, gap of mean cosines in [-2, 2], ARI in [-1, 1]
        assert set(row["separation"]) == {"update", "parameters", "cumulative", "ema"}
        for kind in row["separation"].values():
            assert -2 <= kind["gap"] <= 2 and -1 <= kind["ari"] <= 1
    # the paper's update similarity is what the "update" kind scores
    first = similarity[0]
    matrix = torch.tensor(first["similarity"], dtype=torch.float64)
    within = (matrix[0, 2] + matrix[1, 3]) / 2
    between = (matrix[0, 1] + matrix[0, 3] + matrix[1, 2] + matrix[2, 3]) / 4
    assert first["separation"]["update"]["gap"] == pytest.approx((within - between).item(), abs=1e-5)

    assert list(summary["strategies"]) == list(ALL)
    for strategy, entry in summary["strategies"].items():
        final = [r["test_accuracy"] for r in metrics if r["strategy"] == strategy and r["round"] == 2]
        assert entry["mean_accuracy"] == pytest.approx(sum(final) / len(final))
        assert entry["worst_accuracy"] == min(final) and 0 <= entry["worst_accuracy"] <= entry["mean_accuracy"] <= 1
        assert set(entry["seconds"]) == {"train", "eval", "server"}
        assert entry["seconds"]["train"] > 0 and entry["seconds"]["eval"] > 0 and entry["seconds"]["server"] >= 0
        assert entry["rounds"] == 2
        assert -1 <= entry["ari"] <= 1  # the tasks partition knows the true groups
        assert sorted(c for cluster in entry["clusters"] for c in cluster) == CLIENTS

    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    assert (out / "similarity.png").read_bytes()[:8] == PNG
    assert (out / "separation.png").read_bytes()[:8] == PNG
    for strategy in ALL:
        meta = checkpoint_meta(out / "checkpoints" / f"{strategy}.safetensors")
        assert meta["round"] == 2 and meta["config"]["strategies"] == list(ALL)
        tensors = load_file(out / "checkpoints" / f"{strategy}.safetensors")
        assert sorted({key.split("/")[1] for key in tensors if key.startswith("bar/")}) == CLIENTS
        assert sorted({key.split("/")[1] for key in tensors if key.startswith("memory/")}) == CLIENTS
        assert sorted(p.name for p in (out / "adapters" / strategy).iterdir()) == CLIENTS
    assert json.loads((out / "groups.json").read_text()) == dict(zip(CLIENTS, [0, 1, 0, 1], strict=True))
    assert {p.name for p in (out / "base").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    base_config = json.loads((out / "base" / "config.json").read_text())
    assert base_config["architectures"] == ["BertForSequenceClassification"]
    assert base_config["num_hidden_layers"] == LAYERS
    # num_labels is len(id2label): transformers 5 writes only the labels
    assert base_config["id2label"] == {str(i): label for i, label in enumerate(summary["labels"])}


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The round, options and metrics stored in a checkpoint's safetensors header."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["fedbip_checkpoint"])


def test_final_adapters_follow_each_strategy(compared: tuple[Path, dict[str, Any]]) -> None:
    out, _ = compared
    local = [adapter_bytes(out, "local", c) for c in CLIENTS]
    assert len(set(local)) == 4  # no communication: every client its own adapter
    assert len({adapter_bytes(out, "fedavg", c) for c in CLIENTS}) == 1  # one global model, bitwise
    oracle = [adapter_bytes(out, "oracle", c) for c in CLIENTS]
    assert oracle[0] == oracle[2] and oracle[1] == oracle[3] and oracle[0] != oracle[1]
    assert len({adapter_bytes(out, "fedbip", c) for c in CLIENTS}) > 1  # personalized


def logits_on(model: torch.nn.Module, texts: list[str], tokenizer_dir: Path) -> torch.Tensor:
    """Logits of ``model`` on ``texts``, tokenized from ``tokenizer_dir`` as the run did (32 tokens)."""
    encoded = AutoTokenizer.from_pretrained(tokenizer_dir)(
        texts, padding="max_length", truncation=True, max_length=CONFIG.max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        return model.eval()(**encoded).logits


# PeftModel.from_pretrained calls a transformers API that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapters_load_in_peft_onto_the_saved_base_and_predict_as_in_the_run(
    compared: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = compared
    base = out / "base"
    clients = {c.name: c for c in load_clients(CONFIG)[0]}
    checkpoint = load_file(out / "checkpoints" / "fedbip.safetensors")
    for client in CLIENTS:
        directory = out / "adapters" / "fedbip" / client
        assert {p.name for p in directory.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base.resolve())
        assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
        # The head inside the adapter is the client's final one from the checkpoint, bit for bit.
        with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
            for name in ("weight", "bias"):
                saved = f.get_tensor(f"base_model.model.classifier.{name}")
                assert torch.equal(saved, checkpoint[f"bar/{client}/classifier.{name}"]), (client, name)

        # Onto the saved base, each adapter predicts its client's test split with the accuracy the run recorded.
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), directory)
        data = clients[client]
        predictions = logits_on(model, data.test_texts, base).argmax(dim=-1)
        accuracy = (predictions == torch.tensor(data.test_labels)).sum().item() / len(data.test_labels)
        assert accuracy == pytest.approx(summary["strategies"]["fedbip"]["accuracy"][client], abs=1e-9), client

    # peft's Auto class finds the base from the adapter alone, and gives the same logits.
    directory = out / "adapters" / "fedbip" / "client-01"
    texts = clients["client-01"].test_texts
    auto = AutoPeftModelForSequenceClassification.from_pretrained(directory)
    onto = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), directory)
    torch.testing.assert_close(logits_on(auto, texts, base), logits_on(onto, texts, base), atol=1e-5, rtol=1e-5)
    # ... which are not the base's own: the adapter (LoRA and head) changes the predictions.
    plain = logits_on(AutoModelForSequenceClassification.from_pretrained(base), texts, base)
    assert not torch.allclose(plain, logits_on(onto, texts, base), atol=1e-3)


class Interrupted(KeyboardInterrupt):
    """The test's own Ctrl-C, told apart from a real one."""


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    config = replace(
        CONFIG, strategies=("fedavg", "fedbip"), rounds=3, clients=3, groups=3, local_steps=1, eval_every=2
    )
    whole = simulate(config, tmp_path / "a", device="cpu")

    def stop(strategy: str, round_: int, accuracy: float | None) -> None:
        assert (accuracy is None) == (round_ == 1)  # evaluated every 2 rounds and at the last
        if (strategy, round_) == ("fedbip", 2):
            raise Interrupted

    b = tmp_path / "b"
    with pytest.raises(Interrupted):
        simulate(config, b, device="cpu", round_done=stop)
    # what survives the interruption: fedavg complete, fedbip after its round 2
    assert checkpoint_meta(b / "checkpoints" / "fedavg.safetensors")["round"] == 3
    assert checkpoint_meta(b / "checkpoints" / "fedbip.safetensors")["round"] == 2
    assert [(r["strategy"], r["round"]) for r in read_jsonl(b / "metrics.jsonl")][-1] == ("fedbip", 2)
    assert not (b / "summary.json").exists()
    # a damaged checkpoint is named, not resumed from
    path = b / "checkpoints" / "fedbip.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(AdapterError, match="checkpoint is unreadable") as info:
        simulate(config, b, device="cpu", resume=True)
    assert str(path) in str(info.value)
    path.write_bytes(good)

    resumed = simulate(config, b, device="cpu", resume=True)
    a = tmp_path / "a"
    for name in ("metrics.jsonl", "similarity.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert without_seconds(resumed.summary) == without_seconds(whole.summary)
    assert resumed.summary["strategies"]["fedbip"]["rounds"] == 3
    adapters_a, adapters_b = file_bytes(a / "adapters"), file_bytes(b / "adapters")
    assert len(adapters_a) == 2 * 3 * 3  # 2 strategies x 3 clients x (config, weights, card)
    # identical but for the absolute path of the base each names (a/base, b/base)
    assert portable_bytes(a, a / "adapters") == portable_bytes(b, b / "adapters")
    assert adapters_a != adapters_b
    assert file_bytes(a / "base") == file_bytes(b / "base")

    # resuming with other options names the checkpoint it refuses, and changes nothing
    with pytest.raises(UsageError, match="other options") as info:
        simulate(replace(config, lr=2e-3), b, device="cpu", resume=True)
    assert str(b / "checkpoints" / "fedavg.safetensors") in str(info.value)
    assert file_bytes(b / "adapters") == adapters_b
    # and a non-empty --out is neither mixed into nor removed without --resume or --overwrite
    with pytest.raises(OutputError, match="not empty") as info:
        simulate(config, a, device="cpu")
    assert "--resume" in (info.value.hint or "") and "--overwrite" in (info.value.hint or "")
    assert file_bytes(a / "adapters") == adapters_a


SPORT = [
    "the striker scored twice in the cup final",
    "the team won the league match at home",
    "the tennis player won the open final",
    "the coach praised the players after the game",
    "the sprinter broke the world record at the olympics",
]
MONEY = [
    "the bank raised interest rates again",
    "shares fell after the company reported losses",
    "oil prices pushed inflation to a new high",
    "the firm cut jobs after sales slumped",
    "investors sold bonds as the market dropped",
]


def client_rows(offset: int) -> list[dict[str, str]]:
    """Twenty separable rows: sport and money sentences, made distinct by a number."""
    return [
        {"text": f"{text} {offset + i}", "label": label}
        for i in range(2)
        for sentences, label in ((SPORT, "sport"), (MONEY, "money"))
        for text in sentences
    ]


def write_clients(directory: Path) -> Path:
    """alpha.jsonl, beta.csv and gamma.jsonl with 20 rows each."""
    directory.mkdir()
    for name, offset in (("alpha", 0), ("gamma", 200)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in client_rows(offset)))
    rows = client_rows(100)
    (directory / "beta.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    return directory


def test_data_dir_through_the_cli_prints_only_the_json_summary(tmp_path: Path) -> None:
    data = write_clients(tmp_path / "clients")
    out = tmp_path / "out"
    result = invoke("simulate", "--data", data, *SMALL, "--rounds", "1", "--local-steps", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout is exactly the summary
    assert summary == json.loads((out / "summary.json").read_text())
    SUMMARY_SCHEMA.validate(summary)
    assert summary["config"]["data_dir"] == str(data)
    assert [(c["name"], c["group"]) for c in summary["clients"]] == [("alpha", None), ("beta", None), ("gamma", None)]
    assert [c["train_examples"] + c["test_examples"] for c in summary["clients"]] == [20, 20, 20]
    assert summary["labels"] == ["money", "sport"]
    entry = summary["strategies"]["fedbip"]
    assert "ari" not in entry and 0 <= entry["mean_accuracy"] <= 1
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "alpha",
        "beta",
        "gamma",
    ]  # one strategy: no subfolder
    assert "round" not in result.stderr  # --json: no round lines


def test_a_multi_seed_summary_matches_the_schema(tmp_path: Path) -> None:
    data = write_clients(tmp_path / "clients")
    args = ("--data", data, *SMALL, "--rounds", "1", "--local-steps", "1", "--seeds", "0,1", "--json")
    result = invoke("simulate", *args, "--compare", "fedbip,local", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    SUMMARY_SCHEMA.validate(summary)
    assert summary["seeds"] == [0, 1] and sorted(summary["per_seed"]) == ["0", "1"]
    # The schema is not vacuous: a seed's summary without its clients is caught.
    del summary["per_seed"]["0"]["clients"]
    assert not SUMMARY_SCHEMA.is_valid(summary)


def test_unknown_strategy_lists_the_valid_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("simulate", "--compare", "fedbip,fedprox", "--out", out)
    assert_user_error(result, "fedprox", ", ".join(STRATEGIES), code=2)
    assert not out.exists()


def test_data_row_without_label_names_file_and_line_and_keeps_the_old_run(tmp_path: Path) -> None:
    data = write_clients(tmp_path / "clients")
    bad = data / "gamma.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps({"text": "a sentence with no label"})
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = invoke("simulate", "--data", data, *SMALL, "--out", out)
    assert_user_error(result, f"{bad}:3", "'label'", code=1)
    assert not out.exists()  # nothing written
    # with --overwrite, a bad input must not cost the previous run
    out.mkdir()
    (out / "metrics.jsonl").write_text("previous run\n")
    (out / RUN_RECORD).write_text('{"fedbip_run": 1}\n')  # what marks it a simulate run
    assert_user_error(invoke("simulate", "--data", data, *SMALL, "--out", out, "--overwrite"), f"{bad}:3", code=1)
    assert (out / "metrics.jsonl").read_text() == "previous run\n"


def test_option_errors_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(invoke("simulate", "--participation", "0", "--out", out), "--participation 0", code=2)
    assert_user_error(invoke("simulate", "--seed", "-1", "--out", out), "--seed -1", code=2)
    if not torch.cuda.is_available():
        assert_user_error(invoke("simulate", "--device", "cuda", "--out", out), "no CUDA device", code=2)
    assert not out.exists()


def test_partial_participation_samples_the_same_clients_for_every_strategy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "simulate",
        "--compare",
        "fedavg,local",
        "--clients",
        "4",
        "--groups",
        "2",
        "--participation",
        "0.5",
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--max-examples",
        "300",
        "--examples-per-client",
        "0",
        "--eval-every",
        "1",
        *SMALL,
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 * 2 * 4
    similarity = {(r["strategy"], r["round"]): r["clients"] for r in read_jsonl(out / "similarity.jsonl")}
    for round_ in (1, 2):
        chosen = {}
        for strategy in ("fedavg", "local"):
            rows = [r for r in metrics if r["strategy"] == strategy and r["round"] == round_]
            chosen[strategy] = [r["client"] for r in rows if r["train_loss"] is not None]
            assert len(chosen[strategy]) == 2  # half of 4
            assert all(r["test_accuracy"] is not None for r in rows)  # everyone is evaluated
            assert similarity[strategy, round_] == chosen[strategy]  # only participants are compared
        assert chosen["fedavg"] == chosen["local"]
    # fedavg sends the global update to the clients that sat out too
    assert len({adapter_bytes(out, "fedavg", c) for c in CLIENTS}) == 1
