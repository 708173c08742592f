"""Training throughput of ``fedbip simulate``'s client loop against a plain peft training loop.

Both train the same model — the embedded all-MiniLM-L6-v2 as peft's SEQ_CLS LoRA model (r=8,
alpha 16 on query and value, the head in modules_to_save) — on the same BBC sentences with AdamW at
the simulation's batch size and sentence length. They differ only in how the loop is written:

- plain peft (what a peft tutorial does): tokenize each batch as it is drawn (padding=True, i.e. to
  the batch's longest sentence, as DataCollatorWithPadding does), ``model.train()`` (dropout on),
  ``model(**batch, labels=y).loss``;
- fedbip (``ClientModel.train``): sentences tokenized once per client and run, batches cut to their
  longest sentence, the model in eval mode (no dropout, deterministic), one new optimizer per round.

A third line runs fedbip's loop under ``torch.autocast("cpu", torch.bfloat16)``: not what
``simulate`` does (it changes the arithmetic), measured to show what bf16 matmuls would buy here.

The same run also splits fedbip's round into its parts (state load, forward, backward, optimizer
step, state copy out; tokenizing per sentence, paid once per run), so the profile and the ratio
come from the same machine state. Each loop runs ``--repeats`` times, alternated, and the median is
reported, so that a busy moment on a shared machine falls on both alike.

    .venv/bin/python benchmarks/sim_throughput.py [--steps 40] [--repeats 3] [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedbip_cli.simulate.data import load_bbc
from fedbip_cli.simulate.model import ClientModel, embedded_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, write_generated  # noqa: E402

BATCH = 16
MAX_LENGTH = 32
SENTENCES = 64 * 10  # ten clients' worth of the limited regime


def plain_peft_loop(texts: list[str], labels: torch.Tensor, steps: int, label_names: list[str]) -> float:
    """Examples per second of a plain peft training loop (see the module docstring)."""
    directory = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=len(label_names), ignore_mismatched_sizes=True
    )
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(len(texts), (BATCH,), generator=generator)
        batch = tokenizer(
            [texts[i] for i in index], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        loss = model(**batch, labels=labels[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * BATCH / (time.perf_counter() - start)


def bf16_loop(model: ClientModel, texts: list[str], labels: torch.Tensor, steps: int) -> float:
    """Examples per second of ``ClientModel.train`` under CPU bf16 autocast."""
    tokens = model.tokenize(texts)
    model.load_state(model.initial_state())
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train(tokens, labels, steps=steps, batch_size=BATCH, lr=1e-3, generator=torch.Generator().manual_seed(0))
    return steps * BATCH / (time.perf_counter() - start)


def fedbip_loop(
    model: ClientModel, texts: list[str], labels: torch.Tensor, steps: int
) -> tuple[float, dict[str, float]]:
    """Examples per second of ``ClientModel.train`` over one client's round, as the simulation runs
    it (load the state, train, copy the state out), and seconds per part, measured in a second pass
    that mirrors ``train`` step by step."""
    tokens = model.tokenize(texts)
    state = model.initial_state()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.load_state(state)
    model.train(tokens, labels, steps=steps, batch_size=BATCH, lr=1e-3, generator=generator)
    model.state()
    rate = steps * BATCH / (time.perf_counter() - start)

    parts = dict.fromkeys(
        ("tokenize (once per run)", "load state", "forward", "backward", "optimizer", "state out"), 0.0
    )
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[part] += now - clock
        clock = now

    model.tokenize(texts)
    lap("tokenize (once per run)")
    model.load_state(state)
    lap("load state")
    params = list(model._params.values())  # the benchmark mirrors train(); it reads the same parameters
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    order = torch.randperm(len(tokens), generator=generator)
    for step in range(steps):
        index = order[(step * BATCH) % len(tokens) :][:BATCH]
        loss = F.cross_entropy(model._logits(tokens[index]), labels[index])
        lap("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lap("backward")
        optimizer.step()
        loss.item()
        lap("optimizer")
    model.state()
    lap("state out")
    return rate, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write-docs", action="store_true", help="write the report into docs/simulate.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_bbc()
    texts = data.texts[:SENTENCES]
    labels = torch.tensor(data.labels[:SENTENCES])
    model = ClientModel(embedded_model_dir(), labels=data.label_names, max_length=MAX_LENGTH)
    plain_peft_loop(texts, labels, 3, data.label_names)  # warm-up: first calls allocate
    fedbip_loop(model, texts, labels, 3)
    bf16_loop(model, texts, labels, 2)
    plain, ours, bf16, profiles = [], [], [], []
    for _ in range(args.repeats):
        plain.append(plain_peft_loop(texts, labels, args.steps, data.label_names))
        rate, parts = fedbip_loop(model, texts, labels, args.steps)
        ours.append(rate)
        profiles.append(parts)
        bf16.append(bf16_loop(model, texts, labels, args.steps))
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        f"model: all-MiniLM-L6-v2 SEQ_CLS + LoRA r=8 (query, value), batch {BATCH}, max length {MAX_LENGTH}",
        f"plain peft loop    {statistics.median(plain):7.1f} examples/s  (runs: {', '.join(f'{r:.1f}' for r in plain)})",
        f"fedbip ClientModel {statistics.median(ours):7.1f} examples/s  (runs: {', '.join(f'{r:.1f}' for r in ours)})",
        f"ratio fedbip / plain: {statistics.median(ours) / statistics.median(plain):.2f}x",
        f"fedbip under bf16 autocast {statistics.median(bf16):6.1f} examples/s "
        f"({statistics.median(bf16) / statistics.median(ours):.2f}x fedbip; not used by simulate)",
    ]
    total = {part: statistics.median(p[part] for p in profiles) for part in profiles[0]}
    whole = sum(total.values())
    lines.append(f"where one client's round of {args.steps} steps goes (median of {args.repeats}):")
    lines += [
        f"  {part:<24} {seconds * 1000:8.1f} ms  {100 * seconds / whole:5.1f} %" for part, seconds in total.items()
    ]
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_generated(ROOT / "docs" / "simulate.md", "sim-throughput", f"```text\n{report}\n```")


if __name__ == "__main__":
    main()
