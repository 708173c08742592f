"""Read and validate fine-tuned model checkpoints (the Hugging Face layout) lazily.

A checkpoint directory holds ``config.json`` and its weights: ``model.safetensors``, or shards
``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``. Headers are read
once, here, and every tensor name and shape is checked against the base before any maths. Tensor
data is read on demand, a range of rows at a time, through ``safe_open`` slices: a whole model is
never in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from fedbip_cli.adapters import FLOAT_DTYPES, file_sha256, read_header
from fedbip_cli.boundedio import read_json
from fedbip_cli.errors import AdapterError
from fedbip_cli.sources import ModelShapes, ResolvedSource

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SUPPORTED = (
    f"fedbip reads models as save_pretrained writes them with safetensors: config.json and {WEIGHTS_NAME}, "
    f"or shards listed in {INDEX_NAME}"
)
SAME_MODEL = "every fine-tuned checkpoint must keep the base's architecture: the same tensor names and shapes"

# Tensors that are not floating point (position ids, masks) carry no task vector: they are checked
# for name and shape like the others, skipped by the maths, and copied from the base into outputs.
COPIED_DTYPES = {
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: where it lives, its shape and its safetensors dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    file: Path

    @property
    def floating(self) -> bool:
        return self.dtype_name in FLOAT_DTYPES

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES.get(self.dtype_name) or COPIED_DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class Checkpoint:
    """A validated checkpoint whose tensors are read lazily, a range of rows at a time."""

    name: str
    source: ResolvedSource
    tensors: dict[str, TensorSpec]
    files: dict[str, str]  # weight file name (relative to the directory) -> sha256
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def where(self) -> str:
        return str(self.source.path)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``rows`` of its first dimension, else all of it), in its stored dtype.

        Raises AdapterError when a floating tensor holds NaN or Inf.
        """
        spec = self.tensors[name]
        handle = self._handles.get(spec.file)
        if handle is None:  # one open file per weight file, kept for the checkpoint's lifetime
            handle = self._handles[spec.file] = safe_open(spec.file, framework="pt")
        tensor = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        if spec.floating and not torch.isfinite(tensor).all():
            raise AdapterError(
                f"tensor {name} contains NaN or Inf values",
                where=str(spec.file),
                hint="the fine-tuning diverged or the file is damaged; re-train or re-save it",
            )
        return tensor


def load_checkpoint(source: ResolvedSource, *, hashed: bool = True) -> Checkpoint:
    """Validate the checkpoint at ``source.path`` (index and safetensors headers) and return it.

    With ``hashed=False`` the weight files are not hashed (their ``files`` values are empty): a dry
    run reads no weight byte.
    """
    directory = source.path
    weight_map = _read_index(directory / INDEX_NAME) if (directory / INDEX_NAME).is_file() else None
    files = _weight_files(directory, weight_map)
    tensors: dict[str, TensorSpec] = {}
    for relative in files:
        path = directory / relative
        shapes, dtypes = read_header(path)
        for name, shape in shapes.items():
            if name in tensors:
                raise AdapterError(
                    f"tensor {name} is stored twice (also in {tensors[name].file.name})",
                    where=str(path),
                    hint=SUPPORTED,
                )
            tensors[name] = _spec(name, shape, dtypes[name], path)
    if weight_map is not None:
        _check_index(directory / INDEX_NAME, weight_map, tensors)
    if not tensors:
        raise AdapterError("the weights hold no tensors", where=str(directory), hint=SUPPORTED)
    return Checkpoint(source.name, source, tensors, {f: file_sha256(directory / f) if hashed else "" for f in files})


def header_checkpoint(source: ResolvedSource, shapes: ModelShapes) -> Checkpoint:
    """A checkpoint known from its safetensors headers alone (``sources.model_shapes``): for a dry
    run, whose Hub checkpoints' weights are not fetched. Its tensors cannot be read."""
    directory = shapes.directory or source.path
    tensors = {
        name: _spec(name, shape, shapes.dtypes[name], directory / shapes.files[name])
        for name, shape in shapes.shapes.items()
    }
    if not tensors:
        raise AdapterError("the weights hold no tensors", where=shapes.where, hint=SUPPORTED)
    return Checkpoint(source.name, source, tensors, {f: "" for f in sorted(set(shapes.files.values()))})


def _spec(name: str, shape: Sequence[int], dtype: str, path: Path) -> TensorSpec:
    """A tensor's spec, or AdapterError for a dtype fedbip does not read."""
    if dtype not in FLOAT_DTYPES and dtype not in COPIED_DTYPES:
        raise AdapterError(
            f"tensor {name} has dtype {dtype}, which fedbip does not read",
            where=str(path),
            hint=f"supported: {', '.join([*FLOAT_DTYPES, *COPIED_DTYPES])}; de-quantize the model first",
        )
    return TensorSpec(name, tuple(shape), dtype, path)


def _weight_files(directory: Path, weight_map: dict[str, str] | None) -> list[str]:
    """The safetensors files of a checkpoint, relative to it: the index's shards or model.safetensors."""
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise AdapterError(
                f"{INDEX_NAME} lists {missing[0]}, which is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                where=str(directory),
                hint="the download is incomplete; fetch every shard again",
            )
        return files
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    if any((directory / name).is_file() for name in PICKLED) or any(directory.glob("pytorch_model-*.bin")):
        raise AdapterError(
            "only pickled weights (pytorch_model*.bin) found; they are not read because unpickling can run code",
            where=str(directory),
            hint="re-save the model with safetensors (transformers: save_pretrained(..., safe_serialization=True))",
        )
    if any(directory.glob("model-*-of-*.safetensors")):
        raise AdapterError(f"sharded weights without {INDEX_NAME}", where=str(directory), hint=SUPPORTED)
    raise AdapterError(f"no {WEIGHTS_NAME} nor {INDEX_NAME}", where=str(directory), hint=SUPPORTED)


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index: tensor name -> shard file name."""
    index = read_json(path, error=AdapterError, what=INDEX_NAME)  # bounded: size, nesting, NaN
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise AdapterError('expected {"weight_map": {tensor: file, ...}}', where=str(path), hint=SUPPORTED)
    for file in weight_map.values():
        parts = PurePosixPath(file).parts
        if not parts or PurePosixPath(file).is_absolute() or ".." in parts:
            raise AdapterError(f"shard name {file!r} leaves the model directory", where=str(path), hint=SUPPORTED)
    return weight_map


def _check_index(path: Path, weight_map: dict[str, str], tensors: dict[str, TensorSpec]) -> None:
    """Every tensor the index names must be in the shard it names, and every stored tensor indexed."""
    for name, file in sorted(weight_map.items()):
        if name not in tensors or tensors[name].file != path.parent / file:
            raise AdapterError(
                f"{INDEX_NAME} puts tensor {name} in {file}, which does not hold it", where=str(path), hint=SUPPORTED
            )
    unindexed = sorted(set(tensors) - set(weight_map))
    if unindexed:
        raise AdapterError(
            f"tensor {unindexed[0]} is stored in {tensors[unindexed[0]].file.name} but not listed in {INDEX_NAME}",
            where=str(path),
            hint=SUPPORTED,
        )


def check_against_base(checkpoints: list[Checkpoint], base: Checkpoint) -> None:
    """Every checkpoint must hold exactly the base's tensors, with the base's shapes and dtype kinds."""
    for checkpoint in checkpoints:
        missing = sorted(set(base.tensors) - set(checkpoint.tensors))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise AdapterError(
                f"tensor {missing[0]} of the base ({base.tensors[missing[0]].file}) is missing{more}",
                where=checkpoint.where,
                hint=SAME_MODEL,
            )
        for name in sorted(checkpoint.tensors):
            spec = checkpoint.tensors[name]
            if name not in base.tensors:
                extra = len(set(checkpoint.tensors) - set(base.tensors)) - 1
                raise AdapterError(
                    f"tensor {name} is not in the base model {base.where}" + (f" (and {extra} more)" if extra else ""),
                    where=str(spec.file),
                    hint=f"{SAME_MODEL}; a checkpoint with a task head the base lacks needs a base with that head",
                )
            expected = base.tensors[name]
            if spec.shape != expected.shape:
                raise AdapterError(
                    f"tensor {name} has shape {list(spec.shape)} here but {list(expected.shape)} in the base ({expected.file})",
                    where=str(spec.file),
                    hint=SAME_MODEL,
                )
            if spec.floating != expected.floating:
                raise AdapterError(
                    f"tensor {name} is {spec.dtype_name} here but {expected.dtype_name} in the base ({expected.file})",
                    where=str(spec.file),
                    hint=SAME_MODEL,
                )


def row_ranges(shape: tuple[int, ...], max_elements: int | None) -> list[slice | None]:
    """Ranges of a tensor's first dimension holding at most ``max_elements`` each (None: the whole tensor)."""
    if max_elements is None or not shape:
        return [None]
    per_row = math.prod(shape[1:])
    step = max(1, max_elements // max(per_row, 1))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)] or [None]
