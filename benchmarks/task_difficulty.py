"""How learnable each task of ``--partition task-shift`` is, alone and with plenty of data.

For each task (``simulate.taskshift.TASKS``), a class-balanced set of the corpus's annotated
sentences is drawn with a fixed seed: ``--train-per-class`` to train on and ``--test-per-class`` to
test on, disjoint. One model of the simulation's kind (the embedded MiniLM, LoRA r=8 on query and
value, the head in the adapter; the simulate defaults for lr and batch) is trained on the whole
training set centrally for ``--epochs`` passes and tested. Reported per task: its classes, the
majority-class accuracy (on a balanced test set, 1/classes) and the central accuracy. A task well
above chance is learnable; one well below 1.0 is not trivial; where the 32 sentences of a client sit
between is what the precondition table measures.

    .venv/bin/python benchmarks/task_difficulty.py [--train-per-class 600] [--epochs 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, write_generated  # noqa: E402
from fedbip_cli.simulate.data import load_bbc_annotated  # noqa: E402
from fedbip_cli.simulate.loop import SimulationConfig, build_model  # noqa: E402
from fedbip_cli.simulate.taskshift import TASKS, task_labels  # noqa: E402

SEED = 0


def balanced_split(labels: np.ndarray, classes: int, train: int, test: int, rng: np.random.Generator):
    """Per class, ``test`` then ``train`` indices from a seeded permutation of that class's sentences."""
    chosen_train, chosen_test = [], []
    for c in range(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < train + test:
            raise SystemExit(f"class {c} has {len(members)} sentences; lower --train-per-class")
        chosen_test.append(members[:test])
        chosen_train.append(members[test : test + train])
    return np.concatenate(chosen_train), np.concatenate(chosen_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--write-docs", action="store_true", help="write docs/simulate.md's task-difficulty section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_bbc_annotated()
    config = SimulationConfig()
    rows = [
        "| task | classes | train sentences | majority class | trained centrally |",
        "|---|---|---|---|---|",
    ]
    for task in TASKS:
        labels = task_labels(data, task)
        train, test = balanced_split(
            labels, len(task.classes), args.train_per_class, args.test_per_class, np.random.default_rng(SEED)
        )
        model = build_model(config, [f"label-{k}" for k in range(len(task.classes))])
        steps = math.ceil(args.epochs * len(train) / config.batch_size)
        model.train(
            model.tokenize([data.texts[i] for i in train]),
            torch.tensor(labels[train]),
            steps=steps,
            batch_size=config.batch_size,
            lr=config.lr,
            generator=torch.Generator().manual_seed(SEED),
        )
        accuracy = model.evaluate(model.tokenize([data.texts[i] for i in test]), torch.tensor(labels[test]))
        rows.append(
            f"| {task.name} | {', '.join(task.classes)} | {len(train)} | {1 / len(task.classes):.2f} | {accuracy:.3f} |"
        )
        print(rows[-1], flush=True)
    text = (
        f"Each task trained centrally on {args.train_per_class} balanced sentences per class for {args.epochs} "
        f"epochs (batch {config.batch_size}, lr {config.lr}, LoRA r={config.rank} on query and value, the head "
        f"trained), tested on {args.test_per_class} others per class:\n\n" + "\n".join(rows)
    )
    print(text)
    if args.write_docs:
        write_generated(ROOT / "docs" / "simulate.md", "task-difficulty", text)


if __name__ == "__main__":
    main()
