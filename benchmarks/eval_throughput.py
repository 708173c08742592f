"""Evaluation throughput: simulate's evaluation step and ``fedbip evaluate``'s scorer against a plain
batched peft inference loop over the same adapters and sentences, in one run.

K clients' adapters (the embedded MiniLM with LoRA r = 8 on query and value and a head, each a seeded
perturbation of the initial state, written by ``ClientModel.save_adapter`` as simulate writes them) are
scored on each client's own test sentences of the default regime, three ways:

1. *simulate*: ``ClientModel.evaluate`` with each client's state loaded (what every evaluated round of
   ``fedbip simulate`` does; the states are in memory, no file is read);
2. *evaluate*: ``evaluate.scorer.Scorer.scores`` on each adapter directory (``fedbip evaluate``: one base,
   each adapter loaded by name, scored, deleted);
3. *plain peft*: the loop a peft user writes: the base loaded once, ``PeftModel.from_pretrained`` for the
   first adapter and ``load_adapter``/``set_adapter`` for the others, batches in the given order padded
   to their longest sentence, ``torch.inference_mode``, argmax.

Each way's accuracy per client must agree with the others (the script stops otherwise); it prints
sentences per second and each way's throughput as a multiple of the plain loop's, the best of
``--repeats`` passes, with the default simulation's evaluation share from the shift runs' summaries
when ``--runs`` names them. ``--write-docs`` writes docs/performance.md's ``eval-throughput`` section.

    .venv/bin/python benchmarks/eval_throughput.py [--clients 10] [--batch-size 128] [--repeats 3]
        [--threads 2] [--runs DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402


def plain_peft(
    base_dir: Path, adapters: list[Path], texts: list[list[str]], labels: list[list[int]], batch: int, length: int
) -> list[float]:
    """The plain loop: accuracy per adapter on its client's sentences."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    model = None
    accuracy = []
    for k, directory in enumerate(adapters):
        if model is None:
            model = PeftModel.from_pretrained(base, directory, adapter_name=f"a{k}").eval()
        else:
            model.load_adapter(directory, adapter_name=f"a{k}")
            model.set_adapter(f"a{k}")
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(texts[k]), batch):
                encoded = tokenizer(
                    texts[k][start : start + batch],
                    padding=True,
                    truncation=True,
                    max_length=length,
                    return_tensors="pt",
                )
                predicted = model(**encoded).logits.argmax(dim=-1)
                correct += int((predicted == torch.tensor(labels[k][start : start + batch])).sum())
        accuracy.append(correct / len(texts[k]))
    return accuracy


def best_of(repeats: int, work: Callable[[], list[float]]) -> tuple[float, list[float]]:
    """The shortest of ``repeats`` timed calls and the result of the last."""
    times, result = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def evaluation_share(runs: Path) -> str:
    """The share of each strategy's run spent evaluating, over the seeds of a --seeds run (its summaries)."""
    shares = []
    for path in sorted(runs.glob("seed-*/summary.json")):
        for entry in json.loads(path.read_text())["strategies"].values():
            seconds = entry["seconds"]
            shares.append(seconds["eval"] / (seconds["train"] + seconds["eval"] + seconds["server"]))
    if not shares:
        return ""
    return (
        f"In the task-shift check's runs (`{runs.name}`: {len(shares)} strategy-seeds of 20 rounds, evaluated every "
        f"5 rounds on 400 sentences per client), evaluating took {statistics.fmean(shares):.0%} of each run "
        f"(from {min(shares):.0%} to {max(shares):.0%})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, help="a --seeds run of the default regime: its evaluation share")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from fedbip_cli.evaluate.scorer import CLASSIFICATION, Scorer
    from fedbip_cli.simulate.loop import SimulationConfig, build_model, load_clients

    note = load_note()
    config = SimulationConfig(clients=args.clients)
    clients, label_names = load_clients(config)
    model = build_model(config, label_names)
    generator = torch.Generator().manual_seed(0)
    initial = model.initial_state()
    states = [
        {name: t + 0.02 * torch.randn(t.shape, generator=generator) for name, t in initial.items()} for _ in clients
    ]
    texts = [c.test_texts for c in clients]
    labels = [c.test_labels for c in clients]
    tokens = [model.tokenize(t) for t in texts]
    targets = [torch.tensor(y) for y in labels]
    sentences = sum(len(t) for t in texts)
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        model.save_base(base)
        adapters = []
        for client, state in zip(clients, states):
            model.save_adapter(state, Path(scratch) / client.name, base=base)
            adapters.append(Path(scratch) / client.name)

        def simulate_way() -> list[float]:
            out = []
            for state, t, y in zip(states, tokens, targets):
                model.load_state(state)
                out.append(model.evaluate(t, y, batch_size=args.batch_size))
            return out

        def evaluate_way() -> list[float]:
            scorer = Scorer(
                base,
                CLASSIFICATION,
                max_length=config.max_length,
                batch_size=args.batch_size,
                device=torch.device("cpu"),
            )
            own = [scorer.tokenize(t) for t in texts]
            return [scorer.scores(a, t, y).numerator.mean().item() for a, t, y in zip(adapters, own, targets)]

        def plain_way() -> list[float]:
            return plain_peft(base, adapters, texts, labels, args.batch_size, config.max_length)

        timed = {
            name: best_of(args.repeats, way)
            for name, way in (("plain peft", plain_way), ("simulate", simulate_way), ("evaluate", evaluate_way))
        }
    reference = timed["plain peft"][1]
    for name, (_, accuracy) in timed.items():
        worst = max(abs(a - b) for a, b in zip(accuracy, reference))
        if worst > 1.5 / min(len(t) for t in texts):  # one sentence at most: a tie broken the other way
            raise SystemExit(
                f"{name}'s accuracies differ from the plain loop's by {worst:.4f}: not the same evaluation"
            )
    plain_rate = sentences / timed["plain peft"][0]
    lines = [
        f"{len(clients)} adapters (MiniLM, LoRA r = 8 on query and value, a {len(label_names)}-label head), each "
        f"scored on its own client's {len(texts[0])} test sentences ({sentences} in all), batch {args.batch_size}, "
        f"{args.threads} torch threads, best of {args.repeats}:",
        "",
        "| way | what it includes | seconds | sentences/s | × the plain peft loop |",
        "|---|---|---|---|---|",
    ]
    what = {
        "plain peft": "base loaded once; each adapter loaded and set; batches in order",
        "simulate": "states in memory; sorted-length batches",
        "evaluate": "base and anchor loaded; each adapter loaded, scored, deleted; sorted-length batches",
    }
    for name, (seconds, _) in timed.items():
        lines.append(
            f"| {name} | {what[name]} | {seconds:.2f} | {sentences / seconds:,.0f} | {sentences / seconds / plain_rate:.2f} |"
        )
    share = evaluation_share(args.runs) if args.runs else ""
    text = "\n".join(lines) + (f"\n\n{share}" if share else "")
    print(text)
    if args.write_docs:
        write_generated(ROOT / "docs" / "performance.md", "eval-throughput", text, note)


if __name__ == "__main__":
    main()
