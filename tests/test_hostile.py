"""Hostile inputs, table-driven: each is refused with its exit code and one line that names the file
or the key, no traceback, no output directory, and a previous output left byte for byte as it was.

A case builds its inputs in a fresh directory (two good adapters to start from, ``make``) and
returns the command's arguments after ``fedbip``; a merge is run twice, into a new ``--out`` (which
must not appear) and over a previous merge with ``--overwrite`` (which must not change). New kinds
of hostile input belong here, beside the mechanism that refuses them (``fedbip_cli/boundedio.py``
for sizes and nesting, the readers' checks for values).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from factories import CONFIG_NAME, WEIGHTS_NAME, random_adapter
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.innercache import CACHE_FILE

SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.query": (8, 6)}
QUERY = "encoder.layer.0.attention.self.query"
DEEP = 100_000  # nesting that ends a recursive parser in RecursionError
GIB = 2**30
runner = CliRunner()


@dataclass
class Case:
    """One hostile input: ``build(root)`` makes it under ``root`` and returns the arguments after
    ``fedbip``; ``merge`` ones get ``--out`` appended. ``names`` must appear in the error line."""

    id: str
    build: Callable[[Path], list[str]]
    names: Callable[[Path], str]
    exit_code: int = 1
    says: str = ""  # what the error line must say besides the name


def clients(root: Path) -> Path:
    """Two good adapters, ``root/clients/c0`` and ``c1``."""
    for seed in range(2):
        random_adapter(root / "clients" / f"c{seed}", SHAPES, torch.Generator().manual_seed(seed))
    return root / "clients"


def merge(*sources: str | Path, options: tuple[str, ...] = ()) -> list[str]:
    return ["merge", *map(str, sources), "--no-cache", *options]


def c0(root: Path, name: str = CONFIG_NAME) -> Path:
    return root / "clients" / "c0" / name


def edit_config(**fields: object) -> Callable[[Path], list[str]]:
    """Both clients' configs with ``fields`` changed in c0's."""

    def build(root: Path) -> list[str]:
        clients(root)
        config = json.loads(c0(root).read_text())
        c0(root).write_text(json.dumps({**config, **fields}))
        return merge(root / "clients")

    return build


def raw_config(text: str | bytes) -> Callable[[Path], list[str]]:
    """c0's adapter_config.json replaced by ``text``."""

    def build(root: Path) -> list[str]:
        clients(root)
        data = text.encode() if isinstance(text, str) else text
        c0(root).write_bytes(data)
        return merge(root / "clients")

    return build


def replace_with(kind: str) -> Callable[[Path], Path]:
    """Turn ``path`` into a directory, a link to /dev/zero, a named pipe, or a sparse 1 GiB file."""

    def make(path: Path) -> Path:
        path.unlink(missing_ok=True)
        if kind == "directory":
            path.mkdir()
        elif kind == "device":
            path.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path)  # no process writes it: a blocking open would wait for ever
        else:
            with open(path, "wb") as f:
                f.truncate(GIB)  # a hole: no disk used, 1 GiB to anyone who reads it whole
        return path

    return make


def config_file_is(kind: str, name: str = CONFIG_NAME) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        clients(root)
        replace_with(kind)(c0(root, name))
        return merge(root / "clients")

    return build


def safetensors_header(header: bytes, *, claimed: int | None = None) -> Callable[[Path], list[str]]:
    """c0's weights file replaced by a header (``claimed``: the length its first 8 bytes give)."""

    def build(root: Path) -> list[str]:
        clients(root)
        header_padded = header + b" " * (-len(header) % 8)
        size = len(header_padded) if claimed is None else claimed
        c0(root, WEIGHTS_NAME).write_bytes(size.to_bytes(8, "little") + header_padded)
        return merge(root / "clients")

    return build


def deep_json(inner: str = "") -> str:
    return "[" * DEEP + inner + "]" * DEEP


def rank_zero(root: Path) -> list[str]:
    """rank_pattern {m: 0} with factors of rank 0 to match (scale = alpha / 0: ZeroDivisionError before)."""
    for seed in range(2):
        random_adapter(
            root / "clients" / f"c{seed}", SHAPES, torch.Generator().manual_seed(seed), rank_pattern={QUERY: 0}
        )
    return merge(root / "clients")


def width_zero(root: Path) -> list[str]:
    shapes = {**SHAPES, QUERY: (8, 0)}
    for seed in range(2):
        random_adapter(root / "clients" / f"c{seed}", shapes, torch.Generator().manual_seed(seed))
    return merge(root / "clients")


def deep_base(root: Path) -> list[str]:
    base = root / "base"
    base.mkdir()
    header = ('{"a":' + deep_json() + "}").encode()
    (base / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (base / "config.json").write_text("{}")
    return merge(clients(root), options=("--base", str(base)))


def list_chain(root: Path) -> list[str]:
    """2 000 @lists, each naming the next; the last names the adapters."""
    previous = root / "list-0.txt"
    previous.write_text(f"{clients(root)}\n")
    for i in range(1, 2001):
        current = root / f"list-{i}.txt"
        current.write_text(f"@{previous}\n")
        previous = current
    return merge(f"@{previous}")


def list_file_is(kind: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        clients(root)
        path = root / "sources.txt"
        if kind == "bytes":
            path.write_bytes(b"\xff\xfe not text\n")
        else:
            replace_with(kind)(path)
        return merge(f"@{path}")

    return build


def options(*extra: str, command: str = "merge") -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        if command == "merge":
            return merge(clients(root), options=extra)
        return [command, str(clients(root)), "--no-cache", *extra]

    return build


def config(text: str, name: str = "fedbip.yaml") -> Callable[[Path], list[str]]:
    """A --config file holding ``text`` (the sources given on the command line)."""

    def build(root: Path) -> list[str]:
        path = root / name
        path.write_text(text)
        return merge(clients(root), options=("--config", str(path)))

    return build


def config_is(kind: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        path = replace_with(kind)(root / "fedbip.toml")
        return merge(clients(root), options=("--config", str(path)))

    return build


# YAML's "billion laughs": nine aliases of nine aliases ..., 9⁹ strings once expanded.
ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "sources: *i\n"
)


def lock(data: object) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        path = root / "fedbip.lock"
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return merge(clients(root), options=("--lock", str(path), "--locked"))

    return build


LOCK = {"fedbip_lock": 1, "sources": {}, "base": None}


def cache_of(content: bytes | None) -> Callable[[Path], list[str]]:
    """--cache DIR whose database holds ``content``; None: DIR is a file."""

    def build(root: Path) -> list[str]:
        directory = root / "cache"
        if content is None:
            directory.write_text("a file")
        else:
            directory.mkdir()
            (directory / CACHE_FILE).write_bytes(content)
        return ["merge", str(clients(root)), "--cache", str(directory)]

    return build


def foreign_cache_table(root: Path) -> list[str]:
    """A database of fedbip's format whose table lacks the MAC column: refused as a whole."""
    directory = root / "cache"
    directory.mkdir()
    db = sqlite3.connect(directory / CACHE_FILE)
    db.executescript("CREATE TABLE pairs (x BLOB, y BLOB, value BLOB); PRAGMA user_version = 2;")
    db.close()
    return ["merge", str(clients(root)), "--cache", str(directory)]


def where(relative: str) -> Callable[[Path], str]:
    return lambda root: str(root / relative)


def text(words: str) -> Callable[[Path], str]:
    return lambda root: words


CONFIG = f"clients/c0/{CONFIG_NAME}"
WEIGHTS = f"clients/c0/{WEIGHTS_NAME}"
CASES = [
    # adapter_config.json: values
    Case("rank-pattern-zero", rank_zero, where(CONFIG), says="rank_pattern"),
    Case("rank-pattern-bad-regex", edit_config(rank_pattern={"query(": 2}), where(CONFIG)),
    Case("rank-pattern-float", edit_config(rank_pattern={QUERY: 2.5}), text("rank_pattern")),
    Case("rank-pattern-list", edit_config(rank_pattern=[2]), text("rank_pattern")),
    Case("alpha-pattern-string", edit_config(alpha_pattern={QUERY: "big"}), text("alpha_pattern")),
    Case(
        "alpha-pattern-nan", raw_config('{"peft_type": "LORA", "r": 2, "alpha_pattern": {"query": NaN}}'), where(CONFIG)
    ),
    Case(
        "alpha-pattern-overflow",
        raw_config('{"peft_type": "LORA", "r": 2, "alpha_pattern": {"q": 1e999}}'),
        text("alpha_pattern"),
    ),
    Case("lora-alpha-1e308", edit_config(lora_alpha=1e308), text("lora_alpha")),
    Case("lora-alpha-bool", edit_config(lora_alpha=True), text("lora_alpha")),
    Case("rank-string", edit_config(r="2"), text("lora rank")),
    Case("rank-bool", edit_config(r=True), text("lora rank")),
    Case("fan-in-fan-out-string", edit_config(fan_in_fan_out="yes"), text("fan_in_fan_out")),
    Case("modules-to-save-number", edit_config(modules_to_save=3), text("modules_to_save")),
    Case("peft-type-huge", edit_config(peft_type="X" * 100_000), where(CONFIG)),
    # adapter_config.json: the file
    Case("config-nested-deep", raw_config(deep_json()), where(CONFIG), says="more than 64 deep"),
    Case("config-not-object", raw_config("[1, 2]"), where(CONFIG)),
    Case("config-not-utf8", raw_config(b'{"r": "\xff"}'), where(CONFIG)),
    Case("config-1-gib", config_file_is("sparse"), where(CONFIG), says="larger than 4 MiB"),
    Case("config-directory", config_file_is("directory"), where(CONFIG), says="is a directory, not a file"),
    Case("config-dev-zero", config_file_is("device"), where(CONFIG), says="is a character device, not a file"),
    Case("config-fifo", config_file_is("fifo"), where(CONFIG), says="is a pipe, not a file"),
    Case("weights-fifo", config_file_is("fifo", WEIGHTS_NAME), where(WEIGHTS)),
    Case("weights-directory", config_file_is("directory", WEIGHTS_NAME), where(WEIGHTS)),
    # safetensors
    Case(
        "header-nested-deep",
        safetensors_header(('{"a":' + deep_json() + "}").encode()),
        where(WEIGHTS),
        says="recursion limit",
    ),
    Case("header-length-huge", safetensors_header(b"{}", claimed=2**63), where(WEIGHTS)),
    Case(
        "header-truncated",
        safetensors_header(b'{"a": {"dtype": "F32", "shape": [2, 6], "data_offsets": [0, 48]}}'),
        where(WEIGHTS),
    ),
    Case("module-width-zero", width_zero, where(WEIGHTS)),
    Case("base-header-nested-deep", deep_base, where("base/model.safetensors"), says="more than 64 deep"),
    # SOURCES
    Case("list-chain-2000", list_chain, where("list-2000.txt"), says="nested more than 8 deep"),
    Case("list-dev-zero", lambda root: merge("@/dev/zero"), text("/dev/zero")),
    Case("list-directory", list_file_is("directory"), where("sources.txt"), says="is a directory, not a file"),
    Case("list-1-gib", list_file_is("sparse"), where("sources.txt"), says="larger than 64 MiB"),
    Case("list-not-utf8", list_file_is("bytes"), where("sources.txt")),
    Case("list-of-a-fifo-config", lambda root: merge(f"@{replace_with('fifo')(root / 'fifo.txt')}"), where("fifo.txt")),
    # options
    Case("temperature-inf", options("--weighting", "softmax", "--temperature", "inf"), text("--temperature"), 2),
    Case(
        "temperature-subnormal", options("--weighting", "softmax", "--temperature", "1e-320"), text("--temperature"), 2
    ),
    Case("temperature-nan", options("--weighting", "softmax", "--temperature", "nan"), text("temperature"), 2),
    Case("shard-size-400-digits", options("--max-shard-size", "9" * 400), text("max_shard_size"), 2),
    Case("dtype-100000-characters", options("--dtype", "x" * 100_000), text("dtype"), 2),
    Case("neighbours-negative", options("--neighbours", "-5", command="inspect-similarity"), text("--neighbours"), 2),
    # --config
    Case("config-alias-bomb", config('out: "x"\n' + ALIAS_BOMB), where("fedbip.yaml"), 2, says="aliases"),
    Case("config-yaml-nested-deep", config("sources: " + deep_json('"a"') + "\n"), where("fedbip.yaml"), 2),
    Case(
        "config-toml-nested-deep",
        config("sources = " + deep_json('"a"') + "\n", "fedbip.toml"),
        where("fedbip.toml"),
        2,
    ),
    Case("config-dotted-deep", config("sources" + ".a" * 20_000 + " = 1\n", "fedbip.toml"), where("fedbip.toml"), 2),
    Case("config-temperature-inf", config("temperature = inf\n", "fedbip.toml"), text("temperature"), 2),
    Case("config-file-directory", config_is("directory"), where("fedbip.toml"), 2, says="is a directory, not a file"),
    Case("config-file-dev-zero", config_is("device"), where("fedbip.toml"), 2),
    Case("config-file-1-gib", config_is("sparse"), where("fedbip.toml"), 2, says="larger than 1 MiB"),
    # --lock
    Case("lock-base-string", lock({**LOCK, "base": "hf://org/base"}), where("fedbip.lock"), says="base ="),
    Case("lock-missing-sources", lock({"fedbip_lock": 1, "base": None}), where("fedbip.lock")),
    Case("lock-client-list", lock({**LOCK, "sources": {"clients": ["c0"]}}), where("fedbip.lock")),
    Case("lock-nested-deep", lock(deep_json()), where("fedbip.lock")),
    # --cache
    Case(
        "cache-not-a-database",
        cache_of(b"not a database" * 300),
        where(f"cache/{CACHE_FILE}"),
        says="not an SQLite database",
    ),
    Case("cache-dir-is-a-file", cache_of(None), where("cache"), says="not a directory"),
    Case("cache-foreign-table", foreign_cache_table, where(f"cache/{CACHE_FILE}")),
]


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A merge's output that every failing ``--overwrite`` run must leave as it is."""
    root = tmp_path_factory.mktemp("previous")
    out = root / "merged"
    result = runner.invoke(app, [*merge(clients(root)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, tree(out)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_refusal(result, case: Case, root: Path) -> None:  # type: ignore[no-untyped-def]
    output = result.stdout + result.stderr
    assert result.exit_code == case.exit_code, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no exception escaped: no traceback
    assert "Traceback" not in output
    name = case.names(root)
    if "error:" in result.stderr:  # fedbip's own errors: one line, then at most a hint
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and len(lines) <= 2 and all(s.startswith("hint: ") for s in lines[1:])
        assert name in lines[0], lines[0]
        assert case.says in lines[0], lines[0]
        assert len(lines[0]) < 1000, "a hostile value is quoted in full"
    else:  # typer's own option errors: its usage panel, naming the option
        assert "Invalid value" in result.stderr and name in result.stderr, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly(
    case: Case, tmp_path: Path, previous: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = case.build(tmp_path)
    if args[0] != "merge":
        check_refusal(runner.invoke(app, args), case, tmp_path)
        return
    outs = tmp_path / "outs"
    outs.mkdir()
    check_refusal(runner.invoke(app, [*args, "--out", str(outs / "new")]), case, tmp_path)
    assert list(outs.iterdir()) == []  # no output, no temporary left beside it

    out, before = previous
    kept = outs / "previous"
    shutil.copytree(out, kept)
    check_refusal(runner.invoke(app, [*args, "--out", str(kept), "--overwrite"]), case, tmp_path)
    assert tree(kept) == before
    assert sorted(p.name for p in outs.iterdir()) == ["previous"]


def test_the_table_covers_every_kind_of_input() -> None:
    """Guard against the table shrinking: each kind of input keeps cases."""
    kinds = {"config", "rank", "alpha", "header", "list", "temperature", "lock", "cache", "base", "module"}
    assert all(any(kind in case.id for case in CASES) for kind in kinds)
    assert len(CASES) == len({case.id for case in CASES}) >= 45


def test_a_sparse_gigabyte_costs_no_disk(tmp_path: Path) -> None:
    """The 1 GiB cases are holes: they cost the test no disk, and a reader that read them whole
    would take a gigabyte of memory (the bounded reader stops one byte past its limit)."""
    big = replace_with("sparse")(tmp_path / "big")
    assert big.stat().st_size == GIB and big.stat().st_blocks * 512 < 2**20


def test_inputs_near_the_bounds_are_accepted(tmp_path: Path) -> None:
    """The bounds refuse hostile inputs only: peft's regex pattern keys (brackets inside strings do
    not count as nesting), escaped quotes, an alpha of 10⁶, a description full of brackets."""
    pattern = r"layer\.[0-9]\.attention\.self\.query"
    for seed in range(2):
        random_adapter(
            tmp_path / "clients" / f"c{seed}",
            SHAPES,
            torch.Generator().manual_seed(seed),
            rank_pattern={pattern: 3},
            alpha_pattern={pattern: 1e6},
        )
    config = json.loads(c0(tmp_path).read_text())
    c0(tmp_path).write_text(json.dumps({**config, "note": '[{"' * 200 + '\\"'}))
    result = runner.invoke(app, ["inspect-similarity", str(tmp_path / "clients"), "--no-cache", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["clients"] == ["c0", "c1"]
