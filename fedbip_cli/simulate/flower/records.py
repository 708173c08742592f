"""What travels in Flower messages: states as ``ArrayRecord``s, the run's options as a ``ConfigRecord``.

Every value is a plain type Flower serialises exactly: float32 tensors go as their bytes (so a state
arrives bit for bit), the ``SimulationConfig`` as one JSON string, so that a client trains with the
very options of the server's run.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, fields
from typing import Any

from flwr.app import ArrayRecord

from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.loop import SimulationConfig, config_from_dict
from fedbip_cli.simulate.strategies import State

# Keys of the records in a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"


def to_record(state: State) -> ArrayRecord:
    """A trainable state as an ArrayRecord (names kept, tensors copied as bytes)."""
    return ArrayRecord(OrderedDict((name, tensor.detach().cpu()) for name, tensor in state.items()))


def from_record(record: ArrayRecord) -> State:
    """The state an ArrayRecord carries, as float32 CPU tensors."""
    return dict(record.to_torch_state_dict())


def config_to_json(config: SimulationConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def config_from_json(text: str) -> SimulationConfig:
    """The SimulationConfig a server sent (tuples arrive as JSON lists)."""
    return config_from_dict(json.loads(text))


# Run-config keys (Flower's --run-config, [tool.flwr.app.config]) are the options' names with
# hyphens. TOML has no null: in an option that may be None, "" (text) or 0 (a number) stands for it.
_NONE_WHEN = {f.name: "" if "str" in str(f.type) else 0 for f in fields(SimulationConfig) if "None" in str(f.type)}
_TUPLES = {"strategies", "target_modules"}


def config_from_run_config(run_config: dict[str, Any]) -> SimulationConfig:
    """A SimulationConfig from a Flower run config: ``strategies=fedbip,fedavg``, ``local-steps=4``, ...

    Keys that are not options (such as ``out``) are ignored; options that are absent keep their default.
    """
    names = {f.name for f in fields(SimulationConfig)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in names:
            continue
        if name in _TUPLES:
            value = tuple(part.strip() for part in str(value).split(",") if part.strip())
        elif name in _NONE_WHEN and value == _NONE_WHEN[name]:
            value = None
        values[name] = value
    try:
        return SimulationConfig(**values)
    except TypeError as exc:  # a value of the wrong type that the dataclass cannot take
        raise UsageError(f"bad Flower run config: {exc}") from None


def run_config_from(config: SimulationConfig) -> dict[str, Any]:
    """The Flower run config that ``config_from_run_config`` reads back as ``config``."""
    values: dict[str, Any] = {}
    for name, value in asdict(config).items():
        if name in _TUPLES:
            value = ",".join(value)
        elif value is None:
            value = _NONE_WHEN[name]
        values[name.replace("_", "-")] = value
    return values
