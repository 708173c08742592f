"""Task vectors as per-module LoRA factors or dense checkpoint deltas, and the grouping of modules.

Granularity decides which modules share one similarity (and so one weight matrix):
``model`` (all modules together, FedBip), ``block`` (one transformer block, FedBip-L) or ``module``.
A full checkpoint's task vector is ΔW = W − W_base for every floating tensor; its tensors are grouped
by the module that owns them (``encoder.layer.0.output.dense`` for its ``.weight`` and ``.bias``).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fedbip_cli.adapters import Adapter, FactorReader, read_module, scaled_factors
from fedbip_cli.checkpoints import Checkpoint
from fedbip_cli.defaults import GRANULARITIES
from fedbip_cli.errors import UsageError

MODEL_GROUP = "model"

# The index of a transformer block in a module path: encoder.layer.3, model.layers.12, transformer.h.0, blocks.7
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?=\.|$)")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def block_of(module: str) -> str:
    """The block a module belongs to (its path up to the block index), or the module itself."""
    match = _BLOCK_RE.search(module)
    return module[: match.end(1)].lstrip(".") if match else module


def in_block(module: str) -> bool:
    """Whether ``module`` lies inside a numbered transformer block (the head and embeddings do not)."""
    return _BLOCK_RE.search(module) is not None


def tensor_module(name: str) -> str:
    """The module a checkpoint tensor belongs to: its name without the last part (``.weight``, ``.bias``)."""
    return name.rsplit(".", 1)[0]


def group_modules(
    modules: Iterable[str], granularity: str, *, module_of: Callable[[str], str] | None = None
) -> dict[str, list[str]]:
    """Group names by ``granularity``; groups and their members in natural order.

    ``module_of`` maps a name to the module it belongs to (``tensor_module`` for checkpoint tensors);
    by default every name is a module of its own.
    """
    if granularity not in GRANULARITIES:
        raise UsageError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    ordered = sorted(set(modules), key=natural_key)
    if granularity == "model":
        return {MODEL_GROUP: ordered}
    groups: dict[str, list[str]] = {}
    for name in ordered:
        module = module_of(name) if module_of is not None else name
        key = module if granularity == "module" else block_of(module)
        groups.setdefault(key, []).append(name)
    return dict(sorted(groups.items(), key=lambda item: natural_key(item[0])))


def all_modules(adapters: Sequence[Adapter]) -> list[str]:
    """The union of every adapter's modules (a module an adapter lacks is a zero delta for it)."""
    return sorted({m for a in adapters for m in a.modules}, key=natural_key)


def module_factors(
    adapters: Sequence[Adapter],
    module: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    reader: FactorReader | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each adapter's ``(scale · B, A)`` at ``module``, or None where the adapter does not target it.

    ``reader`` serves the factors (pass one per run: it remembers where each file keeps them).
    Raises AdapterError when a tensor holds NaN or Inf.
    """
    stored = read_module(adapters, module, reader or FactorReader())
    return [
        None if pair is None else scaled_factors(*pair, adapter.modules[module].scale, dtype=dtype, device=device)
        for adapter, pair in zip(adapters, stored)
    ]


def checkpoint_deltas(
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint,
    tensor: str,
    rows: slice | None = None,
    *,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's ``tensor`` (``rows`` of it) and every checkpoint's W − W_base there, in float64 on ``device``.

    Returns:
        ``(base, deltas)``: the base rows, and a (K, *rows shape) stack of the deltas.
    """
    weights = base.read(tensor, rows).to(device=device, dtype=torch.float64)
    deltas = torch.stack([c.read(tensor, rows).to(device=device, dtype=torch.float64) - weights for c in checkpoints])
    return weights, deltas


@dataclass(frozen=True)
class KeyedFactors:
    """One client's stored ``(B, A)`` at one module (float64, unscaled), its scale, and the key of
    what they came from."""

    key: bytes
    b: torch.Tensor
    a: torch.Tensor
    scale: float


def content_key(b: torch.Tensor, a: torch.Tensor, scale: float, salt: str) -> bytes:
    """sha256 of stored factors (dtype, shape, bytes) and scale, salted with the computing engine.

    Two adapters whose tensors for a module are the same bytes get the same key, however the files
    were written (a re-saved adapter, a copy under another name).
    """
    digest = hashlib.sha256(salt.encode())
    for tensor in (b, a):
        digest.update(f"|{tensor.dtype}{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(struct.pack("<d", scale))
    return digest.digest()


def keyed_module_factors(
    adapters: Sequence[Adapter],
    module: str,
    *,
    salt: str,
    device: torch.device | str = "cpu",
    hashed: bool = True,
    reader: FactorReader | None = None,
) -> list[KeyedFactors | None]:
    """Each adapter's factors at ``module`` with their content key, or None where it does not target it.

    With ``hashed=False`` the key comes from the adapter file's sha256 (already known) and the module
    instead of the tensors' bytes: for runs without a cache, where keys only order the clients and
    merge identical files.
    """
    keyed: list[KeyedFactors | None] = []
    for adapter, stored in zip(adapters, read_module(adapters, module, reader or FactorReader())):
        if stored is None:
            keyed.append(None)
            continue
        b, a = stored
        scale = adapter.modules[module].scale
        if hashed:
            key = content_key(b, a, scale, salt)
        else:
            key = hashlib.sha256(f"{adapter.sha256}|{module}|{scale!r}".encode()).digest()
        keyed.append(
            KeyedFactors(key, b.to(device=device, dtype=torch.float64), a.to(device=device, dtype=torch.float64), scale)
        )
    return keyed
