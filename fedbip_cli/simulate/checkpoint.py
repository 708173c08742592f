"""One strategy's checkpoint: written atomically after every round, checked in full before a resume.

A checkpoint is one safetensors file: the server's personalized states θ̄ (``bar/<client>/<tensor>``)
its memory of updates (``memory/<client>/<tensor>``) and a method's server state
(``server/<name>/<tensor>``, ``methods``: checked against the method's initial server state, so
that a server state need not be model-sized, as FedMerge's W is not), with the round, the options,
the metrics, the similarity records, the timings and the per-round timings as JSON in the header, and a SHA-256 over that JSON and
every tensor's name, dtype, shape and bytes. A resume trusts nothing in it: the checksum catches a
flipped bit, and every field is checked for its type and range, every client and tensor against the
run's own, before any of it is used. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedbip_cli.errors import AdapterError, UsageError

State = dict[str, torch.Tensor]

META_KEY = "fedbip_checkpoint"
DIGEST_KEY = "sha256"
_HINT = "resume needs the checkpoint as fedbip wrote it; start afresh with --overwrite"


@dataclass
class StrategyRun:
    """One strategy's state, checkpointed after every round."""

    strategy: str
    round: int = 0
    bar: dict[str, State] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    similarity: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "eval": 0.0, "server": 0.0})
    memory: dict[str, State] = field(default_factory=dict)  # the server's EMA of each client's updates
    # A method's server state beyond the personalized θ̄, by name (``methods``; FedOA's global adapter).
    server: dict[str, State] = field(default_factory=dict)
    # Per round: {"round", "server_seconds", "client_seconds": {client: seconds}} (the cost of each round).
    timings: list[dict[str, Any]] = field(default_factory=list)
    # The model each client chose to keep (--select-on-validation, ``selection``); a client absent here
    # keeps the merged θ̄ the server sent it.
    own: dict[str, State] = field(default_factory=dict)

    def personal(self, client: str) -> State:
        """The model ``client`` trains from and is tested with: its own choice, else its θ̄."""
        return self.own.get(client, self.bar[client])


def _digest(meta: str, flat: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the header JSON and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(meta.encode("utf-8"))
    for key in sorted(flat):
        tensor = flat[key].contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save(path: Path, run: StrategyRun, config: dict[str, Any]) -> None:
    """Write ``run`` (and the options ``config``) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Clients that have not yet received an update share the initial tensors, and safetensors
    # refuses tensors that share memory: save a copy of each.
    flat = {
        f"{kind}/{client}/{name}": t.clone(memory_format=torch.contiguous_format)
        for kind, states in (("bar", run.bar), ("memory", run.memory), ("own", run.own), ("server", run.server))
        for client, state in states.items()
        for name, t in state.items()
    }
    meta = json.dumps(
        {
            "config": config,
            "strategy": run.strategy,
            "round": run.round,
            "metrics": run.metrics,
            "similarity": run.similarity,
            "seconds": run.seconds,
            "timings": run.timings,
        }
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(flat, str(tmp), metadata={META_KEY: meta, DIGEST_KEY: _digest(meta, flat)})
        os.replace(tmp, path)
    except BaseException:
        if not tmp.is_dir():
            tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves no partial file
        raise


def present(path: Path) -> bool:
    """Whether a checkpoint is at ``path`` (False: the strategy has not started).

    Raises:
        AdapterError: something other than a regular file is there (a directory, a link to a device):
            never silently taken for "not started", never read.
    """
    if not (path.exists() or path.is_symlink()):
        return False
    if path.is_symlink() or not path.is_file():
        kind = "a link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
        raise _fail(path, f"is {kind}, not a file fedbip wrote")
    return True


def _fail(path: Path, message: str) -> AdapterError:
    return AdapterError(f"checkpoint {message}", where=str(path), hint=_HINT)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _without_strategies(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "strategies"}


def _check_meta(
    path: Path, meta: object, strategy: str, config: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise _fail(path, f"header is {type(meta).__name__}; expected a JSON object")
    expected = {"config", "strategy", "round", "metrics", "similarity", "seconds", "timings"}
    meta.setdefault("timings", [])  # checkpoints written before per-round timings were kept
    if meta.keys() != expected:
        raise _fail(path, f"header keys {sorted(meta)}; expected {sorted(expected)}")
    # A strategy's rounds do not depend on which other strategies are compared beside it, so its
    # checkpoint resumes under any --compare list that names it; an option added since the checkpoint
    # was written took its default then.
    saved = {**defaults, **meta["config"]} if isinstance(meta["config"], dict) else None
    if saved is None or _without_strategies(saved) != _without_strategies(config):
        raise UsageError(
            "the checkpoint was written with other options",
            where=str(path),
            hint="resume with the same options, or start afresh with --overwrite",
        )
    if meta["strategy"] != strategy:
        raise _fail(path, f"is of strategy {meta['strategy']!r}; expected {strategy!r}")
    rounds = config["rounds"]
    if not _is_int(meta["round"]) or not 0 <= meta["round"] <= rounds:
        raise _fail(path, f"round {meta['round']!r}; expected an integer in 0..{rounds}")
    for key in ("metrics", "similarity", "timings"):
        if not isinstance(meta[key], list) or not all(isinstance(row, dict) for row in meta[key]):
            raise _fail(path, f"'{key}' is not a list of objects")
    seconds = meta["seconds"]
    if not isinstance(seconds, dict) or not all(_is_number(v) and v >= 0 for v in seconds.values()):
        raise _fail(path, "'seconds' is not an object of non-negative numbers")
    return meta


def _states(
    path: Path, flat: dict[str, torch.Tensor], clients: list[str], reference: State, server: dict[str, State]
) -> tuple[dict[str, State], dict[str, State], dict[str, State], dict[str, State]]:
    """Split the file's tensors into θ̄, memory and own choice per client, each checked against ``reference``,
    and a method's server states by name, each checked against ``server`` (its initial state)."""
    states: dict[str, dict[str, State]] = {"bar": {}, "memory": {}, "own": {}, "server": {}}
    for key, tensor in flat.items():
        kind, _, rest = key.partition("/")
        client, _, name = rest.partition("/")
        if kind not in states:
            raise _fail(path, f"tensor {key!r} is none of bar/, memory/, own/ and server/")
        if kind != "server" and client not in clients:
            raise _fail(path, f"tensor {key!r} names an unknown client {client!r}")
        expected = server.get(client, {}) if kind == "server" else reference
        if name not in expected:
            what = "a server tensor of this strategy" if kind == "server" else "a trainable tensor of this model"
            raise _fail(path, f"tensor {key!r} is not {what}")
        if tensor.dtype != expected[name].dtype or tensor.shape != expected[name].shape:
            raise _fail(
                path,
                f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}; "
                f"expected {expected[name].dtype} {tuple(expected[name].shape)}",
            )
        if not torch.isfinite(tensor).all():
            raise _fail(path, f"tensor {key!r} holds NaN or Inf")
        states[kind].setdefault(client, {})[name] = tensor
    for kind, by_client in states.items():
        for client, state in by_client.items():
            expected = server[client] if kind == "server" else reference
            if state.keys() != expected.keys():
                raise _fail(path, f"{kind} of {client} lacks {sorted(expected.keys() - state.keys())[:3]}")
    if sorted(states["bar"]) != sorted(clients):
        raise _fail(path, f"holds states of {len(states['bar'])} clients; expected {len(clients)}")
    if states["server"].keys() != server.keys():
        raise _fail(path, f"holds server state {sorted(states['server'])}; expected {sorted(server)}")
    # The file lists tensors by name; give them back in the model's order, in which a run that was
    # not interrupted holds them, so that every sum over tensors adds in the same order.
    ordered = {
        kind: {c: {name: by_client[c][name] for name in reference} for c in clients if c in by_client}
        for kind, by_client in states.items()
    }
    kept = {key: {name: states["server"][key][name] for name in state} for key, state in server.items()}
    return ordered["bar"], ordered["memory"], ordered["own"], kept


def load(
    path: Path,
    strategy: str,
    config: dict[str, Any],
    clients: list[str],
    reference: State,
    server: dict[str, State] | None = None,
    defaults: dict[str, Any] | None = None,
) -> StrategyRun:
    """The run saved in ``path``, after checking it against the run it would continue.

    Args:
        path: the checkpoint file.
        strategy: the strategy it must hold.
        config: the run's options as JSON values (the file must hold the same).
        clients: the run's clients; every one must have a state, no other may appear.
        reference: the model's trainable tensors (names, dtypes, shapes).
        server: the strategy's initial server state (``methods``; names, dtypes, shapes), none by default.
        defaults: every option's default, which an option the file lacks (one added since it was
            written) is taken to have had.

    Raises:
        AdapterError: naming ``path``, for an unreadable, damaged (checksum) or inconsistent file.
        UsageError: when it was written with other options.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            flat = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors reports a damaged file with several exception types
        raise _fail(path, f"is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(header.get(META_KEY), str) or not isinstance(header.get(DIGEST_KEY), str):
        raise _fail(path, f"header lacks {META_KEY} or {DIGEST_KEY}")
    if _digest(header[META_KEY], flat) != header[DIGEST_KEY]:
        raise _fail(path, "checksum does not match its contents: the file was changed or damaged")
    try:
        meta = json.loads(header[META_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise _fail(path, "header is not valid JSON") from None
    meta = _check_meta(path, meta, strategy, config, defaults or {})
    bar, memory, own, kept = _states(path, flat, clients, reference, server or {})
    run = StrategyRun(strategy, meta["round"], bar, meta["metrics"], meta["similarity"], meta["seconds"], memory)
    run.server, run.timings, run.own = kept, meta["timings"], own
    return run
