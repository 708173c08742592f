"""The streamed safetensors writer: sizes, shard plans, and files that safetensors reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedbip_cli.checkpoints import INDEX_NAME, WEIGHTS_NAME, TensorSpec, row_ranges
from fedbip_cli.errors import UsageError
from fedbip_cli.shards import ShardedWriter, parse_size, plan_shards


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), ("100", 100), (" 7 B ", 7), ("3TiB", 3 * 2**40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "2 parsecs", "-1GB", "GB", "0.0001B"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UsageError, match="is not a size") as caught:
        parse_size(text)
    assert "GiB" in caught.value.hint


def spec(name: str, *shape: int, dtype: str = "F32") -> TensorSpec:
    return TensorSpec(name, tuple(shape), dtype, Path("unused"))


def test_plan_fills_shards_in_order_and_gives_big_tensors_their_own() -> None:
    tensors = [spec("a", 10), spec("b", 10), spec("big", 100), spec("c", 5, dtype="BF16"), spec("d", 20)]
    plan = plan_shards(tensors, max_bytes=80)
    assert [(f, [t.name for t in ts]) for f, ts in plan.shards] == [
        ("model-00001-of-00004.safetensors", ["a", "b"]),
        ("model-00002-of-00004.safetensors", ["big"]),
        ("model-00003-of-00004.safetensors", ["c"]),
        ("model-00004-of-00004.safetensors", ["d"]),
    ]
    assert plan.total_size == 4 * 140 + 2 * 5
    assert plan_shards(tensors, max_bytes=10**6).shards[0][0] == WEIGHTS_NAME


def test_streamed_shards_read_back_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 3, generator=gen),
        "h": torch.randn(5, generator=gen).bfloat16(),
        "ids": torch.arange(4),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}
    specs = [TensorSpec(n, tuple(t.shape), names[t.dtype], Path()) for n, t in tensors.items()]
    plan = plan_shards(specs, max_bytes=40)
    with ShardedWriter(tmp_path, plan) as writer:
        for s in specs:
            for rows in row_ranges(s.shape, 5):  # the matrix comes in ranges of one row (3 elements)
                writer.write(s.name, tensors[s.name] if rows is None else tensors[s.name][rows])
        files = writer.close()
    assert len(files) > 2 and files[-1].name == INDEX_NAME
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["weight_map"] == plan.weight_map and index["metadata"]["total_size"] == plan.total_size
    back = {}
    for path in files[:-1]:
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        back.update(load_file(path))
    assert back.keys() == tensors.keys()
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_what_the_plan_does_not_say(tmp_path: Path) -> None:
    plan = plan_shards([spec("a", 2), spec("b", 2)], max_bytes=100)
    with ShardedWriter(tmp_path, plan) as writer:
        with pytest.raises(ValueError, match="expected a"):
            writer.write("b", torch.zeros(2))
        with pytest.raises(ValueError, match="expected a"):
            writer.write("a", torch.zeros(2, dtype=torch.float64))
        with pytest.raises(ValueError, match="more data"):
            writer.write("a", torch.zeros(3))
        writer.write("a", torch.zeros(2))
        with pytest.raises(ValueError, match="b and later tensors were not written"):
            writer.close()
