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
    assert summary["cache"] == {"dir": str(cache), "hits": 0, "computed": MODULES * triangle(4), "rejected": 0}

    make_clients(clients, 1, first_seed=4)  # a fifth client joins
    warm = merge(clients, tmp_path / "out", "--cache", str(cache))
    assert warm["cache"] == {"dir": str(cache), "hits": MODULES * triangle(4), "computed": MODULES * 5, "rejected": 0}
    warm_bytes = tree_bytes(tmp_path / "out")

    cold = merge(clients, tmp_path / "out", "--cache", str(tmp_path / "fresh"))
    assert cold["cache"]["hits"] == 0 and cold["cache"]["computed"] == MODULES * triangle(5)
    assert tree_bytes(tmp_path / "out") == warm_bytes  # adapters, cards and manifest
    assert "fedbip-manifest.json" in warm_bytes and str(cache) not in warm_bytes["fedbip-manifest.json"].decode()

    uncached = merge(clients, tmp_path / "out", "--no-cache")
    assert uncached["cache"] == {"dir": None, "hits": 0, "computed": MODULES * triangle(5), "rejected": 0}
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


# --- integrity: a shared or restored cache cannot change a result --------------------------------


def rows(cache_dir: Path) -> list[tuple]:
    with sqlite3.connect(cache_dir / CACHE_FILE) as db:
        return db.execute("SELECT x, y, value, mac FROM pairs").fetchall()


def rewrite(cache_dir: Path, statement: str, *args: object) -> None:
    """Edit the cache as anyone who can write its directory could."""
    db = sqlite3.connect(cache_dir / CACHE_FILE)
    db.execute(statement, args)
    db.commit()
    db.close()


def test_tampered_entries_are_recomputed_and_the_result_does_not_change(tmp_path: Path) -> None:
    """The attack of issue 12: every off-diagonal value set to make all clients look alike. Each
    entry is refused, computed again and replaced; the merge writes the bytes of a cold run."""
    clients = tmp_path / "clients"
    make_clients(clients, 4)
    cache = tmp_path / "cache"
    merge(clients, tmp_path / "cold", "--cache", str(cache))
    cold = tree_bytes(tmp_path / "cold")
    diagonal = {x: value for x, y, value, _ in rows(cache) if x == y}
    rewrite(cache, "UPDATE pairs SET value = (SELECT d.value FROM pairs d WHERE d.x = pairs.x AND d.y = pairs.x)")
    forged = sum(1 for x, y, value, _ in rows(cache) if x != y)
    assert forged == MODULES * (triangle(4) - 4) and all(diagonal[x] == value for x, _, value, _ in rows(cache))

    result = runner.invoke(
        app, ["merge", str(clients), "--out", str(tmp_path / "warm"), "--layerwise", "--json", "--cache", str(cache)]
    )
    assert result.exit_code == 0, result.output
    assert f"{forged} inner-product cache entries" in result.stderr and "did not change the result" in result.stderr
    assert json.loads(result.stdout)["cache"]["computed"] == forged
    assert tree_bytes(tmp_path / "warm") == cold
    with InnerProductCache(cache) as again:  # the refused entries were replaced: all verify now
        assert len(again.lookup(sorted({x for x, *_ in rows(cache)}))) == MODULES * triangle(4)
        assert again.stats.rejected == 0


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("UPDATE pairs SET value = x'000000000000f87f'", "NaN, MAC recomputed by a key holder"),
        ("UPDATE pairs SET value = x'000000000000f07f'", "+Inf, MAC recomputed by a key holder"),
        ("UPDATE pairs SET value = x'0000000000000000'", "zero, MAC of the old value"),
        ("UPDATE pairs SET value = x'00000000000000'", "7 bytes"),
        ("UPDATE pairs SET value = 0.5", "a REAL, not 8 bytes"),
        ("UPDATE pairs SET value = '0.5'", "TEXT"),
        ("UPDATE pairs SET mac = x'00'", "a short MAC"),
        ("UPDATE pairs SET mac = 'mac'", "a TEXT MAC"),
    ],
)
def test_every_malformed_entry_is_refused(tmp_path: Path, statement: str, why: str) -> None:
    values = {(b"a", b"a"): 4.0, (b"a", b"b"): 0.5, (b"b", b"b"): 1.0}
    with InnerProductCache(tmp_path) as cache:
        cache.store(values)
        secret_mac = cache._mac  # a leaked key: the MAC verifies, the value still may not be used
    rewrite(tmp_path, statement)
    if "key holder" in why:
        for x, y, value, _ in rows(tmp_path):
            rewrite(tmp_path, "UPDATE pairs SET mac = ? WHERE x = ? AND y = ?", secret_mac(x, y, value), x, y)
    with InnerProductCache(tmp_path) as cache:
        assert cache.lookup([b"a", b"b"]) == {}, why
        assert (cache.stats.rejected, cache.stats.hits) == (3, 0)
        cache.store(values)  # what the engine does next: the products computed again replace them
    with InnerProductCache(tmp_path) as cache:
        assert cache.lookup([b"a", b"b"]) == values and cache.stats.rejected == 0


def test_entries_cannot_be_moved_to_another_pair_or_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with InnerProductCache(tmp_path / "c") as cache:
        cache.store({(b"a", b"b"): 0.25, (b"a", b"c"): -0.75})
    rewrite(tmp_path / "c", "UPDATE pairs SET y = x'7a' WHERE y = CAST('c' AS BLOB)")  # (a, c)'s entry as (a, z)
    with InnerProductCache(tmp_path / "c") as cache:
        assert cache.lookup([b"a", b"b", b"z"]) == {(b"a", b"b"): 0.25} and cache.stats.rejected == 1
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "another-user"))  # another key: nothing verifies
    with InnerProductCache(tmp_path / "c") as cache:
        assert cache.lookup([b"a", b"b", b"z"]) == {} and cache.stats.rejected == 2


def test_the_key_lives_outside_the_cache_private_to_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "config" / "fedbip" / "cache-key"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with InnerProductCache(tmp_path / "cache") as cache:
        cache.store({(b"a", b"b"): 1.5})
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(key_file.read_text())) == 32
    assert not any(p.name == "cache-key" for p in (tmp_path / "cache").rglob("*"))

    key_file.chmod(0o644)
    with pytest.raises(CacheError, match=r"may be read by others \(mode 644\)") as caught:
        InnerProductCache(tmp_path / "cache")
    assert caught.value.where == str(key_file) and caught.value.hint == f"chmod 600 {key_file}"
    key_file.chmod(0o600)
    key_file.write_text("not hex\n")
    with pytest.raises(CacheError, match="not 64 hex digits"):
        InnerProductCache(tmp_path / "cache")

    # A CI job keeps the key as a secret: the same key, the same verified entries.
    monkeypatch.setenv("FEDBIP_CACHE_KEY", "ab" * 32)
    with InnerProductCache(tmp_path / "ci") as cache:
        cache.store({(b"a", b"b"): 1.5})
    with InnerProductCache(tmp_path / "ci") as cache:
        assert cache.lookup([b"a", b"b"]) == {(b"a", b"b"): 1.5}
    monkeypatch.setenv("FEDBIP_CACHE_KEY", "cd" * 32)
    with InnerProductCache(tmp_path / "ci") as cache:
        assert cache.lookup([b"a", b"b"]) == {} and cache.stats.rejected == 1
    monkeypatch.setenv("FEDBIP_CACHE_KEY", "abc")
    with pytest.raises(CacheError, match="not 64 hex digits") as caught:
        InnerProductCache(tmp_path / "ci")
    assert caught.value.where == "$FEDBIP_CACHE_KEY"

    monkeypatch.delenv("FEDBIP_CACHE_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cache" / "config"))  # a key the cache would carry
    with pytest.raises(CacheError, match="lies inside the cache directory"):
        InnerProductCache(tmp_path / "cache")


def test_a_format_1_cache_is_emptied_not_trusted(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / CACHE_FILE)
    db.executescript(
        "CREATE TABLE pairs (x BLOB NOT NULL, y BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (x, y)) WITHOUT ROWID;"
        "INSERT INTO pairs VALUES (x'61', x'62', x'000000000000e03f'); PRAGMA user_version = 1;"
    )
    db.close()
    with InnerProductCache(tmp_path) as cache:
        assert cache.lookup([b"a", b"b"]) == {}
        cache.store({(b"a", b"b"): 0.5})
    with InnerProductCache(tmp_path) as cache:
        assert cache.lookup([b"a", b"b"]) == {(b"a", b"b"): 0.5}


def test_a_full_disk_says_disk_full(tmp_path: Path) -> None:
    """SQLite ends the transaction itself on SQLITE_FULL; the error must name that cause, not the
    ROLLBACK that found no transaction. The disk is made full by capping the database's pages."""
    with InnerProductCache(tmp_path) as cache:
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count = {pages}")
        values = {(i.to_bytes(32, "big"), (i + 1).to_bytes(32, "big")): float(i) for i in range(2000)}
        with pytest.raises(CacheError) as caught:
            cache.store(values)
        assert caught.value.message == "cannot write the inner-product cache: disk full"
        assert caught.value.where == str(tmp_path / CACHE_FILE)
        assert not cache._db.in_transaction
        cache._db.execute("PRAGMA max_page_count = 1073741823")
        cache.store(values)  # the connection is still usable once space is back
        assert len(cache.lookup(sorted({k for pair in values for k in pair}))) == 2000
