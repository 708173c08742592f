"""Split a ``TextDataset`` into non-IID federated clients.

Two partitions, both seeded, deterministic and independent of the order of the input dataset
(examples are first put in a canonical order, sorted by (text, label), and only then shuffled):

- ``tasks``: G task groups that genuinely conflict. Group g relabels every sentence with the cyclic
  shift ``label' = (topic + g) mod L``, so no two groups agree on the label of any topic, and a
  model averaged across groups is pulled in incompatible directions. Within a group, clients have
  Dirichlet label skew. This is the setting in which personalized merging should beat averaging.
- ``dirichlet``: one task (the original labels) with Dirichlet label skew across all clients.

Every example lands in exactly one client (train or test split), never two.

With ``examples_per_client`` N (the data regime), every client trains on exactly N of its own
examples and is tested on ``test_examples`` others of its own, drawn from all sentences: N sets how
much data a client has, while its test split stays large enough to measure accuracy (400 sentences:
a standard error of at most 2.5 points per client, 2 points at 80 % accuracy). In this regime each
client draws its own topic proportions p ~ Dirichlet(alpha), independently of every other client,
and its train and test sentences follow p (``_skewed_draw``). Splitting each topic's examples among
a group's clients by Dirichlet shares, as the all-data split does, makes group-mates' label mixes
complementary (what one holds of a topic the others lack): their label-mix cosine was 0.43-0.59
within groups against 0.57-0.67 between them, so the label skew pointed away from the true groups
and hid them from any similarity. With independent mixes, the label skew is the same noise within
and between groups, and only the task (the group's relabelling) sets group-mates apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.data import ClientData, TextDataset, check_test_fraction, make_client

PARTITIONS = ("tasks", "dirichlet")
# Each client gets at least this many examples, so that it has both train and test data.
MIN_CLIENT_EXAMPLES = 10
# The test split per client in the --examples-per-client regimes (see the module docstring).
TEST_EXAMPLES = 400


def task_label(topic: int, group: int, num_labels: int) -> int:
    """The label that task group ``group`` gives to topic ``topic``: a cyclic shift by ``group``.

    For ``groups <= num_labels`` the shifts differ for every pair of groups, so two groups never
    agree on any topic's label.
    """
    return (topic + group) % num_labels


def client_names(num_clients: int) -> list[str]:
    """``client-00``, ``client-01``, ...: zero-padded to the width of ``num_clients - 1``, at least 2."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client-{c:0{width}d}" for c in range(num_clients)]


def _canonical_order(data: TextDataset) -> np.ndarray:
    """Example indices sorted by (text, label): the same sequence of examples for any input order."""
    return np.array(sorted(range(len(data.texts)), key=lambda i: (data.texts[i], data.labels[i])), dtype=np.int64)


def _select(data: TextDataset, max_examples: int | None, rng: np.random.Generator) -> np.ndarray:
    """The examples used, in canonical order: all, or a seeded subset of ``max_examples``."""
    order = _canonical_order(data)
    if max_examples is not None and max_examples < len(order):
        order = order[np.sort(rng.choice(len(order), size=max_examples, replace=False))]
    return order


def stratified_shares(
    indices: np.ndarray, labels: np.ndarray, parts: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint shares of ``indices``, equal within one and with the same label mix.

    The shuffled examples are dealt round-robin label by label; each label's deal starts where the
    previous one stopped, so that no share collects every label's remainder.
    """
    shuffled = rng.permutation(indices)
    shares: list[list[np.ndarray]] = [[] for _ in range(parts)]
    dealt = 0
    for label in np.unique(labels[shuffled]):
        members = shuffled[labels[shuffled] == label]
        for offset in range(parts):
            shares[(dealt + offset) % parts].append(members[offset::parts])
        dealt += len(members)
    return [np.concatenate(share) if share else np.empty(0, dtype=np.int64) for share in shares]


def _top_up(parts: list[np.ndarray], minimum: int) -> None:
    """Move examples from the largest part to each part with fewer than ``minimum``, in place.

    The caller guarantees ``sum(len) >= len(parts) * minimum``, so the largest part always has more
    than ``minimum`` while some part has fewer, and the loop ends.
    """
    for i in range(len(parts)):
        while len(parts[i]) < minimum:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i] = np.append(parts[i], parts[donor][-1])
            parts[donor] = parts[donor][:-1]


def _dirichlet_split(
    indices: np.ndarray, labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split ``indices`` into ``parts`` with label skew: per label, shares ~ Dirichlet(alpha).

    Small ``alpha`` gives each part few labels; large ``alpha`` approaches an IID split. Parts left
    with fewer than ``MIN_CLIENT_EXAMPLES`` are topped up deterministically from the largest.
    """
    chunks: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        proportions = rng.dirichlet(np.full(parts, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for chunk, piece in zip(chunks, np.split(members, cuts)):
            chunk.append(piece)
    split = [np.concatenate(chunk) for chunk in chunks]
    _top_up(split, MIN_CLIENT_EXAMPLES)
    return split


def _skewed_draw(pools: dict[int, np.ndarray], count: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` examples drawn in sequence from one client's own per-topic ``pools`` with the
    client's label skew: its topic proportions p ~ Dirichlet(``alpha``) are drawn once, then each
    example's topic is drawn from p (renormalised over the topics whose pool is not yet empty) and
    the next example of that topic's pool is taken.

    The draws come one after another from ``rng``, so a shorter draw is a prefix of a longer one:
    the regimes of one seed hold the same clients, only with more or less data. The caller checks
    that the pools hold ``count`` examples in all.
    """
    topics = sorted(pools)
    proportions = rng.dirichlet(np.full(len(topics), alpha))
    taken = [0] * len(topics)
    drawn = np.empty(count, dtype=np.int64)
    for k in range(count):
        left = np.array([proportions[t] if taken[t] < len(pools[topics[t]]) else 0.0 for t in range(len(topics))])
        if left.sum() <= 0:  # every topic with weight is empty: the rest by the pools' sizes
            left = np.array([len(pools[topics[t]]) - taken[t] for t in range(len(topics))], dtype=np.float64)
        cdf = np.cumsum(left / left.sum())
        t = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(topics) - 1)
        while taken[t] >= len(pools[topics[t]]):  # rounding at the cdf's end: the last non-empty topic
            t -= 1
        drawn[k] = pools[topics[t]][taken[t]]
        taken[t] += 1
    return drawn


def _even_counts(count: int, first: np.ndarray) -> list[int]:
    """``count`` split as evenly as possible over ``len(first)`` classes; the classes ranked first by
    ``first`` (a permutation) take one more each while the remainder lasts."""
    base, extra = divmod(count, len(first))
    rank = np.argsort(first)
    return [base + int(rank[c] < extra) for c in range(len(first))]


def draw_client(
    name: str,
    pools: dict[int, np.ndarray],
    *,
    examples: int,
    test_examples: int,
    alpha: float,
    rng: np.random.Generator,
    what: str = "its group",
) -> tuple[np.ndarray, np.ndarray]:
    """One client's test and training examples, drawn from its own per-class ``pools``.

    ``alpha`` finite: one ``_skewed_draw`` of ``test_examples + examples`` with the client's own
    Dirichlet(alpha) class mix, the test split first. ``alpha`` infinite: two stratified draws with
    the uniform class mix, the test split and then the training one, each split as evenly as
    possible over the classes (``_even_counts``; the same classes take the remainder in both, and
    a smaller ``examples`` takes a subset of a larger one's sentences).

    Returns:
        The test and the training indices.

    Raises:
        UsageError: when the pools (or, under ``alpha`` inf, one class's pool) hold too few examples.
    """
    total = sum(len(pool) for pool in pools.values())
    if total < examples + test_examples:
        raise UsageError(
            f"{name} holds {total} sentences, fewer than --examples-per-client {examples} plus its "
            f"{test_examples} test sentences",
            hint="lower --examples-per-client or --clients",
        )
    if not math.isinf(alpha):
        drawn = _skewed_draw(pools, test_examples + examples, alpha, rng)
        return drawn[:test_examples], drawn[test_examples:]
    classes = sorted(pools)
    first = rng.permutation(len(classes))
    test_counts, train_counts = _even_counts(test_examples, first), _even_counts(examples, first)
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for c, label in enumerate(classes):
        pool = pools[label]
        if len(pool) < test_counts[c] + train_counts[c]:
            raise UsageError(
                f"{name} ({what}) holds {len(pool)} sentences of class {label}; a balanced draw of "
                f"--examples-per-client {examples} and {test_examples} test sentences needs {test_counts[c] + train_counts[c]}",
                hint="lower --examples-per-client or --clients",
            )
        test.append(pool[: test_counts[c]])
        train.append(pool[test_counts[c] : test_counts[c] + train_counts[c]])
    return rng.permutation(np.concatenate(test)), rng.permutation(np.concatenate(train))


@dataclass(frozen=True)
class GroupTask:
    """What group g's clients learn: ``classes(g)``, every example's class as the draws and splits
    balance or skew it, and ``seen(g)``, every example's label as its clients see it (the same
    array, or a relabelling of it). ``known`` says whether the groups are reported to the outputs."""

    classes: Callable[[int], np.ndarray]
    seen: Callable[[int], np.ndarray]
    num_labels: int
    known: bool = True


def _fixed_client(
    name: str,
    pool: np.ndarray,
    data: TextDataset,
    task: GroupTask,
    group: int,
    *,
    examples: int,
    alpha: float,
    rng: np.random.Generator,
) -> ClientData:
    """A client with exactly ``TEST_EXAMPLES`` test and ``examples`` train sentences drawn from its
    own ``pool`` (its equal, stratified share of its group's examples) by ``draw_client``."""
    classes, seen = task.classes(group), task.seen(group)
    pools = {int(c): pool[classes[pool] == c] for c in np.unique(classes[pool])}
    test, train = draw_client(name, pools, examples=examples, test_examples=TEST_EXAMPLES, alpha=alpha, rng=rng)
    return ClientData(
        name=name,
        train_texts=[data.texts[i] for i in train],
        train_labels=seen[train].tolist(),
        test_texts=[data.texts[i] for i in test],
        test_labels=seen[test].tolist(),
        num_labels=task.num_labels,
        group=group if task.known else None,
    )


def check_partition(
    num_clients: int, alpha: float, test_fraction: float, max_examples: int | None, examples: int | None = None
) -> None:
    """Raise ``UsageError`` for option values no partition accepts (``alpha`` may be ``inf``: no label skew)."""
    if examples is not None and examples < 1:
        raise UsageError(f"--examples-per-client {examples}: expected a positive integer")
    if num_clients < 2:
        raise UsageError(f"--clients {num_clients}: a simulation needs at least 2 clients")
    if not alpha > 0:
        raise UsageError(f"--alpha {alpha}: expected a positive number (small = strong label skew) or inf (none)")
    if max_examples is not None and max_examples < 1:
        raise UsageError(f"--max-examples {max_examples}: expected a positive integer")
    check_test_fraction(test_fraction)


def partition_groups(
    data: TextDataset,
    task: GroupTask,
    *,
    num_clients: int,
    groups: int,
    alpha: float,
    seed: int,
    test_fraction: float,
    max_examples: int | None,
    examples_per_client: int | None = None,
) -> list[ClientData]:
    """Groups get equal shares stratified by ``data.labels``; clients ``g, g+G, ...`` split group g's
    share by Dirichlet(``alpha``) shares of each of its classes (``task``), or evenly for ``alpha`` inf.

    With ``examples_per_client``, all sentences are used (``max_examples`` is ignored), group g's
    share is dealt into equal stratified pools, one per client, and each client keeps a fixed-size
    test and train draw from its pool (``_fixed_client``), with its own label skew or none."""
    rng = np.random.default_rng(seed)
    selected = _select(data, None if examples_per_client else max_examples, rng)
    shares = stratified_shares(selected, np.asarray(data.labels, dtype=np.int64), groups, rng)
    names = client_names(num_clients)
    clients: dict[int, ClientData] = {}
    for group, share in enumerate(shares):
        members = list(range(group, num_clients, groups))
        if len(share) < len(members) * MIN_CLIENT_EXAMPLES:
            raise UsageError(
                f"{len(share)} examples for the {len(members)} clients of task group {group}; each client "
                f"needs at least {MIN_CLIENT_EXAMPLES}",
                hint="raise --max-examples, or lower --clients or --groups",
            )
        classes, seen = task.classes(group), task.seen(group)
        if examples_per_client:
            # Equal per-class pools per client, then a draw from each client's own pool with its own
            # proportions: the clients' label mixes are independent of each other's.
            for client, pool in zip(members, stratified_shares(share, classes, len(members), rng)):
                client_rng = np.random.default_rng(rng.integers(2**63))
                clients[client] = _fixed_client(
                    names[client], pool, data, task, group, examples=examples_per_client, alpha=alpha, rng=client_rng
                )
            continue
        if math.isinf(alpha):  # no label skew: equal shares with the group's label mix
            split = stratified_shares(share, classes, len(members), rng)
        else:
            split = _dirichlet_split(share, classes, len(members), alpha, rng)
        for client, part in zip(members, split):
            clients[client] = make_client(
                names[client],
                [data.texts[i] for i in part],
                seen[part].tolist(),
                num_labels=task.num_labels,
                test_fraction=test_fraction,
                rng=rng,
                group=group if task.known else None,
            )
    return [clients[c] for c in range(num_clients)]


def partition_tasks(
    data: TextDataset,
    *,
    num_clients: int,
    groups: int = 3,
    alpha: float = 1.0,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    examples_per_client: int | None = None,
) -> tuple[list[ClientData], list[str]]:
    """Clients in ``groups`` conflicting task groups, with Dirichlet label skew inside each group.

    Client c belongs to group ``c mod groups``. The examples (optionally a seeded subset of
    ``max_examples``, taken first) are split into equal, disjoint shares per group with the same
    topic mix; group g relabels each topic t as ``task_label(t, g, L) = (t + g) mod L``. Within a
    group, each topic's examples are divided among the group's clients by Dirichlet(``alpha``)
    proportions, and each client splits its own examples into train and test (``test_fraction``);
    or, with ``examples_per_client`` N, each client draws its own topic proportions from
    Dirichlet(``alpha``) and keeps ``TEST_EXAMPLES`` test and N train sentences that follow them.

    Returns:
        The clients (``group`` set) and the label names as the clients see them, ``label-0`` ...
        ``label-{L-1}``: label k means topic ``(k - g) mod L`` in group g, so no topic name fits all.

    Raises:
        UsageError: for ``groups`` outside 1..min(L, num_clients), a bad ``alpha``,
            ``test_fraction`` or ``max_examples``, or too few examples for the clients.
    """
    check_partition(num_clients, alpha, test_fraction, max_examples, examples_per_client)
    num_labels = len(data.label_names)
    if not 1 <= groups <= num_labels:
        raise UsageError(
            f"--groups {groups}: expected 1..{num_labels}; conflicting tasks are cyclic relabelings of "
            f"the {num_labels} labels, so there are at most {num_labels} of them"
        )
    if groups > num_clients:
        raise UsageError(f"--groups {groups} is more than --clients {num_clients}; every group needs a client")
    topics = np.asarray(data.labels, dtype=np.int64)
    task = GroupTask(lambda g: topics, lambda g: (topics + g) % num_labels, num_labels)  # task_label, vectorised
    clients = partition_groups(
        data,
        task,
        num_clients=num_clients,
        groups=groups,
        alpha=alpha,
        seed=seed,
        test_fraction=test_fraction,
        max_examples=max_examples,
        examples_per_client=examples_per_client,
    )
    return clients, [f"label-{k}" for k in range(num_labels)]


def partition_dirichlet(
    data: TextDataset,
    *,
    num_clients: int,
    alpha: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    examples_per_client: int | None = None,
) -> tuple[list[ClientData], list[str]]:
    """One task (the original labels) with Dirichlet(``alpha``) label skew across all clients.

    Returns:
        The clients (``group`` None) and the dataset's own label names.
    """
    check_partition(num_clients, alpha, test_fraction, max_examples, examples_per_client)
    topics = np.asarray(data.labels, dtype=np.int64)
    task = GroupTask(lambda g: topics, lambda g: topics, len(data.label_names), known=False)
    clients = partition_groups(
        data,
        task,
        num_clients=num_clients,
        groups=1,
        alpha=alpha,
        seed=seed,
        test_fraction=test_fraction,
        max_examples=max_examples,
        examples_per_client=examples_per_client,
    )
    return clients, list(data.label_names)


def public_sentences(data: TextDataset, clients: list[ClientData], count: int, seed: int) -> list[str]:
    """``count`` sentences of ``data`` that no client holds (in its train or test split): a public,
    unlabeled set for a server that distils on one (the universal expert). Drawn with a generator
    seeded by ``seed`` alone from the remaining sentences in canonical order, so the clients'
    partition is unchanged; in the --examples-per-client regimes most sentences are held by no client.

    Raises:
        UsageError: when fewer than ``count`` sentences are left (the all-data regime uses them all).
    """
    held = {text for client in clients for text in (*client.train_texts, *client.test_texts)}
    free = [i for i in _canonical_order(data) if data.texts[i] not in held]
    if len(free) < count:
        raise UsageError(
            f"{len(free)} sentences are held by no client; the public set needs {count}",
            hint="use --examples-per-client, or lower --public-examples",
        )
    chosen = np.sort(np.random.default_rng([seed, 2]).choice(len(free), size=count, replace=False))
    return [data.texts[free[i]] for i in chosen]
