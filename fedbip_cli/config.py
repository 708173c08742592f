"""``fedbip merge --config FILE``: the SOURCES and every merge option in one TOML or YAML file.

A file named ``*.yaml`` / ``*.yml`` is YAML, any other TOML; both hold the same keys, checked the
same way. A config file is checked whole before anything is resolved or read: an unknown key, a
value of the wrong type or a bad value is a ``UsageError`` that names the file, the key and the
value. Relative paths in it (sources, out, base, lock, cache) are taken from the file's directory,
so a pipeline can run it from anywhere, and may not leave that directory (``..``, absolute paths,
links; ``~`` is not expanded): a path elsewhere is given on the command line. Options given on the command line override the file; the
file overrides the defaults, which live in ``MergeOptions`` / ``WeightOptions`` and here, nowhere
else.

Example (TOML; in YAML ``key: value``)::

    sources = ["hf://acme/support-adapters", "adapters/"]
    out = "merged"
    layerwise = true
    top_k = 3
    lock = "fedbip.lock"
"""

from __future__ import annotations

import difflib
import json
import os
import reprlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fedbip_cli.boundedio import MAX_DEPTH, check_depth, read_text
from fedbip_cli.defaults import MAX_TEMPERATURE, MIN_TEMPERATURE
from fedbip_cli.errors import UsageError
from fedbip_cli.innercache import default_cache_dir
from fedbip_cli.pipeline import MergeOptions
from fedbip_cli.sketch import SimilarityMethod
from fedbip_cli.sources import HUB_PREFIX
from fedbip_cli.weights import WeightOptions


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Every key a config file may hold: the check of its TOML type, and that type in words.
KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sources": (
        lambda v: isinstance(v, list) and all(map(_text, v)),
        'a list of non-empty strings, e.g. ["adapters/"]',
    ),
    "out": (_text, "a directory (string)"),
    "base": (_text, "a model directory or hf:// reference (string)"),
    "layerwise": (_flag, "true or false"),
    "granularity": (_text, "a string"),
    "weighting": (_text, "a string"),
    "negative": (_text, "a string"),
    "temperature": (_number, "a number"),
    "top_k": (_integer, "an integer"),
    "combine": (_text, "a string"),
    "rank": (_integer, "an integer"),
    "dtype": (_text, 'a string ("auto", "float32", "float16" or "bfloat16")'),
    "heads": (_text, 'a string ("merge", "own" or "exclude")'),
    "clip_norm": (_text, 'a string ("auto", a multiple of the median norm such as "1.5x", or a number)'),
    "to_lora": (_integer, "an integer (full checkpoints: the rank of the adapters written)"),
    "max_shard_size": (_text, 'a size (string), e.g. "5GB"'),
    "device": (_text, "a string"),
    "similarity": (_text, 'a string ("exact" or "sketch")'),
    "sketch_dim": (_integer, 'an integer (with similarity = "sketch")'),
    "sketch_seed": (_integer, 'an integer (with similarity = "sketch")'),
    "overwrite": (_flag, "true or false"),
    "lock": (_text, "a file (string)"),
    "locked": (_flag, "true or false"),
    "cache": (lambda v: _flag(v) or _text(v), "a directory (string), true (the default directory) or false (no cache)"),
}
# Numeric options' bounds, checked for the config file and the command line alike. A softmax
# temperature outside them turns S/T into Inf or 0/0 (similarities lie in [-1, 1]).
BOUNDS: dict[str, tuple[float, float]] = {"temperature": (MIN_TEMPERATURE, MAX_TEMPERATURE)}
MAX_CONFIG_BYTES = 2**20  # a config file holds options and a list of sources
MAX_NAME = 100  # characters of an option's named value (a weighting, a dtype, a size ...)
_WEIGHT_KEYS = ("weighting", "negative", "temperature", "top_k")
_HINT = "keys are the options of `fedbip merge --help` with '_' for '-'; its help lists the accepted values"
_OPTION_KEYS = (
    "granularity",
    "combine",
    "rank",
    "dtype",
    "clip_norm",
    "heads",
    "to_lora",
    "max_shard_size",
    "device",
    "similarity",
    "sketch_dim",
    "sketch_seed",
)
# Checked on their own as options of a sketch; whether the method is one is checked once all layers are merged.
_SKETCH_KEYS = ("sketch_dim", "sketch_seed")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class MergeSettings:
    """One ``fedbip merge`` with every option decided: command line over config file over defaults.

    ``source_dir`` is where relative ``sources`` are taken from: the config file's directory when
    they come from the file, else the working directory. ``cache`` is None when disabled.
    """

    sources: tuple[str, ...]
    source_dir: Path
    out: Path
    options: MergeOptions
    base: str | None = None
    overwrite: bool = False
    lock: Path | None = None
    locked: bool = False
    cache: Path | None = None


def read_config(path: Path) -> dict[str, Any]:
    """Read and check a config file (YAML if named ``*.yaml`` / ``*.yml``, else TOML); return its
    values with paths made absolute.

    ``layerwise`` is folded into ``granularity``; ``cache = true`` means the default directory.

    Raises:
        UsageError: the file cannot be read, is not TOML (YAML), or holds an unknown key, a value of
            the wrong type or a bad value.
    """
    where = str(path)
    try:
        text = read_text(Path(path), error=UsageError, limit=MAX_CONFIG_BYTES, what="the config file")
    except UsageError as exc:
        raise UsageError(exc.message, where=where, hint="--config names a TOML file (or YAML: *.yaml, *.yml)") from None
    data = _parse_yaml(text, where) if Path(path).suffix.lower() in YAML_SUFFIXES else _parse_toml(text, where)
    for key, value in data.items():
        _check_key(key, value, where)
    layer = normalise(data, where, _HINT)
    root = Path(path).absolute().parent
    for key in ("out", "lock"):
        if key in layer:
            layer[key] = confined(root, key, layer[key], where)
    if isinstance(layer.get("cache"), str):
        layer["cache"] = confined(root, "cache", layer["cache"], where)
    if "base" in layer and not layer["base"].startswith(HUB_PREFIX):
        layer["base"] = str(confined(root, "base", layer["base"], where))
    for source in layer.get("sources", []):
        if not source.startswith(HUB_PREFIX):
            _confined_source(root, source, where)
    if "sources" in layer:
        layer["source_dir"] = root
    return layer


def confined(root: Path, key: str, value: str, where: str) -> Path:
    """The config path ``value`` of ``key``, taken from the config's directory ``root``, which it may not
    leave (by ``..``, an absolute path or a link): a config file is often someone else's, and
    ``out``, ``lock`` and ``cache`` name what a run replaces. ``~`` is not expanded.

    Raises:
        UsageError: naming the key and the value, with how to give such a path on the command line.
    """
    option = "as SOURCES" if key == "sources" else "--" + key
    if value.startswith("~"):
        raise UsageError(
            f"{key} = {_shown(value)}: '~' is not expanded in a config file",
            where=where,
            hint=f"write the path relative to the config file, or give it on the command line ({option})",
        )
    path = Path(os.path.normpath(root / value))
    if not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(
            f"{key} = {_shown(value)}: leaves the config file's directory {root}",
            where=where,
            hint=f"a config names paths inside its own directory; give this one on the command line ({option})",
        )
    return path


def _confined_source(root: Path, source: str, where: str) -> None:
    """A config's local SOURCE (an @list too) stays in ``root``; an @list there is a regular file."""
    is_list = source.startswith("@")
    path = confined(root, "sources", source.removeprefix("@"), where)
    if is_list and path.exists() and not path.is_file():
        raise UsageError(
            f"sources = {_shown(source)}: an @list in a config file must be a regular file",
            where=where,
            hint="write the list into a file beside the config, or give the pipe on the command line",
        )


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    check_depth(text, where=where, error=UsageError, what="the config file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"not valid TOML: {exc}", where=where, hint="see https://toml.io for the syntax") from None


class _YamlLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (TOML does; plain YAML would keep the last),
    aliases (``*name``: a config needs none, and an alias bomb expands exponentially wherever its
    value is walked) and nodes nested deeper than ``MAX_DEPTH`` (the composer recurses)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a config file", mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"values nested more than {MAX_DEPTH} deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if (key.tag, key.value) in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key.value!r}",
                    key.start_mark,
                )
            seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: plain data, never Python objects
    except yaml.YAMLError as exc:
        raise UsageError(
            f"not valid YAML: {_yaml_problem(exc)}", where=where, hint="see https://yaml.org for the syntax"
        ) from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"expected keys and values (a mapping) at the top level, found {_shown(data)}", where=where, hint=_HINT
        )
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: its problem and where (PyYAML's own text quotes the source on more lines)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{exc.context or ''} {exc.problem or ''}".split()) + place


def normalise(layer: Mapping[str, Any], where: str, hint: str | None = None) -> dict[str, Any]:
    """Fold ``layerwise`` into ``granularity`` and check the merge options' values.

    ``where`` and ``hint`` go into the errors: the config file, or the command line.

    Raises:
        UsageError: both ``layerwise`` and ``granularity`` are given, or a value is not accepted.
    """
    values = dict(layer)
    if "layerwise" in values:
        if "granularity" in values:
            raise UsageError(
                "give layerwise or granularity, not both",
                where=where,
                hint='layerwise = true means granularity = "block"',
            )
        values["granularity"] = "block" if values.pop("layerwise") else "model"
    for key, (low, high) in BOUNDS.items():
        if key in values and not low <= values[key] <= high:  # NaN fails both comparisons
            raise UsageError(
                f"{key} = {_shown(values[key])}: expected a number from {low:g} to {high:g}", where=where, hint=hint
            )
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    for key in (*_WEIGHT_KEYS, *_OPTION_KEYS):
        if isinstance(values.get(key), str) and len(values[key]) > MAX_NAME:  # the option classes would quote it whole
            raise UsageError(f"{key} = {_shown(values[key])}: a value longer than {MAX_NAME} characters", where=where)
        if key in values:
            try:
                merge_options({key: values[key], **({"similarity": "sketch"} if key in _SKETCH_KEYS else {})})
            except UsageError as exc:
                raise UsageError(f"{key} = {_shown(values[key])}: {exc.message}", where=where, hint=hint) from None
    return values


def merge_options(values: Mapping[str, Any]) -> MergeOptions:
    """``MergeOptions`` with ``values`` (config keys) over the defaults; the option classes check them."""
    weights = replace(WeightOptions(), **{k: values[k] for k in _WEIGHT_KEYS if k in values})
    return replace(MergeOptions(), weights=weights, **{k: values[k] for k in _OPTION_KEYS if k in values})


def _layered(config: Path | None, given: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The command line's values over the config file's; SOURCES are required from one of them."""
    values = read_config(config) if config is not None else {}
    command_line = normalise(given, "command line")
    if "sources" in command_line:
        command_line["source_dir"] = Path.cwd()
    values.update(command_line)
    hint = f"give them on the command line{' or in ' + str(config) if config else ', or use --config FILE'}"
    if not values.get("sources"):
        raise UsageError("no SOURCES given", where=f"fedbip {command}", hint=hint)
    return values


@dataclass(frozen=True)
class InspectSettings:
    """One ``fedbip inspect-similarity``: the command line over the config file (the same file ``merge``
    reads; the keys that only a merge uses, such as ``out`` or ``combine``, are checked but not used)."""

    sources: tuple[str, ...]
    source_dir: Path
    granularity: str
    device: str
    method: SimilarityMethod
    base: str | None = None
    heads: str | None = None
    cache: Path | None = None


def inspect_settings(config: Path | None, given: Mapping[str, Any]) -> InspectSettings:
    """Decide every option of ``inspect-similarity`` (``given``: config keys, as ``merge_settings``).

    Raises:
        UsageError: a bad config file (see ``read_config``) or no SOURCES.
    """
    values = _layered(config, given, "inspect-similarity")
    cache = values.get("cache", True)
    return InspectSettings(
        sources=tuple(values["sources"]),
        source_dir=values.get("source_dir", Path.cwd()),
        granularity=values.get("granularity", "model"),
        device=values.get("device", "auto"),
        method=SimilarityMethod(values.get("similarity", "exact"), values.get("sketch_dim"), values.get("sketch_seed")),
        base=values.get("base"),
        heads=values.get("heads"),
        cache=default_cache_dir() if cache is True else (None if cache is False else Path(cache)),
    )


def merge_settings(config: Path | None, given: Mapping[str, Any]) -> MergeSettings:
    """Decide every option of a merge.

    Args:
        config: the ``--config`` file, if any.
        given: the options the user passed on the command line (config keys; ``cache`` is False for
            ``--no-cache``); they override the file. Paths are taken from the working directory.

    Raises:
        UsageError: a bad config file (see ``read_config``), no SOURCES, no ``out``, or
            ``locked`` without ``lock``.
    """
    values = _layered(config, given, "merge")
    if values.get("out") is None:
        raise UsageError(
            "no output directory given",
            where="fedbip merge",
            hint='pass --out DIR, or set out = "DIR" in the config file',
        )
    if values.get("locked") and values.get("lock") is None:
        raise UsageError(
            "--locked needs a lock file",
            where="fedbip merge",
            hint='pass --lock FILE, or set lock = "FILE" in the config file',
        )
    cache = values.get("cache", True)
    return MergeSettings(
        sources=tuple(values["sources"]),
        source_dir=values.get("source_dir", Path.cwd()),
        out=Path(values["out"]),
        options=merge_options(values),
        base=values.get("base"),
        overwrite=bool(values.get("overwrite", False)),
        lock=None if values.get("lock") is None else Path(values["lock"]),
        locked=bool(values.get("locked", False)),
        cache=default_cache_dir() if cache is True else (None if cache is False else Path(cache)),
    )


def _check_key(key: str, value: Any, where: str) -> None:
    if key not in KEYS:
        close = difflib.get_close_matches(str(key).replace("-", "_"), list(KEYS), n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown key {key!r}{suggestion}", where=where, hint=f"the keys are: {', '.join(KEYS)}")
    accepts, expected = KEYS[key]
    if not accepts(value):
        raise UsageError(f"{key} = {_shown(value)}: expected {expected}", where=where, hint=_HINT)


def _shown(value: Any, width: int = 80) -> str:
    """A value as it would be written in TOML (strings in double quotes, true/false; YAML's null as null),
    cut to ``width`` characters: a hostile value (deeply nested through dotted keys, huge) never floods a message."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        text = reprlib.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
