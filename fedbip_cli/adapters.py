"""Read and validate PEFT LoRA adapters lazily; write merged adapters.

An adapter is checked once, here, from its ``adapter_config.json`` and the safetensors header: every
later step can assume well-formed, supported LoRA factors. Tensor data is only read on demand
(``Adapter.factors``) through ``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedbip_cli.errors import AdapterError
from fedbip_cli.sources import ModelShapes, ResolvedSource

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SUPPORTED = "supported: plain LoRA adapters (peft_type LORA) on linear layers, saved as adapter_model.safetensors"

_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Tensor names that mark a kind of adapter whose delta is not s * B @ A, with what to tell the user.
_UNSUPPORTED_TENSORS = (
    ("lora_magnitude_vector", "DoRA adapters (use_dora) are not supported"),
    ("lora_embedding_", "LoRA on embedding layers is not supported"),
    ("modules_to_save", "modules_to_save (fully trained extra modules) are not supported"),
    ("trainable_tokens", "trainable token adapters are not supported"),
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: ΔW = scale · B @ A, with B of shape (out, r) and A of shape (r, in)."""

    name: str
    rank: int
    scale: float
    out_features: int
    in_features: int
    dtype: torch.dtype


@dataclass
class Adapter:
    """A validated adapter whose tensors are read lazily."""

    name: str
    source: ResolvedSource
    config: dict[str, Any]
    fan_in_fan_out: bool
    modules: dict[str, LoraModule]
    weights_path: Path
    sha256: str
    _prefix: str = field(default=KEY_PREFIX, repr=False)

    @property
    def where(self) -> str:
        return str(self.source.path)

    def stored_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B, A)`` for ``module`` exactly as stored: unscaled, in the file's dtype, on the CPU.

        Raises AdapterError when a tensor holds NaN or Inf.
        """
        with safe_open(self.weights_path, framework="pt") as f:
            a = f.get_tensor(f"{self._prefix}{module}.lora_A.weight")
            b = f.get_tensor(f"{self._prefix}{module}.lora_B.weight")
        return _finite(self, module, b, a)

    def factors(
        self, module: str, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scale · B, A)`` for ``module`` in ``dtype`` on ``device``.

        Raises AdapterError when a tensor holds NaN or Inf.
        """
        return scaled_factors(*self.stored_factors(module), self.modules[module].scale, dtype=dtype, device=device)


def _finite(adapter: Adapter, module: str, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, a)``, or AdapterError when either holds NaN or Inf."""
    for which, t in (("lora_A", a), ("lora_B", b)):
        if not torch.isfinite(t).all():
            raise AdapterError(
                f"{module}.{which} contains NaN or Inf values",
                where=str(adapter.weights_path),
                hint="the adapter's training diverged or the file is damaged; re-train or re-save it",
            )
    return b, a


class FactorReader:
    """Stored factors of many adapters, read module by module, about 5 times cheaper than ``Adapter.stored_factors``.

    ``safe_open`` maps the file and parses its header on every call (about 0.15 ms), which is most of
    the time of a pass over 10 000 clients × 12 modules. Here each weights file's header is parsed
    once (safetensors layout: a little-endian u64 header size, a JSON header of dtypes, shapes and
    data offsets) and a module's two tensors are read with one ``pread`` each. The files were
    validated by ``load_adapter``. Values are not checked here: ``read_module`` checks a whole batch
    for NaN and Inf at once and names the culprit.
    """

    def __init__(self) -> None:
        # weights file -> module -> (A, B) as (dtype, shape, start, end) in the file
        self._places: dict[Path, dict[str, tuple[tuple[torch.dtype, list[int], int, int], ...]]] = {}

    def read(self, adapter: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of ``module`` exactly as stored (unscaled, the file's dtype), not checked for NaN or Inf."""
        places = self._places.get(adapter.weights_path)
        if places is None:
            places = self._places[adapter.weights_path] = _factor_places(adapter)
        fd = os.open(adapter.weights_path, os.O_RDONLY)
        try:
            a, b = (
                torch.frombuffer(bytearray(os.pread(fd, end - start, start)), dtype=dtype).reshape(shape)
                for dtype, shape, start, end in places[module]
            )
        finally:
            os.close(fd)
        return b, a


def read_module(
    adapters: Sequence[Adapter], module: str, reader: FactorReader
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each adapter's stored ``(B, A)`` at ``module`` (None where it does not target it), checked at once.

    The check is one float64 sum per tensor (finite factors of any float dtype cannot overflow it;
    NaN and Inf propagate); only when a sum is not finite are the tensors checked one by one, so
    that the error names the adapter.

    Raises AdapterError when a tensor holds NaN or Inf.
    """
    stored = [reader.read(a, module) if module in a.modules else None for a in adapters]
    sums = [t.sum(dtype=torch.float64) for pair in stored if pair is not None for t in pair]
    if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
        for adapter, pair in zip(adapters, stored):
            if pair is not None:
                _finite(adapter, module, *pair)
    return stored


def _factor_places(adapter: Adapter) -> dict[str, tuple[tuple[torch.dtype, list[int], int, int], ...]]:
    """Where each module's lora_A and lora_B lie in the adapter's weights file."""
    with open(adapter.weights_path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    places = {}
    for module in adapter.modules:
        entries = [header[f"{adapter._prefix}{module}.lora_{which}.weight"] for which in "AB"]
        places[module] = tuple(
            (FLOAT_DTYPES[e["dtype"]], e["shape"], 8 + size + e["data_offsets"][0], 8 + size + e["data_offsets"][1])
            for e in entries
        )
    return places


def scaled_factors(
    b: torch.Tensor,
    a: torch.Tensor,
    scale: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale · B, A)`` in ``dtype`` on ``device``, from the stored factors."""
    return b.to(device=device, dtype=dtype) * scale, a.to(device=device, dtype=dtype)


def load_adapter(source: ResolvedSource) -> Adapter:
    """Validate the adapter at ``source.path`` (config and safetensors header) and return it."""
    directory = source.path
    config = _read_config(directory / CONFIG_NAME)
    _check_config(config, directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise AdapterError(
                f"only pickled weights ({PICKLE_NAME}) found; they are not read because unpickling can run code",
                where=str(directory),
                hint=f"re-save the adapter with safetensors (peft: save_pretrained(..., safe_serialization=True)); {SUPPORTED}",
            )
        raise AdapterError(f"{WEIGHTS_NAME} is missing", where=str(directory), hint=SUPPORTED)
    shapes, dtypes = read_header(weights)
    prefix = KEY_PREFIX if all(k.startswith(KEY_PREFIX) for k in shapes) else ""
    modules = _parse_modules(shapes, dtypes, prefix, config, weights)
    if not modules:
        raise AdapterError(
            "no LoRA tensors (*.lora_A.weight / *.lora_B.weight) found", where=str(weights), hint=SUPPORTED
        )
    return Adapter(
        name=source.name,
        source=source,
        config=config,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        modules=modules,
        weights_path=weights,
        sha256=file_sha256(weights),
        _prefix=prefix,
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(
            f"{CONFIG_NAME} is missing",
            where=str(path.parent),
            hint="point at a PEFT adapter directory (as written by save_pretrained)",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(
            f"cannot read {CONFIG_NAME}: {exc}", where=str(path), hint="the file must be valid JSON as written by peft"
        ) from None
    if not isinstance(config, dict):
        raise AdapterError("expected a JSON object", where=str(path), hint="the file must be a PEFT adapter config")
    return config


def _check_config(config: dict[str, Any], path: Path) -> None:
    where = str(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported", where=where, hint=SUPPORTED)
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora: true) are not supported", where=where, hint=SUPPORTED)
    if config.get("lora_bias"):
        raise AdapterError("LoRA bias (lora_bias: true) is not supported", where=where, hint=SUPPORTED)
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"bias {config.get('bias')!r} is not supported (trained biases are not a low-rank delta)",
            where=where,
            hint=SUPPORTED,
        )
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"lora rank r={r!r} in {CONFIG_NAME}; expected a positive integer", where=where)
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha={alpha!r}; expected a number", where=where)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{key} must be an object mapping module patterns to numbers", where=where)


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes and dtype names (``F32``, ``BF16``, ...) of every tensor in a safetensors file, from its header."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            slices = {k: f.get_slice(k) for k in keys}
            shapes = {k: list(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
    except Exception as exc:  # safetensors raises its own error types and OSError for damaged files
        raise AdapterError(
            f"corrupt or truncated safetensors file ({exc})",
            where=str(path),
            hint="re-download or re-save it",
        ) from None
    return shapes, dtypes


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's lookup: the first pattern key that matches the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# The floating dtypes fedbip computes with, by their safetensors names.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _parse_modules(
    shapes: dict[str, list[int]], dtypes: dict[str, str], prefix: str, config: dict[str, Any], path: Path
) -> dict[str, LoraModule]:
    where = str(path)
    factors: dict[str, dict[str, str]] = {}
    for key in shapes:
        for marker, problem in _UNSUPPORTED_TENSORS:
            if marker in key:
                raise AdapterError(f"{problem} (tensor {key})", where=where, hint=SUPPORTED)
        match = _FACTOR_RE.match(key[len(prefix) :])
        if match is None:
            if key.endswith(".lora_B.bias"):
                raise AdapterError(f"LoRA bias is not supported (tensor {key})", where=where, hint=SUPPORTED)
            if key.endswith(".bias"):
                raise AdapterError(f"trained biases are not supported (tensor {key})", where=where, hint=SUPPORTED)
            raise AdapterError(f"unexpected tensor {key}", where=where, hint=SUPPORTED)
        factors.setdefault(match["module"], {})[match["which"]] = key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for name in sorted(factors):
        pair = factors[name]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(
                f"{name} has no {missing}.weight", where=where, hint="the adapter file is incomplete; re-save it"
            )
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(
                f"{name}: lora_A {a_shape} / lora_B {b_shape} are not matrices (LoRA on convolutions is not supported)",
                where=where,
                hint=SUPPORTED,
            )
        if a_shape[0] != b_shape[1]:
            raise AdapterError(
                f"{name}: lora_A has shape {a_shape} and lora_B {b_shape}; their ranks differ",
                where=where,
                hint="lora_A must be (r, in_features) and lora_B (out_features, r)",
            )
        rank = a_shape[0]
        expected = _pattern_value(rank_pattern, name, config["r"])
        if expected != rank:
            raise AdapterError(
                f"{name}: tensors have rank {rank} but {CONFIG_NAME} gives r={expected} for this module",
                where=where,
                hint="the config and the weights do not belong together",
            )
        alpha = _pattern_value(alpha_pattern, name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        dtype_name = dtypes[pair["A"]]
        if dtype_name not in FLOAT_DTYPES or dtypes[pair["B"]] not in FLOAT_DTYPES:
            raise AdapterError(
                f"{name}: unsupported dtype {dtype_name}", where=where, hint="use float32, float16 or bfloat16 weights"
            )
        modules[name] = LoraModule(name, rank, float(scale), b_shape[0], a_shape[1], FLOAT_DTYPES[dtype_name])
    return modules


def merged_config(ranks: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """The adapter_config.json of a merged adapter whose modules have scale 1 (ΔW = B @ A).

    ``ranks`` maps module name to rank; ``config`` is the template (task type, base model,
    fan_in_fan_out). Ranks go in ``r`` (the most common) and ``rank_pattern`` / ``alpha_pattern``
    for the others, with ``lora_alpha`` equal to the rank everywhere so that peft's scale is 1.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    common = max(sorted(counts), key=lambda r: counts[r])
    # Plain full names: every peft version matches them against the module path's tail.
    pattern = {name: r for name, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "revision": config.get("revision"),
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_config(directory: Path, config: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_adapter(
    directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict[str, Any], dtype: torch.dtype
) -> None:
    """Write a PEFT adapter (config + safetensors) whose modules have scale 1: ΔW = B @ A.

    ``factors`` maps module name to ``(B, A)``; see ``merged_config`` for the config.
    """
    write_config(directory, merged_config({name: int(a.shape[0]) for name, (_, a) in factors.items()}, config))
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(factors):
        b, a = factors[name]
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to(dtype=dtype, device="cpu").contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to(dtype=dtype, device="cpu").contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


_DTYPE_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


class StreamingAdapterWriter:
    """Writes a merged adapter's safetensors file module by module, so that a merge holds one module's
    outputs at a time instead of every client's whole adapter.

    The header (names, shapes, offsets) is written first from the ranks known before the merge; the
    data follow in the order of ``ranks`` (each module's A then B), appended as they are computed and
    hashed on the way. safetensors readers take tensors in any order of the data section.
    """

    def __init__(
        self, path: Path, ranks: dict[str, int], shapes: dict[str, tuple[int, int]], dtype: torch.dtype
    ) -> None:
        self.path = path
        self.dtype = dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._expected: list[tuple[str, list[int]]] = []
        offset = 0
        for module, r in ranks.items():
            out_dim, in_dim = shapes[module]
            for which, shape in (("A", [r, in_dim]), ("B", [out_dim, r])):
                name = f"{KEY_PREFIX}{module}.lora_{which}.weight"
                size = shape[0] * shape[1] * itemsize
                header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
                self._expected.append((name, shape))
                offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._digest = hashlib.sha256()
        self._next = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append(len(text).to_bytes(8, "little") + text, mode="wb")

    def _append(self, data: bytes, mode: str = "ab") -> None:
        with open(self.path, mode) as f:
            f.write(data)
        self._digest.update(data)

    def write(self, module: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Append ``module``'s factors; modules must come in the order given to the constructor."""
        for which, tensor in (("A", a), ("B", b)):
            name, shape = self._expected[self._next]
            if name != f"{KEY_PREFIX}{module}.lora_{which}.weight" or list(tensor.shape) != shape:
                raise RuntimeError(
                    f"{self.path}: expected {name} {shape}, got {module}.lora_{which} {list(tensor.shape)}"
                )
            data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
            self._append(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._next += 1

    def close(self) -> str:
        """Check that every tensor was written; return the file's sha256."""
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} tensors were not written")
        return self._digest.hexdigest()


def check_against_base(adapters: list[Adapter], base: ModelShapes) -> None:
    """Check that every adapted module exists in the base with the shape its factors imply.

    ``base`` comes from the base's safetensors headers (``sources.model_shapes``): no weight is read.
    """
    shapes = base.shapes
    for adapter in adapters:
        for name, spec in adapter.modules.items():
            expected = (
                [spec.in_features, spec.out_features]
                if adapter.fan_in_fan_out
                else [spec.out_features, spec.in_features]
            )
            # Adapters trained on a task head (e.g. BertForSequenceClassification) carry a prefix
            # ("bert.") that a bare base checkpoint lacks, and the reverse: match on the name's tail.
            found = [
                key
                for key in shapes
                if key.endswith(".weight")
                and (
                    key[: -len(".weight")] == name
                    or name.endswith("." + key[: -len(".weight")])
                    or key[: -len(".weight")].endswith("." + name)
                )
            ]
            if not found:
                raise AdapterError(
                    f"module {name} does not exist in the base model",
                    where=adapter.where,
                    hint=f"this adapter was trained on another model than {base.where}",
                )
            if all(shapes[key] != expected for key in found):
                raise AdapterError(
                    f"module {name}: the factors imply a weight of shape {expected}, the base has {shapes[found[0]]}",
                    where=adapter.where,
                    hint=f"this adapter was trained on another model than {base.where}",
                )
