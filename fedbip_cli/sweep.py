"""``merge --sweep KEY=V1,V2,...``: the settings of one sweep, each a named ``MergeOptions``.

Each ``--sweep`` names one option and its values; several ``--sweep`` options give every combination
(their Cartesian product, in the order given). A setting overrides the merge's other options (from the
command line or the config file) and is named ``key=value`` joined by ``,`` in the order of the
``--sweep`` options, e.g. ``temperature=0.5,top-k=2``: its output set goes into ``OUT/<name>/``. A sweep
varies how similarities become weights and how the merge is written, never the similarity itself, so
one similarity computation serves every setting.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from fedbip_cli.defaults import MAX_TEMPERATURE, MIN_TEMPERATURE
from fedbip_cli.errors import UsageError
from fedbip_cli.options import MergeOptions

# key -> (the parser of one value, the MergeOptions field, or the WeightOptions field as "weights.<name>")
_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "weighting": (str, "weights.weighting"),
    "negative": (str, "weights.negative"),
    "temperature": (float, "weights.temperature"),
    "top-k": (int, "weights.top_k"),
    "combine": (str, "combine"),
    "rank": (int, "rank"),
}
SWEEP_KEYS = tuple(_KEYS)


def parse_sweep(entries: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["temperature=0.5,1", "top-k=2,3"]`` -> [("temperature", ["0.5", "1"]), ("top-k", ["2", "3"])], checked."""
    parsed: list[tuple[str, list[str]]] = []
    for entry in entries:
        key, equals, values = entry.partition("=")
        key = key.strip()
        if not equals or key not in _KEYS:
            raise UsageError(
                f"--sweep {entry!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}",
                hint="for example --sweep temperature=0.5,1,2 --sweep top-k=2,3",
            )
        if any(k == key for k, _ in parsed):
            raise UsageError(f"--sweep {key} is given twice", hint="list all its values in one --sweep")
        texts = [v.strip() for v in values.split(",")]
        if not all(texts) or len(set(texts)) != len(texts):
            raise UsageError(f"--sweep {entry!r}: every value once, none empty")
        parsed.append((key, texts))
    return parsed


def sweep_settings(base: MergeOptions, entries: Sequence[str]) -> list[tuple[str, MergeOptions]]:
    """Every combination of the ``--sweep`` values of ``entries`` applied to ``base``, with its name."""
    parsed = parse_sweep(entries)
    settings = []
    for combination in itertools.product(*[[(key, text) for text in values] for key, values in parsed]):
        name = ",".join(f"{key}={text}" for key, text in combination)
        settings.append((name, _apply(base, combination, name)))
    return settings


def _apply(base: MergeOptions, combination: Sequence[tuple[str, str]], name: str) -> MergeOptions:
    """``base`` with each (key, value text) of ``combination`` set; options are checked by their own types."""
    options, weights = {}, {}
    for key, text in combination:
        parse, field = _KEYS[key]
        try:
            value = parse(text)
        except ValueError:
            raise UsageError(f"--sweep {key}: {text!r} is not a{'n integer' if parse is int else ' number'}") from None
        if key == "temperature" and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:  # --temperature's own bounds
            raise UsageError(f"--sweep temperature: {text} is outside {MIN_TEMPERATURE:g} - {MAX_TEMPERATURE:g}")
        if field.startswith("weights."):
            weights[field.removeprefix("weights.")] = value
        else:
            options[field] = value
    try:
        return replace(base, weights=replace(base.weights, **weights), **options)
    except UsageError as exc:
        raise UsageError(f"sweep setting {name}: {exc.message}", hint=exc.hint) from None
