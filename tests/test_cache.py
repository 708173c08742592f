"""The inner-product cache: a warm run computes only the new or changed client's row, and gives
the same bits as a cold run, down to the written files and the manifest."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from factories import random_adapter, read_adapter, write_lora_adapter
from typer.testing import CliRunner

from fedbip_cli import pipeline, similarity
from fedbip_cli.cli import app
from fedbip_cli.errors import CacheError
from fedbip_cli.innercache import CACHE_FILE, InnerProductCache, default_cache_dir

SHAPES = {
    "encoder.layer.0.attention.self.query": (8, 6),
    "encoder.layer.0.attention.self.value": (8, 6),
    "encoder.layer.1.attention.self.query": (8, 6),
}
MODULES = len(SHAPES)
runner = CliRunner()


def make_clients(root: Path, count: int, first_seed: int = 0) -> list[Path]:
    return [
        random_adapter(root / f"c{seed:02d}", SHAPES, torch.Generator().manual_seed(seed), r=2 + seed % 3)
        for seed in range(first_seed, first_seed + count)
    ]


def triangle(k: int) -> int:
    """Pairs of K distinct clients, diagonal included."""
    return k * (k + 1) // 2


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the inner products the engine's Gram routines compute, independently of the cache's
    own stats: a row against every client, or the upper triangle of a cold run."""
    calls = [0]
    rows_products, all_products = similarity.rows_products, similarity.all_products

    def counting_rows(stacked, rows):  # type: ignore[no-untyped-def]
        calls[0] += len(rows) * stacked.count
        return rows_products(stacked, rows)

    def counting_all(stacked):  # type: ignore[no-untyped-def]
        calls[0] += stacked.count * (stacked.count + 1) // 2
        return all_products(stacked)

    monkeypatch.setattr(similarity, "rows_products", counting_rows)
    monkeypatch.setattr(similarity, "all_products", counting_all)
    return calls


def inspect(dirs: list[Path], cache: InnerProductCache, granularity: str = "block") -> similarity.SimilarityResult:
    return pipeline.inspect(pipeline.load([str(d) for d in dirs]), granularity=granularity, device="cpu", cache=cache)


def assert_same_bits(a: similarity.SimilarityResult, b: similarity.SimilarityResult) -> None:
    assert list(a.groups) == list(b.groups)
    for name in a.groups:
        assert torch.equal(a.groups[name].similarity, b.groups[name].similarity), name
        assert torch.equal(a.groups[name].norms, b.groups[name].norms), name


def test_adding_one_client_computes_only_its_row(tmp_path: Path, counted: list[int]) -> None:
    k = 6
    dirs = make_clients(tmp_path / "clients", k + 1)
    with InnerProductCache(tmp_path / "cache") as cache:
        inspect(dirs[:k], cache)
        assert (cache.stats.computed, cache.stats.hits) == (MODULES * triangle(k), 0)
    assert counted[0] == MODULES * triangle(k)

    counted[0] = 0
    with InnerProductCache(tmp_path / "cache") as cache:
        warm = inspect(dirs, cache)
        # The new client against the k others and itself, in every module; everything else is read.
        assert cache.stats.computed == MODULES * (k + 1)
        assert cache.stats.hits == MODULES * triangle(k)
    assert counted[0] == MODULES * (k + 1)

    with InnerProductCache(tmp_path / "cold") as cache:
        cold = inspect(dirs, cache)
        assert cache.stats.computed == MODULES * triangle(k + 1)
    assert_same_bits(warm, cold)
    assert_same_bits(warm, inspect(dirs, InnerProductCache()))  # no cache kept: the same engine


def test_changed_client_recomputes_its_row_and_resaved_copies_hit(tmp_path: Path, counted: list[int]) -> None:
    dirs = make_clients(tmp_path / "clients", 4)
    with InnerProductCache(tmp_path / "cache") as cache:
        inspect(dirs, cache)

    # Client c02 retrained: new tensors, same name.
    shutil.rmtree(dirs[2])
    random_adapter(dirs[2], SHAPES, torch.Generator().manual_seed(99), r=2)
    # Client c03 re-saved: the same tensors written again into a new file (another header order).
    config, tensors = read_adapter(dirs[3])
    factors = {m: (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]) for m in reversed(SHAPES)}
    shutil.rmtree(dirs[3])
    write_lora_adapter(dirs[3], factors, r=config["r"], lora_alpha=config["lora_alpha"])

    counted[0] = 0
    with InnerProductCache(tmp_path / "cache") as cache:
        warm = inspect(dirs, cache, granularity="module")
        assert cache.stats.computed == MODULES * 4  # c02 against all four, itself included
        assert cache.stats.hits == MODULES * triangle(3)
    assert counted[0] == MODULES * 4
    assert_same_bits(warm, inspect(dirs, InnerProductCache(), granularity="module"))


def test_identical_clients_are_computed_once(tmp_path: Path, counted: list[int]) -> None:
    first = random_adapter(tmp_path / "a", SHAPES, torch.Generator().manual_seed(3))
    shutil.copytree(first, tmp_path / "b")
    with InnerProductCache() as cache:
        result = inspect([first, tmp_path / "b"], cache, granularity="model")
        assert cache.stats.computed == MODULES
    assert counted[0] == MODULES
    s = result.groups["model"].similarity
    assert s[0, 1] == s[1, 0] and s[0, 1] == pytest.approx(1.0, abs=1e-15)
    assert result.groups["model"].norms[0] == result.groups["model"].norms[1]


def test_values_round_trip_exactly(tmp_path: Path) -> None:
    values = {(b"a", b"b"): -0.0, (b"a", b"c"): 3.0, (b"b", b"c"): 0.1 + 0.2, (b"c", b"c"): 5e-324}
    with InnerProductCache(tmp_path) as cache:
        cache.store(values)
    with InnerProductCache(tmp_path) as cache:
        found = cache.lookup([b"a", b"b", b"c", b"z"])
    assert found.keys() == values.keys()
    for pair, value in values.items():
        assert found[pair].hex() == value.hex(), pair  # -0.0 keeps its sign
    with InnerProductCache(tmp_path) as cache:
        assert cache.lookup([b"a", b"b"]) == {(b"a", b"b"): -0.0}  # only pairs among the keys asked


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedbip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedbip"


def test_damaged_or_foreign_cache_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CACHE_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="cannot open the inner-product cache") as caught:
        InnerProductCache(tmp_path / "junk")
    assert "--no-cache" in caught.value.hint
    newer = tmp_path / "newer"
    newer.mkdir()
    sqlite3.connect(newer / CACHE_FILE).execute("PRAGMA user_version = 7").connection.close()
    with pytest.raises(CacheError, match="format 7"):
        InnerProductCache(newer)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CacheError):
        InnerProductCache(tmp_path / "file")


# --- through the command line ------------------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def merge(clients: Path, out: Path, *cache_args: str) -> dict:
    result = runner.invoke(
        app, ["merge", str(clients), "--out", str(out), "--overwrite", "--layerwise", "--json", *cache_args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_warm_merge_writes_the_bytes_of_a_cold_one(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    make_clients(clients, 4)
    cache = tmp_path / "cache"
    summary = merge(clients, tmp_path / "out", "--cache", str(cache))
    assert summary["cache"] == {"dir": str(cache), "hits": 0, "computed": MODULES * triangle(4)}

    make_clients(clients, 1, first_seed=4)  # a fifth client joins
    warm = merge(clients, tmp_path / "out", "--cache", str(cache))
    assert warm["cache"] == {"dir": str(cache), "hits": MODULES * triangle(4), "computed": MODULES * 5}
    warm_bytes = tree_bytes(tmp_path / "out")

    cold = merge(clients, tmp_path / "out", "--cache", str(tmp_path / "fresh"))
    assert cold["cache"]["hits"] == 0 and cold["cache"]["computed"] == MODULES * triangle(5)
    assert tree_bytes(tmp_path / "out") == warm_bytes  # adapters, cards and manifest
    assert "fedbip-manifest.json" in warm_bytes and str(cache) not in warm_bytes["fedbip-manifest.json"].decode()

    uncached = merge(clients, tmp_path / "out", "--no-cache")
    assert uncached["cache"] == {"dir": None, "hits": 0, "computed": MODULES * triangle(5)}
    assert tree_bytes(tmp_path / "out") == warm_bytes


def test_cli_default_cache_and_cache_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = tmp_path / "clients"
    make_clients(clients, 3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = runner.invoke(app, ["inspect-similarity", str(clients), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cache"]["dir"] == str(tmp_path / "xdg" / "fedbip")
    assert (tmp_path / "xdg" / "fedbip" / CACHE_FILE).is_file()
    again = json.loads(runner.invoke(app, ["inspect-similarity", str(clients), "--format", "json"]).stdout)
    assert again["cache"]["computed"] == 0 and again["cache"]["hits"] == MODULES * triangle(3)

    (tmp_path / "xdg" / "fedbip" / CACHE_FILE).write_bytes(b"garbage" * 200)
    result = runner.invoke(app, ["inspect-similarity", str(clients)])
    assert result.exit_code == 1 and "inner-product cache" in result.stderr and "--no-cache" in result.stderr
    result = runner.invoke(app, ["inspect-similarity", str(clients), "--cache", str(tmp_path), "--no-cache"])
    assert result.exit_code == 2


def test_covering_rows_touch_every_missing_pair_with_few_rows():
    n = 9
    missing = torch.zeros(n, n, dtype=torch.bool)
    for new in (2, 7):  # two clients added to seven cached ones: their rows and columns
        missing[new, :] = missing[:, new] = True
    assert similarity.covering_rows(missing) == [2, 7]
    scattered = torch.zeros(n, n, dtype=torch.bool)
    for x, y in ((0, 4), (4, 8), (1, 1), (3, 6)):
        scattered[x, y] = scattered[y, x] = True
    rows = similarity.covering_rows(scattered)
    assert all(x in rows or y in rows for x, y in scattered.nonzero().tolist())
    assert rows == sorted(rows) and len(rows) == 3  # 4 covers two pairs; 1 and one of 3, 6 the others
    assert similarity.covering_rows(torch.zeros(n, n, dtype=torch.bool)) == []
    assert similarity.covering_rows(scattered, limit=2) is None  # more rows than allowed
    every = torch.ones(n, n, dtype=torch.bool)
    assert similarity.covering_rows(every) == list(range(n))  # each diagonal pair (u, u) needs row u
