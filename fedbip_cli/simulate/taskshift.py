"""``--partition task-shift``: each task group does a genuinely different task on the corpus's sentences.

Where ``--partition tasks`` relabels one task (the topic) per group, here the groups answer
different questions about a sentence, each needing other features of it:

- ``topic``: which of the five sections the article is from (business, entertainment, politics,
  sports, tech): the words' subject.
- ``quote``: does the sentence quote someone? The quotation marks are removed from every text,
  so the answer must come from the wording (reported speech, first person, "said"), not from
  one character.
- ``place``: where the sentence stands in its article: the first sentence of the body (the lede,
  which summarises the story), the last one, or one in between. This is discourse structure,
  which neither the topic nor quoting gives away.

Group g does ``TASKS[g]``; each task's classes are the first labels of the one classification
head (``label-0`` ... ``label-{C-1}``). Every sentence is used at most once: the sentences are
first dealt into equal shares per group with the same topic mix, and a group's task then labels
its share. Inside a group, each client holds an equal share of every class and draws its test and
training sentences from it, with the uniform class mix under ``--alpha inf`` (the default here:
the task is what sets clients apart) or its own Dirichlet(alpha) class mix otherwise
(``partition.draw_client``). How predictable each task is, alone
and from another task's labels, is measured in docs/simulate.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.data import AnnotatedSentences, ClientData, TextDataset
from fedbip_cli.simulate.partition import GroupTask, check_partition, partition_groups


@dataclass(frozen=True)
class Task:
    """One task of the task-shift partition: its class names and each sentence's class."""

    name: str
    classes: tuple[str, ...]
    label: Callable[[AnnotatedSentences, int], int]


TASKS: tuple[Task, ...] = (
    Task(
        "topic",
        ("business", "entertainment", "politics", "sports", "tech"),
        lambda data, i: data.topics[i],
    ),
    Task("quote", ("no quote", "quote"), lambda data, i: int(data.quoted[i])),
    Task("place", ("first", "between", "last"), lambda data, i: data.place[i]),
)


def task_labels(data: AnnotatedSentences, task: Task) -> np.ndarray:
    """Every sentence's class under ``task``."""
    return np.array([task.label(data, i) for i in range(len(data.texts))], dtype=np.int64)


def partition_task_shift(
    data: AnnotatedSentences,
    *,
    num_clients: int,
    groups: int = 3,
    alpha: float = math.inf,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    examples_per_client: int | None = None,
) -> tuple[list[ClientData], list[str]]:
    """Clients in ``groups`` task groups, group g doing ``TASKS[g]``; client c is in group ``c mod groups``.

    The sentences are dealt into equal shares per group with the same topic mix
    (``partition.partition_groups``). With ``examples_per_client`` N, each client gets
    ``TEST_EXAMPLES`` test and N training sentences of its group's task, drawn from its own equal
    share of each class: the uniform class mix under ``alpha`` inf, its own Dirichlet(alpha) mix
    otherwise. Without N (the all-data regime), a group's share keeps the corpus's class mix of its
    task and is split among its clients as in ``partition_tasks``.

    Returns:
        The clients (``group`` set) and the head's label names ``label-0`` ... ``label-{L-1}``, L the
        most classes of any task used (label k is class k of the client's task).

    Raises:
        UsageError: for ``groups`` outside 1..len(TASKS) or above ``num_clients``, a bad ``alpha``,
            ``test_fraction`` or ``max_examples``, or a task whose class has too few sentences.
    """
    check_partition(num_clients, alpha, test_fraction, max_examples, examples_per_client)
    if not 1 <= groups <= min(len(TASKS), num_clients):
        raise UsageError(
            f"--groups {groups}: --partition task-shift has {len(TASKS)} tasks "
            f"({', '.join(t.name for t in TASKS)}) and {num_clients} clients; expected 1..{min(len(TASKS), num_clients)}"
        )
    labels = [task_labels(data, task) for task in TASKS[:groups]]
    width = max(len(task.classes) for task in TASKS[:groups])
    clients = partition_groups(
        TextDataset(data.texts, data.topics, data.topic_names),
        GroupTask(lambda g: labels[g], lambda g: labels[g], width),
        num_clients=num_clients,
        groups=groups,
        alpha=alpha,
        seed=seed,
        test_fraction=test_fraction,
        max_examples=max_examples,
        examples_per_client=examples_per_client,
    )
    return clients, [f"label-{k}" for k in range(width)]
