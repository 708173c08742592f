"""Write sharded safetensors checkpoints streamed: tensor by tensor, a range of rows at a time.

The layout is the one transformers' ``save_pretrained`` writes: ``model.safetensors`` when every
tensor fits in one shard, else ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``). The shapes and dtypes are
known before any data (they are the base's), so each shard's header is written first and the data
appended as it is produced: a shard is never held in memory. The same tensors give the same bytes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from fedbip_cli.checkpoints import INDEX_NAME, WEIGHTS_NAME, TensorSpec
from fedbip_cli.defaults import DEFAULT_MAX_SHARD_SIZE as DEFAULT_MAX_SHARD_SIZE  # re-exported: its old home
from fedbip_cli.errors import UsageError
from fedbip_cli.outdir import finite

# Decimal units as transformers reads "5GB"; binary units spelled out (GiB).
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_ALIGN = 8  # safetensors pads its header with spaces to a multiple of 8 bytes


def parse_size(text: str) -> int:
    """Bytes in a size such as ``2GB`` (10⁹), ``500MiB`` (2²⁰ each) or ``1000`` (bytes).

    Raises:
        UsageError: not a positive size with a known unit.
    """
    match = _SIZE_RE.match(text) if len(text) <= 40 else None  # a longer number is no size (and float() gives inf)
    size = int(float(match[1]) * _UNITS[(match[2] or "").upper()]) if match else 0
    if size < 1:
        raise UsageError(
            f"--max-shard-size {text!r} is not a size",
            hint="write a positive number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 2GB)",
        )
    return size


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors (name, shape, dtype) go in which shard file, in write order."""

    shards: list[tuple[str, list[TensorSpec]]]

    @property
    def order(self) -> list[TensorSpec]:
        return [t for _, tensors in self.shards for t in tensors]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.order)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: file for file, tensors in self.shards for t in tensors}


def plan_shards(tensors: Sequence[TensorSpec], max_bytes: int) -> ShardPlan:
    """Fill shards in the given order, starting a new one when the next tensor would exceed ``max_bytes``.

    A tensor larger than ``max_bytes`` gets a shard of its own, as in transformers.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return ShardPlan([(WEIGHTS_NAME, groups[0])])
    n = len(groups)
    return ShardPlan([(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(groups)])


def _header(tensors: Sequence[TensorSpec]) -> bytes:
    """A safetensors header: length (little-endian u64), then space-padded JSON with data offsets."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype_name, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Write one checkpoint's shards into a directory, in plan order, as the data comes.

    ``write(name, chunk)`` appends the next rows of tensor ``name``; tensors must come in the plan's
    order and each be written whole (its chunks' bytes add up to its size). ``close()`` checks that
    everything was written and adds the index when there is more than one shard.
    """

    def __init__(self, directory: Path, plan: ShardPlan) -> None:
        self.directory = directory
        self.plan = plan
        self._queue = [(i, t) for i, (_, tensors) in enumerate(plan.shards) for t in tensors]
        self._next = 0  # index in _queue of the tensor being written
        self._written = 0  # its bytes written so far
        self._shard = -1
        self._file: BinaryIO | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (the next rows of tensor ``name``, in its planned dtype)."""
        if self._next >= len(self._queue):
            raise ValueError(f"{name}: every planned tensor is already written")
        shard, planned = self._queue[self._next]
        if name != planned.name or chunk.dtype != planned.dtype:
            raise ValueError(f"expected {planned.name} ({planned.dtype}), got {name} ({chunk.dtype})")
        if shard != self._shard:
            self._open(shard)
        data = (
            finite(chunk.detach().cpu().contiguous(), name, self.directory.name).reshape(-1).view(torch.uint8).numpy()
        )
        if self._written + data.nbytes > planned.nbytes:
            raise ValueError(f"{name}: more data than its shape {list(planned.shape)} holds")
        assert self._file is not None
        self._file.write(memoryview(data))
        self._written += data.nbytes
        if self._written == planned.nbytes:
            self._next += 1
            self._written = 0

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded, and return every file written."""
        self._close_file()
        if self._next != len(self._queue):
            raise ValueError(f"{self._queue[self._next][1].name} and later tensors were not written")
        files = [self.directory / name for name, _ in self.plan.shards]
        if len(files) > 1:
            index = {
                "metadata": {"total_size": self.plan.total_size},
                "weight_map": dict(sorted(self.plan.weight_map.items())),
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append(self.directory / INDEX_NAME)
        return files

    def _open(self, shard: int) -> None:
        self._close_file()
        name, tensors = self.plan.shards[shard]
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 -- closed by close() or __exit__
        self._file.write(_header(tensors))
        self._shard = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._close_file()
