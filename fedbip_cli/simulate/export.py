"""``simulate --export-data DIR``: each client's sentences as the files ``--data`` and ``evaluate`` read.

``DIR/train/<client>.jsonl``, ``DIR/test/<client>.jsonl`` and, with --select-on-validation, the held-out
``DIR/validation/<client>.jsonl`` hold one ``{"text": ..., "label": ...}``
object a line (the label by name), the very split the run trains and evaluates on; with several seeds
each seed's partition goes into ``DIR/seed-<s>/``. ``simulate --data DIR/train`` reads the training
files back as clients; ``evaluate --data DIR/test --base OUT/base`` scores adapters on the test files.
The directory is written whole or not at all (``outdir.Outputs``) and never over a non-empty one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedbip_cli.outdir import Outputs, check_out
from fedbip_cli.simulate.data import ClientData
from fedbip_cli.simulate.loop import SimulationConfig, load_clients


def export_data(config: SimulationConfig, directory: Path, *, seed_list: Sequence[int] | None, out: Path) -> None:
    """Write the clients of ``config`` (of each seed of ``seed_list``) into ``directory``; refuse a
    ``directory`` in or around the run's ``out`` or the ``--data`` it reads."""
    inputs = [Path(out).absolute(), *([Path(config.data_dir).absolute()] if config.data_dir else [])]
    check_out(Path(directory).absolute(), inputs, overwrite=False)  # before Outputs creates a missing parent
    with Outputs() as outputs:
        staged = outputs.directory(Path(directory), inputs)
        for seed in seed_list if seed_list is not None else [None]:
            clients, labels = load_clients(config if seed is None else replace(config, seed=seed))
            write_clients(clients, labels, staged if seed is None else staged / f"seed-{seed}")


def write_clients(clients: Sequence[ClientData], label_names: Sequence[str], directory: Path) -> None:
    """``directory/train/<client>.jsonl`` and ``directory/test/<client>.jsonl`` for each client, and
    ``directory/validation/<client>.jsonl`` when the clients hold validation sentences out."""
    held = any(client.validation_texts for client in clients)
    for split in ("train", "validation", "test") if held else ("train", "test"):
        (directory / split).mkdir(parents=True)
        for client in clients:
            texts, labels = getattr(client, f"{split}_texts"), getattr(client, f"{split}_labels")
            rows = (json.dumps({"text": t, "label": label_names[y]}, ensure_ascii=False) for t, y in zip(texts, labels))
            (directory / split / f"{client.name}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
