"""Simulation data: the BBC sentence corpus, --data client files, and the non-IID partitions."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedbip_cli.errors import SourceError, UsageError
from fedbip_cli.simulate.data import ClientData, TextDataset, load_bbc, load_client_files
from fedbip_cli.simulate.partition import (
    MIN_CLIENT_EXAMPLES,
    PARTITIONS,
    TEST_EXAMPLES,
    _skewed_draw,
    partition_dirichlet,
    partition_tasks,
    task_label,
)


@pytest.fixture(scope="module")
def bbc() -> TextDataset:
    return load_bbc()


def synthetic(per_label: int = 200, num_labels: int = 5) -> TextDataset:
    """Unique texts, ``per_label`` of each label, interleaved."""
    texts, labels = [], []
    for i in range(per_label):
        for label in range(num_labels):
            texts.append(f"sentence {i} about topic {label}")
            labels.append(label)
    return TextDataset(texts, labels, [f"topic-{k}" for k in range(num_labels)])


def shuffled(data: TextDataset, seed: int) -> TextDataset:
    order = np.random.default_rng(seed).permutation(len(data.texts))
    return TextDataset([data.texts[i] for i in order], [data.labels[i] for i in order], data.label_names)


def texts_of(client: ClientData) -> list[str]:
    return client.train_texts + client.test_texts


def label_entropy(client: ClientData) -> float:
    counts = np.array(list(Counter(client.train_labels + client.test_labels).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def partition(kind: str, data: TextDataset, **options) -> tuple[list[ClientData], list[str]]:
    return {"tasks": partition_tasks, "dirichlet": partition_dirichlet}[kind](data, **options)


# ---- load_bbc ---------------------------------------------------------------------------------


def test_load_bbc_sentences(bbc: TextDataset) -> None:
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.texts) == len(bbc.labels) > 30_000
    assert set(bbc.labels) == set(range(5))
    assert all(len(t.split()) >= 6 and t == t.strip() for t in bbc.texts)
    assert len(set(bbc.texts)) == len(bbc.texts)
    index = dict(zip(bbc.texts, bbc.labels))
    # The first body sentence of business/001.txt; its 6-word headline is skipped.
    first = (
        "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m) for the three "
        "months to December, from $639m year-earlier."
    )
    assert index[first] == 0
    assert "Ad sales boost Time Warner profit" not in index
    # sports/199.txt is latin-1: its pound sign must survive decoding.
    assert any("a £15.8m signing from Parma" in t for t in bbc.texts)


def test_load_bbc_min_words(bbc: TextDataset) -> None:
    long_only = load_bbc(min_words=20)
    assert 0 < len(long_only.texts) < len(bbc.texts)
    assert all(len(t.split()) >= 20 for t in long_only.texts)


# ---- both partitions --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PARTITIONS)
def test_every_example_in_exactly_one_client(kind: str, bbc: TextDataset) -> None:
    for data in (synthetic(), bbc):
        clients, _ = partition(kind, data, num_clients=7, seed=3)
        assert Counter(t for c in clients for t in texts_of(c)) == Counter(data.texts)
        for client in clients:
            assert not set(client.train_texts) & set(client.test_texts)
            assert len(texts_of(client)) >= MIN_CLIENT_EXAMPLES


@pytest.mark.parametrize("kind", PARTITIONS)
def test_max_examples_is_a_subset_used_once(kind: str, bbc: TextDataset) -> None:
    clients, _ = partition(kind, bbc, num_clients=6, max_examples=1500, seed=1)
    used = [t for c in clients for t in texts_of(c)]
    assert len(used) == len(set(used)) == 1500
    assert set(used) <= set(bbc.texts)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_deterministic_per_seed(kind: str) -> None:
    data = synthetic()
    first, _ = partition(kind, data, num_clients=6, seed=5)
    again, _ = partition(kind, data, num_clients=6, seed=5)
    other, _ = partition(kind, data, num_clients=6, seed=6)
    assert first == again
    assert [set(texts_of(c)) for c in first] != [set(texts_of(c)) for c in other]


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("max_examples", [None, 600])
def test_independent_of_input_order(kind: str, max_examples: int | None) -> None:
    data = synthetic()
    reference, _ = partition(kind, data, num_clients=6, seed=2, max_examples=max_examples)
    for seed in (0, 1):
        clients, _ = partition(kind, shuffled(data, seed), num_clients=6, seed=2, max_examples=max_examples)
        for a, b in zip(reference, clients):
            assert set(zip(a.train_texts, a.train_labels)) == set(zip(b.train_texts, b.train_labels))
            assert set(zip(a.test_texts, a.test_labels)) == set(zip(b.test_texts, b.test_labels))


@pytest.mark.parametrize("kind", PARTITIONS)
def test_label_skew_grows_as_alpha_shrinks(kind: str) -> None:
    data = synthetic()

    def mean_entropy(alpha: float) -> float:
        clients = [c for s in range(3) for c in partition(kind, data, num_clients=6, alpha=alpha, seed=s)[0]]
        return sum(map(label_entropy, clients)) / len(clients)

    iid, mild, strong = mean_entropy(100.0), mean_entropy(1.0), mean_entropy(0.1)
    assert iid > mild > strong
    assert iid > 0.95 * math.log(5)  # alpha 100 is close to uniform labels


@pytest.mark.parametrize("kind", PARTITIONS)
def test_test_split_is_a_fraction_of_the_clients_own_data(kind: str) -> None:
    clients, _ = partition(kind, synthetic(), num_clients=5, test_fraction=0.25, seed=0)
    for client in clients:
        n = len(texts_of(client))
        assert len(client.test_texts) == min(max(round(0.25 * n), 1), n - 1)
        assert len(client.test_labels) == len(client.test_texts)
        assert len(client.train_labels) == len(client.train_texts)


def test_tiny_clients_are_topped_up() -> None:
    clients, _ = partition_dirichlet(synthetic(per_label=40), num_clients=15, alpha=0.01, seed=0)
    assert min(len(texts_of(c)) for c in clients) >= MIN_CLIENT_EXAMPLES
    assert sum(len(texts_of(c)) for c in clients) == 200


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"num_clients": 1}, "at least 2 clients"),
        ({"num_clients": 4, "alpha": 0.0}, "--alpha"),
        ({"num_clients": 4, "test_fraction": 1.0}, "test fraction"),
        ({"num_clients": 4, "max_examples": 0}, "--max-examples"),
        ({"num_clients": 30, "max_examples": 200}, "at least 10"),
    ],
)
@pytest.mark.parametrize("kind", PARTITIONS)
def test_bad_options(kind: str, options: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        partition(kind, synthetic(), **options)


# ---- tasks partition --------------------------------------------------------------------------


def test_tasks_groups_conflict_on_every_topic(bbc: TextDataset) -> None:
    clients, label_names = partition_tasks(bbc, num_clients=10, groups=3, seed=0, max_examples=5000)
    assert label_names == [f"label-{k}" for k in range(5)]
    assert [c.name for c in clients] == [f"client-{c:02d}" for c in range(10)]
    assert [c.group for c in clients] == [c % 3 for c in range(10)]
    topic = dict(zip(bbc.texts, bbc.labels))
    seen: dict[int, dict[int, set[int]]] = {g: {} for g in range(3)}  # group -> topic -> labels given
    for client in clients:
        assert client.num_labels == 5
        for text, label in zip(texts_of(client), client.train_labels + client.test_labels):
            assert label == task_label(topic[text], client.group, 5)
            seen[client.group].setdefault(topic[text], set()).add(label)
    for g in range(3):
        assert sorted(seen[g]) == list(range(5))  # every group sees every topic
        for h in range(g):
            for t in range(5):
                assert seen[g][t].isdisjoint(seen[h][t])


def test_tasks_groups_get_equal_shares() -> None:
    data = synthetic()
    topic = dict(zip(data.texts, data.labels))
    clients, _ = partition_tasks(data, num_clients=6, groups=3, seed=0)
    per_group, per_group_topic = Counter(), Counter()
    for client in clients:
        per_group[client.group] += len(texts_of(client))
        per_group_topic.update((client.group, topic[t]) for t in texts_of(client))
    assert sorted(per_group.values()) == [333, 333, 334]
    for t in range(5):  # 200 examples of each topic: 66 or 67 per group
        assert sorted(per_group_topic[g, t] for g in range(3)) == [66, 67, 67]


def test_tasks_relabeling_is_a_conflicting_permutation() -> None:
    for g in range(5):
        assert sorted(task_label(t, g, 5) for t in range(5)) == list(range(5))
        for h in range(g):
            assert all(task_label(t, g, 5) != task_label(t, h, 5) for t in range(5))


@pytest.mark.parametrize("groups, clients", [(6, 10), (0, 10), (4, 3)])
def test_tasks_bad_groups(groups: int, clients: int) -> None:
    with pytest.raises(UsageError, match="--groups"):
        partition_tasks(synthetic(), num_clients=clients, groups=groups)


def test_dirichlet_keeps_labels_and_has_no_groups(bbc: TextDataset) -> None:
    clients, label_names = partition_dirichlet(bbc, num_clients=4, seed=0, max_examples=2000)
    assert label_names == bbc.label_names
    topic = dict(zip(bbc.texts, bbc.labels))
    for client in clients:
        assert client.group is None
        assert all(topic[t] == label for t, label in zip(client.train_texts, client.train_labels))


# ---- load_client_files ------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_load_client_files_jsonl_and_csv(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "beta.jsonl", [{"text": f"beta text {i}", "label": i % 2 + 1} for i in range(10)])
    (tmp_path / "alpha.csv").write_text(
        'id,text,label\n1,"hello, world",1\n2,second row,3\n3,"third ""quoted"" row",1\n', encoding="utf-8"
    )
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    clients, label_names = load_client_files(tmp_path, test_fraction=0.2, seed=0)
    assert label_names == ["1", "2", "3"]
    assert [c.name for c in clients] == ["alpha", "beta"]
    alpha, beta = clients
    assert dict(zip(texts_of(alpha), alpha.train_labels + alpha.test_labels)) == {
        "hello, world": 0,
        "second row": 2,
        'third "quoted" row': 0,
    }
    assert (len(alpha.train_texts), len(alpha.test_texts)) == (2, 1)
    assert (len(beta.train_texts), len(beta.test_texts)) == (8, 2)
    assert all(c.num_labels == 3 and c.group is None for c in clients)
    beta_labels = dict(zip(texts_of(beta), beta.train_labels + beta.test_labels))
    assert beta_labels == {f"beta text {i}": i % 2 for i in range(10)}
    assert load_client_files(tmp_path, seed=0)[0] == clients
    assert [c.test_texts for c in load_client_files(tmp_path, seed=1)[0]] != [c.test_texts for c in clients]


GOOD = '{"text": "fine", "label": "x"}\n{"text": "also fine", "label": "y"}\n'


@pytest.mark.parametrize(
    "name, content, line, fragment",
    [
        ("a.jsonl", '{"text": "ok", "label": 1}\n{"text": "no label"}\n', 2, "has no 'label' field"),
        ("a.jsonl", '{"text": "ok", "label": 1}\n\n{"text": "x", "label": 1\n', 3, "not valid JSON"),
        ("a.jsonl", '{"text": "  ", "label": 1}\n{"text": "ok", "label": 1}\n', 1, "'text' is empty"),
        ("a.jsonl", '{"label": 1}\n', 1, "has no 'text' field"),
        ("a.jsonl", '["text", "label"]\n', 1, "expected a JSON object"),
        ("a.jsonl", '{"text": "ok", "label": 1.5}\n', 1, "expected a string or an integer"),
        ("a.jsonl", '{"text": "only row", "label": 1}\n', 1, "at least 2"),
        ("a.csv", "text,label\nok,1\nmissing,\n", 3, "has no 'label' field"),
        ("a.csv", "text,category\nok,1\n", 1, "no 'label' column"),
        ("a.csv", "text,label\n,1\nok,1\n", 2, "'text' is empty"),
    ],
)
def test_load_client_files_errors_name_file_and_line(
    tmp_path: Path, name: str, content: str, line: int, fragment: str
) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(GOOD, encoding="utf-8")
    with pytest.raises(SourceError, match=fragment) as caught:
        load_client_files(tmp_path)
    assert caught.value.where == f"{tmp_path / name}:{line}"
    assert "text" in caught.value.hint and "label" in caught.value.hint


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({}, "no .jsonl or .csv"),
        ({"only.jsonl": GOOD}, "at least 2"),
        ({"a.jsonl": GOOD, "a.csv": "text,label\nx,1\ny,2\n", "b.jsonl": GOOD}, "both a .jsonl and a .csv"),
    ],
)
def test_load_client_files_directory_errors(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(SourceError, match=fragment) as caught:
        load_client_files(tmp_path)
    assert caught.value.where == str(tmp_path)


def test_load_client_files_bad_test_fraction(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="test fraction"):
        load_client_files(tmp_path, test_fraction=0.0)


# ---- --examples-per-client -------------------------------------------------------------------


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("examples", [16, 64])
def test_examples_per_client_sizes_disjoint_and_deterministic(kind: str, examples: int) -> None:
    data = synthetic(per_label=1000)
    clients, _ = partition(kind, data, num_clients=4, alpha=1.0, seed=3, examples_per_client=examples)
    assert [len(c.train_texts) for c in clients] == [examples] * 4
    assert [len(c.test_texts) for c in clients] == [TEST_EXAMPLES] * 4
    assert [len(c.train_labels) for c in clients] == [examples] * 4
    everything = [t for c in clients for t in texts_of(c)]
    assert len(everything) == len(set(everything))  # no sentence in two clients, or in train and test
    again, _ = partition(kind, shuffled(data, 7), num_clients=4, alpha=1.0, seed=3, examples_per_client=examples)
    assert [(c.train_texts, c.train_labels, c.test_texts) for c in again] == [
        (c.train_texts, c.train_labels, c.test_texts) for c in clients
    ]
    other, _ = partition(kind, data, num_clients=4, alpha=1.0, seed=4, examples_per_client=examples)
    assert [c.train_texts for c in other] != [c.train_texts for c in clients]


def test_examples_per_client_labels_follow_the_group_relabelling() -> None:
    data = synthetic(per_label=1000)
    topic = {text: label for text, label in zip(data.texts, data.labels, strict=True)}
    clients, _ = partition_tasks(data, num_clients=4, groups=2, seed=0, examples_per_client=32)
    for client in clients:
        for text, label in zip(client.train_texts + client.test_texts, client.train_labels + client.test_labels):
            assert label == task_label(topic[text], client.group, 5)


def test_examples_per_client_smaller_regime_is_a_draw_from_the_same_clients() -> None:
    """The limited and the ample regime of one seed give each client data of the same client
    (same group and label mix), only less of it: the test split is the same sentences."""
    data = synthetic(per_label=1000)
    small, _ = partition_tasks(data, num_clients=4, seed=1, examples_per_client=16)
    large, _ = partition_tasks(data, num_clients=4, seed=1, examples_per_client=128)
    assert [c.test_texts for c in small] == [c.test_texts for c in large]
    assert [c.train_texts for c in small] == [c.train_texts[:16] for c in large]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"examples_per_client": 0}, "--examples-per-client 0"),
        ({"examples_per_client": 5000}, "fewer than --examples-per-client 5000"),
    ],
)
def test_examples_per_client_errors(options: dict[str, int], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        partition_tasks(synthetic(per_label=1000), num_clients=4, seed=0, **options)


def test_skewed_draw_takes_each_example_once_and_empties_pools_in_turn() -> None:
    """Drawing every example of tiny pools: each exactly once, and a topic's examples in pool order,
    however the proportions fall (an empty topic's weight moves to the others)."""
    pools = {0: np.array([10, 11, 12]), 1: np.array([20]), 2: np.array([30, 31])}
    for seed in range(20):
        drawn = _skewed_draw(pools, 6, 0.3, np.random.default_rng(seed))
        assert sorted(drawn.tolist()) == [10, 11, 12, 20, 30, 31]
        assert [x for x in drawn.tolist() if x < 20] == [10, 11, 12]
        assert [x for x in drawn.tolist() if x >= 30] == [30, 31]


def test_skewed_draw_follows_the_clients_own_proportions() -> None:
    """With large pools, the draw's topic frequencies are the Dirichlet proportions drawn first
    from the same generator (4,000 draws: within 0.03 of each)."""
    pools = {t: np.arange(t * 10_000, t * 10_000 + 5_000) for t in range(5)}
    drawn = _skewed_draw(pools, 4_000, 1.0, np.random.default_rng(11))
    expected = np.random.default_rng(11).dirichlet(np.ones(5))
    frequencies = np.bincount(drawn // 10_000, minlength=5) / 4_000
    assert np.abs(frequencies - expected).max() < 0.03


def test_examples_per_client_label_mixes_are_independent_of_the_group() -> None:
    """Group-mates' label mixes are no more unlike each other than other clients' are: averaged over
    seeds, the within-group and between-group cosines of the clients' train label counts agree
    (Dirichlet shares of each topic among a group's clients would make group-mates complementary,
    within below between by 0.12 here; see the module docstring)."""
    data = synthetic(per_label=2000)
    within, between = [], []
    for seed in range(40):
        clients, _ = partition_tasks(data, num_clients=6, groups=2, seed=seed, alpha=1.0, examples_per_client=64)
        mixes = [np.bincount([(label - c.group) % 5 for label in c.train_labels], minlength=5) for c in clients]
        for i in range(6):
            for j in range(i + 1, 6):
                cosine = mixes[i] @ mixes[j] / (np.linalg.norm(mixes[i]) * np.linalg.norm(mixes[j]))
                (within if clients[i].group == clients[j].group else between).append(cosine)
    assert abs(np.mean(within) - np.mean(between)) < 0.04
