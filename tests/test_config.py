"""``fedbip merge --config FILE``: parsing, validation errors, paths relative to the file, and the
command line overriding the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import random_adapter
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.config import KEYS, merge_settings, read_config
from fedbip_cli.errors import UsageError
from fedbip_cli.innercache import default_cache_dir

SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.value": (8, 6)}
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory holding three adapters under adapters/."""
    root = tmp_path / "project"
    for seed in range(3):
        random_adapter(root / "adapters" / f"c{seed}", SHAPES, torch.Generator().manual_seed(seed))
    return root


def write_config(directory: Path, text: str, name: str = "fedbip.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_key_parsed_with_paths_from_the_file(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
sources = ["adapters/", "hf://org/repo@v1/sub", "@more.txt"]
out = "merged"
base = "models/base"
granularity = "module"
weighting = "softmax"
negative = "keep"
temperature = 2
top_k = 3
combine = "cat"
rank = 4
device = "cpu"
overwrite = true
lock = "fedbip.lock"
locked = true
cache = ".cache/fedbip"
""",
    )
    settings = merge_settings(config, {})
    assert settings.sources == ("adapters/", "hf://org/repo@v1/sub", "@more.txt")  # as written: lock keys
    assert settings.source_dir == tmp_path
    assert settings.out == tmp_path / "merged"
    assert settings.base == str(tmp_path / "models/base")
    assert settings.lock == tmp_path / "fedbip.lock" and settings.locked is True
    assert settings.cache == tmp_path / ".cache/fedbip"
    assert settings.overwrite is True
    options = settings.options
    assert (options.granularity, options.combine, options.rank, options.device) == ("module", "cat", 4, "cpu")
    assert options.weights.weighting == "softmax" and options.weights.negative == "keep"
    assert options.weights.temperature == 2.0 and isinstance(options.weights.temperature, float)
    assert options.weights.top_k == 3


def test_defaults_layerwise_and_cache_switches(tmp_path: Path) -> None:
    settings = merge_settings(write_config(tmp_path, 'sources = ["a", "b"]\nout = "o"\nlayerwise = true\n'), {})
    assert settings.options.granularity == "block"
    assert settings.cache == default_cache_dir() and settings.lock is None and settings.overwrite is False
    assert settings.options.combine == "svd" and settings.options.weights.top_k is None
    assert merge_settings(write_config(tmp_path, 'sources = ["a"]\nout = "o"\ncache = false\n'), {}).cache is None
    assert (
        merge_settings(write_config(tmp_path, 'sources = ["a"]\nout = "o"\ncache = true\n'), {}).cache
        == default_cache_dir()
    )
    hub_base = merge_settings(write_config(tmp_path, 'sources = ["a"]\nout = "o"\nbase = "hf://org/base"\n'), {})
    assert hub_base.base == "hf://org/base"


def test_command_line_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    config = write_config(
        tmp_path / "conf",
        """
sources = ["adapters/"]
out = "merged"
layerwise = true
combine = "cat"
overwrite = true
cache = "c"
""",
    )
    monkeypatch.chdir(tmp_path)
    settings = merge_settings(
        config,
        {
            "sources": ["mine/"],
            "granularity": "model",
            "combine": "svd",
            "overwrite": False,
            "cache": False,
            "out": Path("here"),
        },
    )
    assert settings.sources == ("mine/",) and settings.source_dir == tmp_path  # from the working directory now
    assert settings.options.granularity == "model" and settings.options.combine == "svd"
    assert settings.overwrite is False and settings.cache is None and settings.out == Path("here")
    kept = merge_settings(config, {"rank": 2})
    assert kept.sources == ("adapters/",) and kept.source_dir == tmp_path / "conf" and kept.options.combine == "cat"


# The same mistakes written in TOML and in YAML, and the one message both give.
BAD_CONFIGS = [
    ("top-k = 3", "top-k: 3", "unknown key 'top-k'; did you mean 'top_k'?"),
    ("[merge]\nrank = 2", "merge:\n  rank: 2", "unknown key 'merge'"),
    ('top_k = "4"', 'top_k: "4"', 'top_k = "4": expected an integer'),
    ("rank = true", "rank: true", "rank = true: expected an integer"),
    ('sources = "adapters/"', "sources: adapters/", 'sources = "adapters/": expected a list of non-empty strings'),
    ('sources = ["a", ""]', 'sources: [a, ""]', 'sources = ["a", ""]: expected a list'),
    ('temperature = "hot"', "temperature: hot", 'temperature = "hot": expected a number'),
    ("overwrite = 1", "overwrite: 1", "overwrite = 1: expected true or false"),
    ("cache = 3", "cache: 3", "cache = 3: expected a directory"),
    (
        'combine = "mean"',
        "combine: mean",
        "combine = \"mean\": unknown combine mode 'mean'; choose one of svd, cat, linear",
    ),
    (
        'weighting = "magic"',
        "weighting: magic",
        "weighting = \"magic\": unknown weighting 'magic'; choose one of paper, softmax",
    ),
    ('negative = "drop"', "negative: drop", 'negative = "drop": unknown negative mode'),
    (
        'granularity = "layer"',
        "granularity: layer",
        "granularity = \"layer\": unknown granularity 'layer'; choose one of model, block, module",
    ),
    ('device = "tpu"', "device: tpu", "device = \"tpu\": unknown device 'tpu'; choose one of auto, cpu, cuda"),
    ("temperature = 0", "temperature: 0", "temperature = 0: expected a number from 1e-06 to 1e+06"),
    ("temperature = inf", "temperature: .inf", "temperature = Infinity: expected a number from 1e-06 to 1e+06"),
    ("temperature = nan", "temperature: .nan", "temperature = NaN: expected a number from 1e-06 to 1e+06"),
    ("temperature = 1e-320", "temperature: 1.0e-320", "temperature = 1e-320: expected a number from 1e-06"),
    ("top_k = 0", "top_k: 0", "top_k = 0: top-k 0 must be at least 1"),
    ("rank = -1", "rank: -1", "rank = -1: rank -1 must be a positive integer"),
    (
        'layerwise = true\ngranularity = "module"',
        "layerwise: true\ngranularity: module",
        "give layerwise or granularity, not both",
    ),
    ("rank = ", "rank: [", "not valid"),
    (
        "rank = 2\nrank = 3",
        "rank: 2\nrank: 3",
        "not valid",
    ),  # a key given twice: TOML refuses it, and so does fedbip's YAML
]


@pytest.mark.parametrize("name", ["fedbip.toml", "fedbip.yaml"])
@pytest.mark.parametrize(("toml", "yaml", "message"), BAD_CONFIGS)
def test_bad_config_names_file_key_and_value(tmp_path: Path, name: str, toml: str, yaml: str, message: str) -> None:
    text = 'out = "o"\n' + toml if name.endswith(".toml") else "out: o\n" + yaml
    config = write_config(tmp_path, text + "\n", name)
    with pytest.raises(UsageError) as caught:
        read_config(config)
    assert caught.value.where == str(config)
    assert message in caught.value.message, caught.value.message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rank: 2\nrank: 3\n", "found duplicate key 'rank'"),
        (
            "- adapters/\n- more/\n",
            'expected keys and values (a mapping) at the top level, found ["adapters/", "more/"]',
        ),
        ("base:\n", "base = null: expected a model directory or hf:// reference"),
        ("out: 2024-01-01\n", 'out = "2024-01-01": expected a directory (string)'),
        ("1: x\n", "unknown key 1"),
        ("rank: !!python/object/apply:os.getcwd []\n", "not valid YAML"),  # the safe loader builds no Python objects
    ],
)
def test_yaml_specifics(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        read_config(write_config(tmp_path, text, "fedbip.yml"))
    assert message in caught.value.message, caught.value.message
    assert caught.value.where == str(tmp_path / "fedbip.yml") and caught.value.exit_code == 2


def test_yaml_and_toml_configs_decide_the_same_merge(tmp_path: Path) -> None:
    """The example CI config in TOML and in YAML: every setting the same, paths from the file's directory."""
    example = Path(__file__).resolve().parent.parent / "examples" / "ci"
    toml = merge_settings(example / "fedbip.toml", {})
    assert merge_settings(example / "fedbip.yaml", {}) == toml
    assert toml.out == example / "merged" and toml.options.granularity == "block" and toml.options.weights.top_k == 4
    empty = write_config(tmp_path, "# nothing yet\n", "fedbip.yml")
    assert read_config(empty) == {}
    assert merge_settings(empty, {"sources": ["a"], "out": Path("o")}).sources == ("a",)


def test_missing_pieces_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="the config file does not exist"):
        read_config(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="no SOURCES"):
        merge_settings(write_config(tmp_path, 'out = "o"\n'), {})
    with pytest.raises(UsageError, match="no output directory"):
        merge_settings(write_config(tmp_path, 'sources = ["a"]\n'), {})
    with pytest.raises(UsageError, match="--locked needs a lock file"):
        merge_settings(write_config(tmp_path, 'sources = ["a"]\nout = "o"\nlocked = true\n'), {})
    assert merge_settings(
        write_config(tmp_path, 'sources = ["a"]\nlocked = true\n'), {"out": Path("o"), "lock": Path("l")}
    ).locked


def test_every_key_is_a_merge_option() -> None:
    """A key of the file is the long option of the same name, so the README's one table covers both."""
    help_text = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "300"}).stdout
    for key in KEYS:
        if key != "sources":
            assert "--" + key.replace("_", "-") in help_text, key


# --- through the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("fedbip.toml", 'sources = ["adapters/"]\nout = "merged"\nlayerwise = true\ncombine = "cat"\n'),
        ("fedbip.yml", "sources:\n  - adapters/\nout: merged\nlayerwise: true\ncombine: cat\n"),
    ],
)
def test_merge_from_config_without_sources_on_the_command_line(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    config = write_config(project, text, name)
    monkeypatch.chdir(tmp_path)  # relative paths come from the file, not from here
    result = runner.invoke(app, ["merge", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(project / "merged") and summary["clients"] == ["c0", "c1", "c2"]
    manifest = json.loads((project / "merged" / "fedbip-manifest.json").read_text())
    assert manifest["options"]["granularity"] == "block" and manifest["options"]["combine"] == "cat"

    # Flags override the file: another combine and granularity, and --overwrite for the busy out.
    result = runner.invoke(
        app, ["merge", "-c", str(config), "--combine", "svd", "--granularity", "model", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((project / "merged" / "fedbip-manifest.json").read_text())
    assert manifest["options"]["granularity"] == "model" and manifest["options"]["combine"] == "svd"


def test_bad_config_through_the_cli_exits_2_and_writes_nothing(project: Path) -> None:
    config = write_config(project, 'sources = ["adapters/"]\nout = "merged"\ncombine = "mean"\n')
    result = runner.invoke(app, ["merge", "--config", str(config)])
    assert result.exit_code == 2
    assert str(config) in result.stderr and 'combine = "mean"' in result.stderr and "svd, cat, linear" in result.stderr
    assert "Traceback" not in result.output and not (project / "merged").exists()
    assert runner.invoke(app, ["merge", "--out", str(project / "merged")]).exit_code == 2  # no SOURCES anywhere


def test_dry_run_from_config_validates_everything_and_computes_nothing(project: Path) -> None:
    config = write_config(project, 'sources = ["adapters/"]\nout = "merged"\n')
    result = runner.invoke(app, ["merge", "--config", str(config), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["out"] == str(project / "merged")
    assert plan["sources"] == [{"spec": "adapters/", "clients": ["c0", "c1", "c2"]}]
    assert not (project / "merged").exists()

    (project / "merged").mkdir()
    (project / "merged" / "keep.txt").write_text("precious")
    busy = runner.invoke(app, ["merge", "--config", str(config), "--dry-run"])
    assert busy.exit_code == 1 and "not empty" in busy.stderr  # the merge would fail: so does the dry run

    (project / "adapters" / "c1" / "adapter_config.json").write_text("{not json")
    broken = runner.invoke(app, ["merge", "--config", str(config), "--dry-run", "--overwrite"])
    assert broken.exit_code == 1 and "c1" in broken.stderr
    assert (project / "merged" / "keep.txt").read_text() == "precious"
