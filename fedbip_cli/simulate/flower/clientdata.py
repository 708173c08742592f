"""What a SuperNode's client trains on: a partition of the run's data, or the client's own files.

A SuperNode says which with its ``--node-config``:

- ``partition-id=i num-partitions=N``: client i of the N that ``fedbip simulate`` makes from the
  run's options (the BBC partition, or the server-named ``--data`` directory);
- ``data-dir=/path/to/client-dir`` (and optionally ``name=NAME``): the client's own files, which
  never leave its machine::

      client-dir/train.jsonl  (or train.csv)   required: the client's examples
      client-dir/test.jsonl   (or test.csv)    optional: its test examples

  in ``--data``'s format (a ``{"text": ..., "label": ...}`` object a line, or a CSV header with
  ``text`` and ``label`` columns). The client is called NAME, by default the directory's name.
  Without a test file its test split is drawn from ``train.*`` exactly as ``fedbip simulate
  --data DIR`` draws it from ``DIR/<NAME>.jsonl`` (``test_fraction``, the seed and the client's
  place in name order, which the server sends), so that clients holding their own ``train`` files
  are the very federation of ``--data`` over those files. With a test file, every ``train`` row is
  for training (in the same seeded order) and every ``test`` row for testing.

A client reports the label names it holds; the server agrees on one label list for every client's
head (``strategy.Roster``) and each client's labels are renumbered into it (``relabel``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_cli.errors import SourceError, UsageError
from fedbip_cli.simulate.data import DATA_SUFFIXES, ClientData, _read_client_file, check_test_fraction, make_client
from fedbip_cli.simulate.loop import SimulationConfig, load_clients

# A client's name names its output directory on the server (adapters/<name>): a plain file name.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HINT = (
    "a SuperNode's data-dir holds train.jsonl (or train.csv) and optionally test.jsonl (or test.csv), "
    "in --data's format; its name= (default: the directory's name) is letters, digits, '.', '_' and '-'"
)


def check_name(name: str, where: str) -> str:
    """``name`` when it is a plain client name (it becomes a directory name on the server)."""
    if not NAME.fullmatch(name):
        raise UsageError(
            f"client name {name!r} is not a plain name (letters, digits, '.', '_', '-'; at most 64)",
            where=where,
            hint='pass --node-config "data-dir=... name=client-a"',
        )
    return name


def client_data(config: SimulationConfig, node: Mapping[str, Any], index: int) -> tuple[ClientData, list[str]]:
    """The client a SuperNode's ``node`` config names, and the label names its labels index.

    Args:
        config: the run's options (as the server sent them).
        node: the SuperNode's ``--node-config``.
        index: the client's place in client order (the server's; a ``data-dir`` client's test split
            and batches are seeded with it). Its sizes do not depend on it.
    """
    if "data-dir" in node:
        name = str(node.get("name") or Path(str(node["data-dir"])).resolve().name)
        return own_files(Path(str(node["data-dir"])), name, config, index)
    if "partition-id" not in node or "num-partitions" not in node:
        raise UsageError(
            f"node-config {dict(node)} names no client",
            hint='start the SuperNode with --node-config "partition-id=i num-partitions=N" or "data-dir=DIR"',
        )
    partition, count = int(node["partition-id"]), int(node["num-partitions"])
    clients, labels = load_clients(config)
    if count != len(clients) or not 0 <= partition < len(clients):
        raise UsageError(
            f"node-config partition-id={partition} num-partitions={count} does not fit a run of {len(clients)} clients",
            hint=f'start each SuperNode with --node-config "partition-id=i num-partitions={len(clients)}"',
        )
    return clients[partition], labels


def _client_file(directory: Path, stem: str, *, required: bool) -> Path | None:
    found = [directory / f"{stem}{suffix}" for suffix in DATA_SUFFIXES if (directory / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise SourceError(f"both {found[0].name} and {found[1].name}; keep one", where=str(directory), hint=_HINT)
    if required and not found:
        raise SourceError(f"no {stem}.jsonl or {stem}.csv", where=str(directory), hint=_HINT)
    return found[0] if found else None


def own_files(directory: Path, name: str, config: SimulationConfig, index: int) -> tuple[ClientData, list[str]]:
    """One client's own ``train``/``test`` files (see the module's docstring) and its label names
    (the sorted labels of its rows, as ``str``).

    Raises:
        SourceError: naming the file and line of a bad row, or the directory when a file is missing.
        UsageError: for a name that is not a plain name.
    """
    check_test_fraction(config.test_fraction)
    if not directory.is_dir():
        raise SourceError("the data-dir is not a directory", where=str(directory), hint=_HINT)
    check_name(name, str(directory))
    train = _read_client_file(_client_file(directory, "train", required=True))
    test_path = _client_file(directory, "test", required=False)
    test = _read_client_file(test_path) if test_path is not None else []
    labels = sorted({label for _, _, label in [*train, *test]})
    number = {label: i for i, label in enumerate(labels)}
    rng = np.random.default_rng([config.seed, index])  # as load_client_files seeds the client at this place
    texts, targets = [text for _, text, _ in train], [number[label] for _, _, label in train]
    if test_path is None:
        client = make_client(name, texts, targets, num_labels=len(labels), test_fraction=config.test_fraction, rng=rng)
    else:
        order = rng.permutation(len(texts))
        client = ClientData(
            name,
            [texts[i] for i in order],
            [targets[i] for i in order],
            [text for _, text, _ in test],
            [number[label] for _, _, label in test],
            len(labels),
        )
    if config.examples_per_client is not None:  # the first N of the (shuffled) train split, as loop.load_clients
        client.train_texts = client.train_texts[: config.examples_per_client]
        client.train_labels = client.train_labels[: config.examples_per_client]
    return client, labels


def relabel(client: ClientData, names: list[str], labels: list[str]) -> ClientData:
    """``client`` (whose labels index ``names``) with its labels renumbered into the run's ``labels``.

    Raises:
        UsageError: when the client holds a label that is not in ``labels``.
    """
    outside = sorted(set(names[i] for i in [*client.train_labels, *client.test_labels]) - set(labels))
    if outside:
        raise UsageError(
            f"client {client.name} has label(s) {outside} that the run's labels {labels} lack",
            hint="name every client's labels in the run config's labels, or fix that client's files",
        )
    number = {label: i for i, label in enumerate(labels)}
    return ClientData(
        client.name,
        client.train_texts,
        [number[names[i]] for i in client.train_labels],
        client.test_texts,
        [number[names[i]] for i in client.test_labels],
        len(labels),
        client.group,
    )
