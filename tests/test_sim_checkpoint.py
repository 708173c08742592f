"""Simulate checkpoints: a resume trusts nothing in them (types, ranges, clients, tensors, checksum).

Table-driven: each case damages a good checkpoint in one way and names the part of the one-line
error that must say what is wrong; the file is always named.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedbip_cli.errors import AdapterError, UsageError
from fedbip_cli.simulate import checkpoint
from fedbip_cli.simulate.checkpoint import DIGEST_KEY, META_KEY, StrategyRun

CLIENTS = ["client-00", "client-01"]
REFERENCE = {"layer.lora_A": torch.zeros(2, 3), "classifier.weight": torch.zeros(4, 3)}
CONFIG: dict[str, Any] = {"rounds": 5, "lr": 0.001, "strategies": ["fedbip"]}


def good_run() -> StrategyRun:
    bar = {c: {k: torch.full_like(v, i + 1.0) for k, v in REFERENCE.items()} for i, c in enumerate(CLIENTS)}
    memory = {"client-00": {k: torch.full_like(v, 0.5) for k, v in REFERENCE.items()}}
    metrics = [{"strategy": "fedbip", "round": 1, "client": c, "test_accuracy": 0.5} for c in CLIENTS]
    return StrategyRun("fedbip", 2, bar, metrics, [{"round": 1}], {"train": 1.5, "eval": 0.5, "server": 0.1}, memory)


def load(path: Path) -> StrategyRun:
    return checkpoint.load(path, "fedbip", CONFIG, CLIENTS, REFERENCE)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "fedbip.safetensors"
    run = good_run()
    checkpoint.save(path, run, CONFIG)
    back = load(path)
    assert (back.strategy, back.round, back.metrics, back.similarity, back.seconds) == (
        run.strategy,
        run.round,
        run.metrics,
        run.similarity,
        run.seconds,
    )
    for states, expected in ((back.bar, run.bar), (back.memory, run.memory)):
        assert states.keys() == expected.keys()
        for client in expected:
            for name in REFERENCE:
                assert torch.equal(states[client][name], expected[client][name])


def rewrite(path: Path, *, meta: Callable[[dict[str, Any]], Any] | None = None, tensors=None, digest: bool = True):
    """Re-save ``path`` with its header JSON and/or tensors changed, and (``digest``) a checksum
    that matches the change, so that the check under test, not the checksum, must catch it."""
    flat = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    data = json.loads(header[META_KEY])
    text = json.dumps(meta(data)) if meta else header[META_KEY]
    if tensors:
        flat = tensors(flat)
    save_file(
        flat,
        str(path),
        metadata={META_KEY: text, DIGEST_KEY: checkpoint._digest(text, flat) if digest else header[DIGEST_KEY]},
    )


def with_key(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda meta: {**meta, key: value}


def without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def renamed(old: str, new: str):
    return lambda flat: {(new if k == old else k): v for k, v in flat.items()}


def replaced(key: str, tensor: torch.Tensor):
    return lambda flat: {**flat, key: tensor}


CASES = [
    ("round as a string", {"meta": with_key("round", "3")}, "round '3'"),
    ("round past the last", {"meta": with_key("round", 99)}, "round 99; expected an integer in 0..5"),
    ("negative round", {"meta": with_key("round", -1)}, "round -1"),
    ("round as a bool", {"meta": with_key("round", True)}, "round True"),
    ("missing key", {"meta": without("metrics")}, "header keys"),
    ("header not an object", {"meta": lambda meta: [1, 2]}, "header is list"),
    ("metrics not rows", {"meta": with_key("metrics", [1])}, "'metrics' is not a list of objects"),
    ("similarity not a list", {"meta": with_key("similarity", "x")}, "'similarity' is not a list"),
    ("negative seconds", {"meta": with_key("seconds", {"train": -1})}, "'seconds'"),
    ("seconds as strings", {"meta": with_key("seconds", {"train": "1"})}, "'seconds'"),
    ("another strategy", {"meta": with_key("strategy", "fedavg")}, "strategy 'fedavg'"),
    (
        "unknown client",
        {"tensors": renamed("bar/client-01/layer.lora_A", "bar/client-99/layer.lora_A")},
        "unknown client 'client-99'",
    ),
    (
        "unknown tensor",
        {"tensors": renamed("bar/client-01/layer.lora_A", "bar/client-01/layer.lora_Z")},
        "not a trainable tensor",
    ),
    (
        "unknown kind",
        {"tensors": renamed("memory/client-00/layer.lora_A", "extra/client-00/layer.lora_A")},
        "none of bar/, memory/, own/ and server/",
    ),
    (
        "missing tensor",
        {"tensors": lambda flat: {k: v for k, v in flat.items() if k != "bar/client-00/classifier.weight"}},
        "bar of client-00 lacks",
    ),
    (
        "missing client",
        {"tensors": lambda flat: {k: v for k, v in flat.items() if "client-01" not in k}},
        "states of 1 clients; expected 2",
    ),
    (
        "wrong shape",
        {"tensors": replaced("bar/client-00/layer.lora_A", torch.zeros(3, 2))},
        "expected torch.float32 (2, 3)",
    ),
    (
        "wrong dtype",
        {"tensors": replaced("bar/client-00/layer.lora_A", torch.zeros(2, 3, dtype=torch.float64))},
        "torch.float64",
    ),
    ("NaN", {"tensors": replaced("bar/client-00/layer.lora_A", torch.full((2, 3), float("nan")))}, "NaN or Inf"),
    ("changed without a new checksum", {"meta": with_key("round", 1), "digest": False}, "checksum does not match"),
]


@pytest.mark.parametrize(("case", "change", "needle"), CASES, ids=[c[0] for c in CASES])
def test_a_damaged_checkpoint_is_refused_with_a_line_naming_the_file(
    tmp_path: Path, case: str, change: dict[str, Any], needle: str
) -> None:
    path = tmp_path / "fedbip.safetensors"
    checkpoint.save(path, good_run(), CONFIG)
    rewrite(path, **change)
    with pytest.raises(AdapterError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and needle in message, message
    assert "\n" not in message


def test_every_flipped_bit_of_a_tensor_or_header_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "fedbip.safetensors"
    checkpoint.save(path, good_run(), CONFIG)
    good = path.read_bytes()
    header_size = struct.unpack("<Q", good[:8])[0]
    # one bit in each tensor byte of the data section and in the JSON of the header's metadata
    positions = list(range(8 + header_size, len(good))) + [good.index(b'\\"round\\": 2') + 11]
    for position in positions:
        damaged = bytearray(good)
        damaged[position] ^= 0x04
        path.write_bytes(bytes(damaged))
        with pytest.raises(AdapterError, match="checksum does not match|unreadable|header"):
            load(path)


def test_unreadable_file_and_other_options(tmp_path: Path) -> None:
    path = tmp_path / "fedbip.safetensors"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(AdapterError, match="checkpoint is unreadable"):
        load(path)
    checkpoint.save(path, good_run(), CONFIG)
    with pytest.raises(UsageError, match="other options") as info:
        checkpoint.load(path, "fedbip", {**CONFIG, "lr": 0.01}, CLIENTS, REFERENCE)
    assert info.value.where == str(path)
    # the other strategies compared beside it do not matter: a strategy's rounds are its own
    assert checkpoint.load(path, "fedbip", {**CONFIG, "strategies": ["local", "fedbip"]}, CLIENTS, REFERENCE).round == 2
