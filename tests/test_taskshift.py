"""--partition task-shift and --alpha inf: different tasks per group, balanced draws, each sentence once."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.data import AnnotatedSentences, TextDataset, load_bbc_annotated
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.partition import TEST_EXAMPLES, partition_dirichlet, partition_tasks
from fedbip_cli.simulate.taskshift import TASKS, partition_task_shift, task_labels


@pytest.fixture(scope="module")
def annotated() -> AnnotatedSentences:
    return load_bbc_annotated()


def synthetic(per_label: int = 1000, num_labels: int = 5) -> TextDataset:
    texts = [f"sentence {i} about topic {label}" for i in range(per_label) for label in range(num_labels)]
    return TextDataset(texts, [label for _ in range(per_label) for label in range(num_labels)], ["t"] * num_labels)


def balanced(labels: list[int], classes: int) -> bool:
    counts = [labels.count(c) for c in range(classes)]
    return max(counts) - min(counts) <= 1 and sum(counts) == len(labels)


# ---- the corpus annotations ----------------------------------------------------------------------


def test_annotations_are_what_the_tasks_read(annotated: AnnotatedSentences) -> None:
    assert len(annotated.texts) == len(set(annotated.texts)) > 30_000
    assert not any('"' in text or "\u201c" in text for text in annotated.texts)  # removed, not a cue
    assert set(annotated.place) == {0, 1, 2}
    places = Counter(annotated.place)
    assert 1500 < places[0] < 2300 and 1500 < places[2] < 2300  # about one first and one last per article
    assert 0.2 < np.mean(annotated.quoted) < 0.4
    assert annotated.topic_names == ["business", "entertainment", "politics", "sports", "tech"]


def test_tasks_are_distinct(annotated: AnnotatedSentences) -> None:
    """One task's labels predict another's near chance: on a class-balanced sample of task B, the best
    map from A's class to B's class is right at most 12 points above 1/|B| (measured: at most +0.10,
    topic -> quote; docs/simulate.md gives every pair)."""
    labels = {task.name: task_labels(annotated, task) for task in TASKS}
    rng = np.random.default_rng(0)
    for a, b in itertools.permutations(TASKS, 2):
        target = labels[b.name]
        size = np.bincount(target).min()
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(target == c), size, replace=False) for c in range(len(b.classes))]
        )
        table = np.zeros((len(a.classes), len(b.classes)))
        np.add.at(table, (labels[a.name][chosen], target[chosen]), 1)
        best_map = table.max(axis=1).sum() / table.sum()
        assert best_map <= 1 / len(b.classes) + 0.12, (a.name, b.name, best_map)


# ---- the task-shift partition --------------------------------------------------------------------


@pytest.mark.parametrize("examples", [16, 32, 64])
def test_task_shift_balanced_disjoint_and_labelled_by_the_groups_task(
    annotated: AnnotatedSentences, examples: int
) -> None:
    clients, label_names = partition_task_shift(
        annotated, num_clients=10, groups=3, seed=4, examples_per_client=examples
    )
    assert label_names == [f"label-{k}" for k in range(5)]
    everything = [t for c in clients for t in c.train_texts + c.test_texts]
    assert len(everything) == len(set(everything))  # every sentence drawn at most once
    index = {text: i for i, text in enumerate(annotated.texts)}
    for number, client in enumerate(clients):
        assert client.group == number % 3
        task = TASKS[client.group]
        assert len(client.train_texts) == examples and len(client.test_texts) == TEST_EXAMPLES
        assert balanced(client.train_labels, len(task.classes)) and balanced(client.test_labels, len(task.classes))
        for text, label in zip(client.train_texts + client.test_texts, client.train_labels + client.test_labels):
            assert label == task.label(annotated, index[text])


def test_task_shift_smaller_regime_is_a_subset_of_the_larger(annotated: AnnotatedSentences) -> None:
    small, _ = partition_task_shift(annotated, num_clients=6, seed=2, examples_per_client=16)
    large, _ = partition_task_shift(annotated, num_clients=6, seed=2, examples_per_client=64)
    for a, b in zip(small, large):
        assert sorted(a.test_texts) == sorted(b.test_texts)
        assert set(a.train_texts) < set(b.train_texts)


def test_task_shift_with_label_skew(annotated: AnnotatedSentences) -> None:
    """A finite --alpha gives each client its own class mix (seeded); inf gives every client the uniform one."""
    skewed, _ = partition_task_shift(annotated, num_clients=6, seed=1, alpha=0.3, examples_per_client=64)
    assert not all(balanced(c.train_labels + c.test_labels, len(TASKS[c.group].classes)) for c in skewed)
    again, _ = partition_task_shift(annotated, num_clients=6, seed=1, alpha=0.3, examples_per_client=64)
    assert again == skewed


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_task_shift_groups(annotated: AnnotatedSentences, groups: int) -> None:
    clients, labels = partition_task_shift(annotated, num_clients=4, groups=groups, seed=0, examples_per_client=16)
    assert [c.group for c in clients] == [i % groups for i in range(4)]
    assert len(labels) == max(len(t.classes) for t in TASKS[:groups])


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"groups": 4}, "--groups 4"),
        ({"num_clients": 2}, "--groups 3"),
        ({"alpha": 0.0}, "--alpha"),
        ({"alpha": math.nan}, "--alpha"),
        ({"examples_per_client": 400}, "class"),  # the first/last classes run out before the others
    ],
)
def test_task_shift_errors(annotated: AnnotatedSentences, options: dict, needle: str) -> None:
    arguments = {"num_clients": 10, "seed": 0, "examples_per_client": 32, **options}
    with pytest.raises(UsageError, match=needle):
        partition_task_shift(annotated, **arguments)


# ---- --alpha inf on the label partitions ---------------------------------------------------------


@pytest.mark.parametrize("partition", [partition_tasks, partition_dirichlet])
def test_alpha_inf_draws_uniform_label_mixes(partition) -> None:  # noqa: ANN001
    clients, _ = partition(synthetic(), num_clients=6, seed=3, alpha=math.inf, examples_per_client=32)
    for client in clients:
        assert balanced(client.train_labels, 5) and balanced(client.test_labels, 5)
    everything = [t for c in clients for t in c.train_texts + c.test_texts]
    assert len(everything) == len(set(everything))


def test_alpha_inf_without_examples_per_client_splits_evenly() -> None:
    clients, _ = partition_tasks(synthetic(per_label=60), num_clients=6, groups=2, seed=0, alpha=math.inf)
    for client in clients:
        counts = Counter((label - client.group) % 5 for label in client.train_labels + client.test_labels)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_alpha_inf_keeps_the_records_strict_json() -> None:
    """inf is recorded as the string "inf" (JSON has no Infinity), and read back the same."""
    config = SimulationConfig(partition="task-shift", alpha=math.inf)
    assert config.alpha == "inf" and config.alpha_value() == math.inf
    text = json.dumps({"alpha": config.alpha}, allow_nan=False)
    assert SimulationConfig(alpha=json.loads(text)["alpha"]).alpha_value() == math.inf
    assert SimulationConfig(partition="task-shift").alpha_value() == math.inf  # task-shift's default
    assert SimulationConfig(partition="tasks").alpha_value() == 1.0
    with pytest.raises(UsageError, match="--alpha"):
        SimulationConfig(alpha="lots")


def test_task_shift_all_data_regime(annotated: AnnotatedSentences) -> None:
    """Without --examples-per-client: a seeded subset of --max-examples, each sentence once, split by
    --test-fraction, labelled by the group's task."""
    clients, _ = partition_task_shift(annotated, num_clients=4, groups=2, seed=0, max_examples=600)
    everything = [t for c in clients for t in c.train_texts + c.test_texts]
    assert len(everything) == len(set(everything)) == 600
    index = {text: i for i, text in enumerate(annotated.texts)}
    for client in clients:
        task = TASKS[client.group]
        assert len(client.test_texts) == round(0.2 * len(client.train_texts + client.test_texts))
        for text, label in zip(client.test_texts, client.test_labels):
            assert label == task.label(annotated, index[text])


@pytest.mark.parametrize(("value", "needle"), [("0", "--alpha 0"), ("nan", "--alpha nan"), ("-inf", "--alpha -inf")])
def test_cli_refuses_an_alpha_no_partition_takes(tmp_path, value: str, needle: str) -> None:  # noqa: ANN001
    """--alpha 0 is refused, not silently replaced by the partition's default; inf is the only infinity."""
    from typer.testing import CliRunner

    from fedbip_cli.cli import app

    result = CliRunner().invoke(app, ["simulate", "--alpha", value, "--rounds", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "run" / "summary.json").exists()
