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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedbip_cli.boundedio import parse_json, read_json
from fedbip_cli.errors import AdapterError
from fedbip_cli.outdir import finite
from fedbip_cli.sources import ModelShapes, ResolvedSource

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 4 * 2**20  # peft writes a few KB; a rank_pattern for every module of a 70B model is ~40 KB
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SUPPORTED = (
    "supported: peft LoRA adapters (peft_type LORA) saved as adapter_model.safetensors, on linear, Conv1D and "
    "embedding layers, with rsLoRA, rank/alpha patterns, DoRA, lora_bias, bias='lora_only'/'all' and modules_to_save"
)

# Stored tensor names, relative to the key prefix: a linear LoRA's factors, an embedding LoRA's
# factors, a DoRA magnitude, a LoRA bias, and a trained base bias of an adapted layer (bias="lora_only").
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_EMBEDDING_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])$")
_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector$")
_LORA_BIAS_RE = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")
_BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>\w+)$")
# Tensor names that mark a kind of adapter fedbip refuses, with what to tell the user.
_UNSUPPORTED_TENSORS = (
    ("trainable_tokens", "trainable token adapters (trainable_token_indices) are not supported"),
    ("lora_embedding_magnitude", "DoRA on embedding layers is not supported"),
)
# init_lora_weights values whose adapters are deltas relative to a modified base (the base's weights
# were replaced by a residual at initialisation): their s·B·A alone is not the task vector.
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq")
CONVERT_HINT = (
    "convert it to a plain LoRA of the unmodified base with peft: model.save_pretrained(dir, "
    "path_initial_model_for_weight_conversion=<the adapter as initialised, saved before training>)"
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: ΔW = scale · B @ A, with B of shape (out, r) and A of shape (r, in).

    An embedding LoRA (``embedding``) stores its factors as ``lora_embedding_B`` (dim, r) and
    ``lora_embedding_A`` (r, vocab); the embedding weight (vocab, dim) changes by (scale · B @ A)ᵀ.
    """

    name: str
    rank: int
    scale: float
    out_features: int
    in_features: int
    dtype: torch.dtype
    embedding: bool = False

    def keys(self, prefix: str = KEY_PREFIX) -> tuple[str, str]:
        """The stored names of A and B."""
        if self.embedding:
            return f"{prefix}{self.name}.lora_embedding_A", f"{prefix}{self.name}.lora_embedding_B"
        return f"{prefix}{self.name}.lora_A.weight", f"{prefix}{self.name}.lora_B.weight"


# Kinds of dense part: a task-vector part that is not a low-rank product of stored factors.
DORA = "dora"  # m ⊙ (W + sBA)/‖W + sBA‖_row − W on a linear weight; needs the base weight
SAVED = "saved"  # a modules_to_save tensor: W_saved − W_base (W_base = 0 where the base lacks it)
LORA_BIAS = "lora-bias"  # scale · lora_B.bias, a delta of the adapted layer's bias
BIAS = "bias"  # a trained bias (bias="lora_only"/"all"): b_saved − b_base
NEEDS_BASE = (DORA, SAVED, BIAS)


@dataclass(frozen=True)
class DensePart:
    """A part of a task vector held as a dense delta of one base tensor.

    ``name`` is the part's name (``classifier`` for ``classifier.weight``, ``classifier.bias``: see
    ``part_name``); ``tensor`` the base tensor it changes; ``key`` the stored tensor it is read from
    (a DoRA part: its magnitude; its factors are ``lora``).
    """

    name: str
    kind: str
    tensor: str
    key: str
    shape: tuple[int, ...]
    lora: LoraModule | None = None
    dtype: torch.dtype = torch.float32  # the stored tensor's dtype


def part_name(tensor: str) -> str:
    """The part of a task vector that changes base tensor ``tensor``: its module for a ``.weight``
    (as LoRA names it), else the tensor's name (``classifier.bias``)."""
    return tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor


def part_module(part: str) -> str:
    """The module a part belongs to: ``classifier`` for both ``classifier`` and ``classifier.bias``."""
    return part.rsplit(".", 1)[0] if part.endswith(".bias") else part


@dataclass
class Adapter:
    """A validated adapter whose tensors are read lazily."""

    name: str
    source: ResolvedSource
    config: dict[str, Any]
    fan_in_fan_out: bool
    modules: dict[str, LoraModule]  # the low-rank parts (linear and embedding LoRA), by module
    weights_path: Path
    sha256: str
    dense: dict[str, DensePart] = field(default_factory=dict)  # every other part, by part name
    # Copies of base weights (peft saves the embedding beside an embedding LoRA): base tensor -> key.
    # They carry no task vector; with --base they must equal the base's (``parts.check_copies``).
    base_copies: dict[str, str] = field(default_factory=dict)
    _prefix: str = field(default=KEY_PREFIX, repr=False)

    @property
    def parts(self) -> list[str]:
        """Every part of this client's task vector (low-rank and dense)."""
        return [*self.modules, *self.dense]

    @property
    def base_model(self) -> str | None:
        """The base model named in the config (``base_model_name_or_path``)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def where(self) -> str:
        return str(self.source.path)

    def stored_factors(self, module: str, spec: LoraModule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B, A)`` for ``module`` exactly as stored: unscaled, in the file's dtype, on the CPU.

        ``spec`` names factors that are not a low-rank part of their own (a DoRA part's).
        Raises AdapterError when a tensor holds NaN or Inf.
        """
        a_key, b_key = (spec or self.modules[module]).keys(self._prefix)
        with safe_open(self.weights_path, framework="pt") as f:
            a, b = f.get_tensor(a_key), f.get_tensor(b_key)
        return _finite(self, module, b, a)

    def stored_tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key`` exactly as stored, checked for NaN and Inf."""
        with safe_open(self.weights_path, framework="pt") as f:
            tensor = f.get_tensor(key)
        if not torch.isfinite(tensor).all():
            raise AdapterError(
                f"{key} contains NaN or Inf values",
                where=str(self.weights_path),
                hint="the adapter's training diverged or the file is damaged; re-train or re-save it",
            )
        return tensor

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
        header = parse_json(f.read(size), where=str(adapter.weights_path), error=AdapterError)
    places = {}
    for module, spec in adapter.modules.items():
        entries = [header[key] for key in spec.keys(adapter._prefix)]
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
    if weights.exists() and not weights.is_file():  # a directory, a device, a pipe (which would block safe_open)
        raise AdapterError(f"{WEIGHTS_NAME} is not a regular file", where=str(weights), hint=SUPPORTED)
    if not weights.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise AdapterError(
                f"only pickled weights ({PICKLE_NAME}) found; they are not read because unpickling can run code",
                where=str(directory),
                hint=f"re-save the adapter with safetensors (peft: save_pretrained(..., safe_serialization=True)); {SUPPORTED}",
            )
        raise AdapterError(f"{WEIGHTS_NAME} is missing", where=str(directory), hint=SUPPORTED)
    shapes, dtypes = read_header(weights)
    for key, shape in shapes.items():
        if 0 in shape:
            raise AdapterError(
                f"tensor {key} has shape {shape}: an empty dimension", where=str(weights), hint=SUPPORTED
            )
    prefix = KEY_PREFIX if all(k.startswith(KEY_PREFIX) for k in shapes) else ""
    modules, dense, copies = _parse_parts(shapes, dtypes, prefix, config, weights)
    if not modules and not dense:
        raise AdapterError("no LoRA tensors (*.lora_A / *.lora_B) found", where=str(weights), hint=SUPPORTED)
    return Adapter(
        name=source.name,
        source=source,
        config=config,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        modules=modules,
        weights_path=weights,
        sha256=file_sha256(weights),
        dense=dense,
        base_copies=copies,
        _prefix=prefix,
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def declared_base(directory: Path) -> str | None:
    """The base model an adapter directory's config names (``base_model_name_or_path``), if any."""
    name = _read_config(directory / CONFIG_NAME).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterError(
            f"{CONFIG_NAME} is missing",
            where=str(path.parent),
            hint="point at a PEFT adapter directory (as written by save_pretrained)",
        )
    config = read_json(path, error=AdapterError, limit=MAX_CONFIG_BYTES, what=CONFIG_NAME)
    if not isinstance(config, dict):
        raise AdapterError("expected a JSON object", where=str(path), hint="the file must be a PEFT adapter config")
    return config


def _check_config(config: dict[str, Any], path: Path) -> None:
    where = str(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {_short(peft_type)} is not supported", where=where, hint=SUPPORTED)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r}: this adapter is a delta relative to a base whose weights {init} "
            "initialisation replaced, so it is not a task vector of the base model",
            where=where,
            hint=CONVERT_HINT,
        )
    if config.get("bias", "none") not in ("none", "lora_only", "all"):
        raise AdapterError(f"bias {_short(config.get('bias'))}; expected none, lora_only or all", where=where)
    r = config.get("r")
    if not _positive_int(r):
        raise AdapterError(f"lora rank r={_short(r)} in {CONFIG_NAME}; expected a positive integer", where=where)
    if not _alpha(alpha := config.get("lora_alpha", 8)):
        raise AdapterError(f"lora_alpha={_short(alpha)}; expected {_ALPHA_WORDS}", where=where)
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if config.get(key) not in (None, True, False):
            raise AdapterError(f"{key}={_short(config[key])}; expected true or false", where=where)
    for key, accepts, expected in (
        ("rank_pattern", _positive_int, "a positive integer"),
        ("alpha_pattern", _alpha, _ALPHA_WORDS),
    ):
        _check_patterns(key, config.get(key) or {}, accepts, expected, where)
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise AdapterError("modules_to_save must be a list of module names", where=where)


# Bounds on an adapter config's numbers: peft's alphas are in the tens to thousands; 10⁶ leaves room
# and keeps scale · B · A far from float64's overflow for any finite float32 factors.
MAX_ALPHA = 1e6
_ALPHA_WORDS = f"a finite number between -{MAX_ALPHA:g} and {MAX_ALPHA:g}"
MAX_PATTERN_KEY = 1000  # characters of a rank_pattern / alpha_pattern key (a module name or regex)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _alpha(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= MAX_ALPHA
    )


def _check_patterns(key: str, patterns: Any, accepts: Any, expected: str, where: str) -> None:
    """A rank_pattern / alpha_pattern: an object whose keys are regexes (as peft matches them) and
    whose values ``accepts``."""
    if not isinstance(patterns, dict):
        raise AdapterError(f"{key} must be an object mapping module patterns to numbers", where=where)
    for pattern, value in patterns.items():
        if not pattern or len(pattern) > MAX_PATTERN_KEY:
            raise AdapterError(
                f"{key}: a key of {len(pattern)} characters; expected 1 to {MAX_PATTERN_KEY}", where=where
            )
        try:
            re.compile(_pattern_regex(pattern))
        except (re.error, RecursionError, OverflowError) as exc:
            raise AdapterError(
                f"{key}: key {_short(pattern)} is not a valid regular expression ({exc})", where=where
            ) from None
        if not accepts(value):
            raise AdapterError(f"{key}[{_short(pattern)}] = {_short(value)}; expected {expected}", where=where)


def _short(value: Any, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters: a hostile value never floods a message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


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
        if re.match(_pattern_regex(key), module):
            return value
    return default


def _pattern_regex(key: str) -> str:
    """The regex peft matches a pattern key with: the key at the end of the module name, after a dot."""
    return rf"(.*\.)?({key})$"


# The floating dtypes fedbip computes with, by their safetensors names.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _parse_parts(
    shapes: dict[str, list[int]], dtypes: dict[str, str], prefix: str, config: dict[str, Any], path: Path
) -> tuple[dict[str, LoraModule], dict[str, DensePart], dict[str, str]]:
    """Every part of an adapter from its header: low-rank modules, dense parts by part name, and the
    copies of base weights peft saves beside an embedding LoRA (base tensor -> stored key).

    Each stored tensor is claimed by exactly one rule below; one that none claims is an error.
    """
    where = str(path)
    factors: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    magnitudes: dict[str, str] = {}
    lora_biases: dict[str, str] = {}
    plain: dict[str, str] = {}  # saved module tensors and trained biases: base tensor -> stored key
    copies: dict[str, str] = {}  # copies of base weights: base tensor -> stored key
    for key in shapes:
        for marker, problem in _UNSUPPORTED_TENSORS:
            if marker in key:
                raise AdapterError(f"{problem} (tensor {key})", where=where, hint=SUPPORTED)
        name = key[len(prefix) :]
        if match := _FACTOR_RE.match(name) or _EMBEDDING_RE.match(name):
            factors.setdefault(match["module"], {})[match["which"]] = key
            if "embedding" in key:
                embedding.add(match["module"])
        elif match := _MAGNITUDE_RE.match(name):
            magnitudes[match["module"]] = key
        elif match := _LORA_BIAS_RE.match(name):
            lora_biases[match["module"]] = key
        elif "lora_" in name:
            raise AdapterError(f"unexpected tensor {key}", where=where, hint=SUPPORTED)
        elif (match := _BASE_LAYER_RE.match(name)) and match["param"] != "bias":
            copies[f"{match['module']}.{match['param']}"] = key  # peft's save_embedding_layers copy
        else:
            plain[f"{match['module']}.{match['param']}" if match else name] = key
    if magnitudes and not config.get("use_dora"):
        raise AdapterError(
            f"DoRA magnitude tensor {next(iter(magnitudes.values()))} but use_dora is not true in {CONFIG_NAME}",
            where=where,
            hint="the config and the weights do not belong together",
        )
    if config.get("use_dora") and factors and not magnitudes:
        raise AdapterError(
            f"use_dora is true in {CONFIG_NAME} but the weights hold no DoRA magnitude (lora_magnitude_vector)",
            where=where,
            hint="the config and the weights do not belong together",
        )
    if lora_biases and not config.get("lora_bias"):
        raise AdapterError(
            f"LoRA bias tensor {next(iter(lora_biases.values()))} but lora_bias is not true in {CONFIG_NAME}",
            where=where,
            hint="the config and the weights do not belong together",
        )
    modules = {
        name: _lora_module(name, pair, name in embedding, shapes, dtypes, config, where)
        for name, pair in sorted(factors.items())
    }
    dense: dict[str, DensePart] = {}
    for module, key in magnitudes.items():
        spec = modules.pop(module, None)
        if spec is None or spec.embedding:
            raise AdapterError(
                f"DoRA magnitude {key} has no linear lora_A/lora_B beside it", where=where, hint=SUPPORTED
            )
        shape = (
            (spec.in_features, spec.out_features)
            if config.get("fan_in_fan_out")
            else (spec.out_features, spec.in_features)
        )
        dense[module] = DensePart(module, DORA, f"{module}.weight", key, shape, spec)
    for module, key in lora_biases.items():
        spec = modules.get(module) or (dense[module].lora if module in dense else None)
        if spec is None:
            raise AdapterError(f"LoRA bias {key} has no lora_A/lora_B beside it", where=where, hint=SUPPORTED)
        dense[f"{module}.bias"] = DensePart(
            f"{module}.bias", LORA_BIAS, f"{module}.bias", key, tuple(shapes[key]), spec
        )
    saved = config.get("modules_to_save") or []
    for tensor, key in plain.items():
        module, param = tensor.rsplit(".", 1) if "." in tensor else ("", tensor)
        if any(module == m or module.endswith("." + m) for m in saved):
            kind = SAVED
        elif param == "bias" and config.get("bias", "none") != "none":
            kind = BIAS
        else:
            raise AdapterError(f"unexpected tensor {key}", where=where, hint=SUPPORTED)
        if dtypes[key] not in FLOAT_DTYPES:
            raise AdapterError(
                f"{key}: unsupported dtype {dtypes[key]}", where=where, hint="use floating-point weights"
            )
        part = part_name(tensor)
        if part in dense or part in modules:
            raise AdapterError(f"{tensor} is both a LoRA module and a saved tensor", where=where, hint=SUPPORTED)
        dense[part] = DensePart(part, kind, tensor, key, tuple(shapes[key]), dtype=FLOAT_DTYPES[dtypes[key]])
    return modules, dict(sorted(dense.items())), copies


def _lora_module(
    name: str,
    pair: dict[str, str],
    embedding: bool,
    shapes: dict[str, list[int]],
    dtypes: dict[str, str],
    config: dict[str, Any],
    where: str,
) -> LoraModule:
    """A module's low-rank part from its two stored factors, checked against each other and the config."""
    if set(pair) != {"A", "B"}:
        missing = "B" if "A" in pair else "A"
        raise AdapterError(
            f"{name} has no lora_{missing}", where=where, hint="the adapter file is incomplete; re-save it"
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
    expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if expected != rank:
        raise AdapterError(
            f"{name}: tensors have rank {rank} but {CONFIG_NAME} gives r={expected} for this module",
            where=where,
            hint="the config and the weights do not belong together",
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    dtype_name = dtypes[pair["A"]]
    if dtype_name not in FLOAT_DTYPES or dtypes[pair["B"]] not in FLOAT_DTYPES:
        raise AdapterError(
            f"{name}: unsupported dtype {dtype_name}", where=where, hint="use float32, float16 or bfloat16 weights"
        )
    return LoraModule(name, rank, float(scale), b_shape[0], a_shape[1], FLOAT_DTYPES[dtype_name], embedding)


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
        for key, factor in ((f"{KEY_PREFIX}{name}.lora_A.weight", a), (f"{KEY_PREFIX}{name}.lora_B.weight", b)):
            tensors[key] = finite(factor.to(dtype=dtype, device="cpu").contiguous(), key, directory.name)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


_DTYPE_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def lora_entries(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """The stored names and shapes of linear LoRA factors: each module's A (r, in) then B (out, r)."""
    entries: dict[str, list[int]] = {}
    for module, r in ranks.items():
        out_dim, in_dim = shapes[module]
        entries[f"{KEY_PREFIX}{module}.lora_A.weight"] = [r, in_dim]
        entries[f"{KEY_PREFIX}{module}.lora_B.weight"] = [out_dim, r]
    return entries


class StreamingAdapterWriter:
    """Writes a merged adapter's safetensors file tensor by tensor, so that a merge holds one module's
    outputs at a time instead of every client's whole adapter.

    The header (names, shapes, offsets) is written first from ``entries`` (name -> shape), known
    before the merge; the data follow in that order, appended as they are computed and hashed on the
    way. safetensors readers take tensors in any order of the data section.
    """

    def __init__(
        self,
        path: Path,
        entries: dict[str, list[int]],
        dtype: torch.dtype,
        dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        """``dtypes`` names the entries kept in another dtype than ``dtype`` (a client's own head, as stored)."""
        self.path = path
        self.dtype = dtype
        self._dtypes = dtypes or {}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._expected = list(entries.items())
        offset = 0
        for name, shape in self._expected:
            kind = self._dtypes.get(name, dtype)
            size = math.prod(shape) * torch.empty(0, dtype=kind).element_size()
            header[name] = {"dtype": _DTYPE_CODES[kind], "shape": shape, "data_offsets": [offset, offset + size]}
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

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``; tensors must come in the order of the entries."""
        expected, shape = self._expected[self._next] if self._next < len(self._expected) else (None, None)
        if name != expected or list(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: expected {expected} {shape}, got {name} {list(tensor.shape)}")
        kind = self._dtypes.get(name, self.dtype)
        data = finite(tensor.detach().to(device="cpu", dtype=kind).contiguous(), name, self.path.parent.name)
        self._append(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def write(self, module: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Append ``module``'s LoRA factors (linear or embedding, as the entries name them): A then B."""
        embedding = self._next < len(self._expected) and self._expected[self._next][0].endswith(".lora_embedding_A")
        a_key, b_key = LoraModule(module, 0, 1.0, 0, 0, self.dtype, embedding).keys()
        self.write_tensor(a_key, a)
        self.write_tensor(b_key, b)

    def close(self) -> str:
        """Check that every tensor was written; return the file's sha256."""
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} tensors were not written")
        return self._digest.hexdigest()


def base_keys(tensor: str, names: Iterable[str]) -> list[str]:
    """The base tensors that ``tensor`` (an adapter's name for it) may be, exact match first.

    Adapters trained on a task head (e.g. BertForSequenceClassification) carry a prefix ("bert.")
    that a bare base checkpoint lacks, and the reverse: names match on their tails.
    """
    exact = [key for key in names if key == tensor]
    return exact or [key for key in names if tensor.endswith("." + key) or key.endswith("." + tensor)]


def weight_shape(spec: LoraModule, fan_in_fan_out: bool) -> list[int]:
    """The shape of the base weight a LoRA module's factors imply (embeddings and Conv1D are (in, out))."""
    transposed = fan_in_fan_out or spec.embedding
    return [spec.in_features, spec.out_features] if transposed else [spec.out_features, spec.in_features]


def check_against_base(adapters: list[Adapter], base: ModelShapes) -> None:
    """Check that every part's tensor exists in the base with the shape the adapter implies.

    A saved module (``modules_to_save``) that the base lacks is allowed: a task head that the model
    class initialises afresh; its delta is taken against zero (see ``parts``). ``base`` comes from the
    base's safetensors headers (``sources.model_shapes``): no weight is read.
    """
    shapes = base.shapes
    hint = f"this adapter was trained on another model than {base.where}"
    for adapter in adapters:
        # tensor -> (what the message calls it, its shape as the adapter implies it)
        expected = {
            f"{n}.weight": (f"module {n}", "the factors imply a weight", weight_shape(m, adapter.fan_in_fan_out))
            for n, m in adapter.modules.items()
        }
        expected |= {
            d.tensor: (f"{d.tensor}", "the adapter implies a tensor", list(d.shape)) for d in adapter.dense.values()
        }
        for tensor, (what, implied, shape) in expected.items():
            found = base_keys(tensor, shapes)
            if not found:
                if (
                    adapter.dense.get(part_name(tensor), None) is not None
                    and adapter.dense[part_name(tensor)].kind == SAVED
                ):
                    continue
                raise AdapterError(f"{what} does not exist in the base model", where=adapter.where, hint=hint)
            if all(shapes[key] != shape for key in found):
                raise AdapterError(
                    f"{what}: {implied} of shape {shape}, the base has {shapes[found[0]]}",
                    where=adapter.where,
                    hint=hint,
                )
