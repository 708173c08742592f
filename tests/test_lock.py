"""Lock files: ``--lock`` records what every source resolved to, ``--locked`` refuses inputs that
moved. Hub sources go through huggingface_hub's real offline cache code; a second commit on
``main`` is a branch that moved."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from factories import base_model_files, random_adapter
from hubcache import make_hub_cache, repository_files, use_offline_cache
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.errors import LockError
from fedbip_cli.lockfile import read_lock

SHAPES = {"encoder.layer.0.attention.self.query": (8, 6), "encoder.layer.1.attention.self.value": (8, 6)}
runner = CliRunner()


def adapter_files(root: Path, names: list[str], seed: int) -> dict[str, bytes]:
    """Adapters ``names`` as repository files ``<name>/adapter_*``."""
    return repository_files(
        {
            name: random_adapter(root / f"seed{seed}" / name, SHAPES, torch.Generator().manual_seed(seed + i))
            for i, name in enumerate(names)
        }
    )


def base_files(hidden: int) -> dict[str, bytes]:
    return base_model_files(SHAPES, {"hidden_size": hidden})


class Project:
    """A pipeline repository: fedbip.toml naming a Hub repository of two adapters, a local adapter, a Hub base."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.hub = tmp_path / "hub"
        use_offline_cache(monkeypatch, self.hub)
        self.commit = make_hub_cache(self.hub, "org/adapters", adapter_files(tmp_path / "build", ["a", "b"], seed=0))
        self.base_commit = make_hub_cache(self.hub, "org/base", base_files(8))
        self.root = tmp_path / "project"
        random_adapter(self.root / "local" / "c", SHAPES, torch.Generator().manual_seed(7))
        self.config = self.root / "fedbip.toml"
        self.config.write_text(
            'sources = ["hf://org/adapters", "local/"]\nbase = "hf://org/base"\nout = "merged"\n'
            'lock = "fedbip.lock"\noverwrite = true\ncache = false\n'
        )
        self.lock = self.root / "fedbip.lock"

    def merge(self, *args: str):
        return runner.invoke(app, ["merge", "--config", str(self.config), *args])

    def move_main(self, *, fetched: bool = True) -> str:
        """Push a second commit to org/adapters main: b retrained. ``fetched=False``: only its configs are in the cache."""
        files = adapter_files(self.tmp / "build", ["a"], seed=0) | adapter_files(self.tmp / "build2", ["b"], seed=50)
        weights = set() if fetched else {f for f in files if f.endswith(".safetensors")}
        return make_hub_cache(self.hub, "org/adapters", files, missing=weights)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    return Project(tmp_path, monkeypatch)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lock_records_commits_and_file_hashes(project: Project) -> None:
    result = project.merge("--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lock"] == {"file": str(project.lock), "locked": False, "written": True}

    lock = json.loads(project.lock.read_text())
    assert lock["fedbip_lock"] == 1
    assert list(lock["sources"]) == ["hf://org/adapters", "local/"]  # as written in the config: portable
    hub = lock["sources"]["hf://org/adapters"]
    assert sorted(hub) == ["a", "b"] and {entry["revision"] for entry in hub.values()} == {project.commit}
    snapshot = project.hub / "models--org--adapters" / "snapshots" / project.commit
    assert hub["b"]["files"] == {
        f: sha256(snapshot / "b" / f) for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    local = lock["sources"]["local/"]["c"]
    assert local["revision"] is None
    assert local["files"]["adapter_model.safetensors"] == sha256(
        project.root / "local" / "c" / "adapter_model.safetensors"
    )
    assert lock["base"] == {"spec": "hf://org/base", "revision": project.base_commit}
    manifest = json.loads((project.root / "merged" / "fedbip-manifest.json").read_text())
    assert [i["revision"] for i in manifest["inputs"]] == [project.commit, project.commit, None]


def test_locked_refuses_a_moved_revision(project: Project) -> None:
    assert project.merge().exit_code == 0
    locked_bytes = project.lock.read_bytes()
    manifest = project.root / "merged" / "fedbip-manifest.json"

    result = project.merge("--locked", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lock"] == {"file": str(project.lock), "locked": True, "written": False}
    assert project.lock.read_bytes() == locked_bytes
    before = manifest.read_bytes()

    moved = project.move_main()
    assert moved != project.commit
    for args in (("--locked",), ("--locked", "--dry-run")):
        refused = project.merge(*args)
        assert refused.exit_code == 1, refused.output
        assert "hf://org/adapters (client a)" in refused.stderr
        assert f"resolves to commit {moved}" in refused.stderr and f"pins {project.commit}" in refused.stderr
        assert "without --locked" in refused.stderr and "Traceback" not in refused.output
    assert manifest.read_bytes() == before and project.lock.read_bytes() == locked_bytes

    # Accepting the move: a run without --locked rewrites the lock, and --locked passes again.
    assert project.merge().exit_code == 0
    assert {e["revision"] for e in json.loads(project.lock.read_text())["sources"]["hf://org/adapters"].values()} == {
        moved
    }
    assert project.merge("--locked").exit_code == 0


def test_locked_refuses_a_moved_revision_before_fetching_its_weights(project: Project) -> None:
    """The new commit's weights are not in the (offline) cache: any attempt to fetch them would fail.
    --locked refuses on the commit alone; without --locked the weights are needed, and missed."""
    assert project.merge().exit_code == 0
    moved = project.move_main(fetched=False)
    for args in (("--locked",), ("--locked", "--dry-run")):
        refused = project.merge(*args)
        assert refused.exit_code == 1, refused.output
        assert "hf://org/adapters (client a)" in refused.stderr and f"resolves to commit {moved}" in refused.stderr
        assert "partly downloaded" not in refused.stderr
    unlocked = project.merge("--dry-run")
    assert unlocked.exit_code == 1 and "partly downloaded" in unlocked.stderr


def test_locked_refuses_a_moved_base_before_reading_it(project: Project) -> None:
    assert project.merge().exit_code == 0
    moved = make_hub_cache(project.hub, "org/base", base_files(16), missing={"model.safetensors"})
    refused = project.merge("--locked", "--dry-run")
    assert refused.exit_code == 1 and f"the base resolves to hf://org/base at {moved}" in refused.stderr
    unlocked = project.merge("--dry-run")  # the header of the new commit's weights is needed, and not cached
    assert unlocked.exit_code == 1 and "model.safetensors is not in the local Hub cache" in unlocked.stderr


def test_a_pinned_revision_does_not_move(project: Project) -> None:
    project.config.write_text(
        project.config.read_text().replace("hf://org/adapters", f"hf://org/adapters@{project.commit}")
    )
    assert project.merge().exit_code == 0
    project.move_main()
    result = project.merge("--locked", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["clients"] == ["a", "b", "c"]


def test_locked_refuses_changed_or_added_local_adapters(project: Project) -> None:
    assert project.merge().exit_code == 0
    random_adapter(project.root / "local" / "c", SHAPES, torch.Generator().manual_seed(8))  # retrained in place
    changed = project.merge("--locked")
    assert changed.exit_code == 1
    assert "local/ (client c)" in changed.stderr and "adapter_model.safetensors has sha256" in changed.stderr

    assert project.merge().exit_code == 0
    random_adapter(project.root / "local" / "d", SHAPES, torch.Generator().manual_seed(9))
    added = project.merge("--locked")
    assert added.exit_code == 1 and "local/" in added.stderr and "'d'" in added.stderr


def test_locked_refuses_a_moved_base_and_new_sources(project: Project) -> None:
    assert project.merge().exit_code == 0
    moved = make_hub_cache(project.hub, "org/base", base_files(16))
    result = project.merge("--locked")
    assert result.exit_code == 1
    assert "hf://org/base" in result.stderr and moved in result.stderr and project.base_commit in result.stderr

    extra = project.tmp / "extra"
    random_adapter(extra / "e", SHAPES, torch.Generator().manual_seed(11))
    result = runner.invoke(
        app,
        [
            "merge",
            str(project.root / "local"),
            str(extra),
            "--out",
            str(project.tmp / "o"),
            "--lock",
            str(project.lock),
            "--locked",
        ],
    )
    assert result.exit_code == 1 and "is not in the lock file" in result.stderr


def test_lock_file_problems(project: Project) -> None:
    missing = project.merge("--locked")
    assert missing.exit_code == 1 and "no lock file" in missing.stderr and "without --locked" in missing.stderr
    project.lock.write_text("{not json")
    assert project.merge("--locked").exit_code == 1
    project.lock.write_text(json.dumps({"fedbip_lock": 99, "sources": {}}))
    result = project.merge("--locked")
    assert result.exit_code == 1 and "not a fedbip lock file" in result.stderr
    result = runner.invoke(app, ["merge", str(project.root / "local"), "--out", str(project.tmp / "o"), "--locked"])
    assert result.exit_code == 2 and "--locked needs a lock file" in result.stderr
    assert not (project.root / "merged").exists()


SHA = "0" * 64
GOOD = {"fedbip_lock": 1, "sources": {"a/": {"c0": {"revision": None, "files": {"x": SHA}}}}, "base": None}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(base="hf://org/base"), 'base = "hf://org/base": expected null or {"spec"'),
        (lambda d: d.pop("base"), "missing field base"),
        (lambda d: d.pop("sources"), "missing field sources"),
        (lambda d: d.update(extra=1), "unknown field extra"),
        (lambda d: d.update(fedbip_lock=True), "not a fedbip lock file"),
        (lambda d: d.update(sources=[]), "sources = []: expected an object"),
        (lambda d: d["sources"].update({"a/": ["c0"]}), 'sources["a/"] = ["c0"]: expected an object'),
        (lambda d: d["sources"]["a/"].update(c0="abc"), 'sources["a/"]["c0"] = "abc": expected an object'),
        (lambda d: d["sources"]["a/"]["c0"].pop("revision"), 'missing field sources["a/"]["c0"].revision'),
        (lambda d: d["sources"]["a/"]["c0"].update(revision=3), 'sources["a/"]["c0"].revision = 3: expected a commit'),
        (lambda d: d["sources"]["a/"]["c0"].update(files=[]), 'sources["a/"]["c0"].files = []: expected an object'),
        (
            lambda d: d["sources"]["a/"]["c0"]["files"].update(x=1),
            'sources["a/"]["c0"].files["x"] = 1: expected a sha256',
        ),
        (lambda d: d.update(base={"spec": "hf://o/b"}), "missing field base.revision"),
        (lambda d: d.update(base={"spec": "hf://o/b", "revision": 7}), "base.revision = 7: expected a commit"),
    ],
)
def test_malformed_lock_files_name_the_file_and_the_field(tmp_path: Path, edit, message: str) -> None:
    data = json.loads(json.dumps(GOOD))
    assert read_lock(write(tmp_path / "good.lock", data)) == GOOD
    edit(data)
    path = write(tmp_path / "bad.lock", data)
    with pytest.raises(LockError) as caught:
        read_lock(path)
    assert caught.value.where == str(path)
    assert message in caught.value.message, caught.value.message


def test_lock_files_are_read_bounded(tmp_path: Path) -> None:
    deep = tmp_path / "deep.lock"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LockError, match="more than 64 deep"):
        read_lock(deep)
    (tmp_path / "dir.lock").mkdir()
    with pytest.raises(LockError, match="is a directory"):
        read_lock(tmp_path / "dir.lock")
    with pytest.raises(LockError, match="character device"):
        read_lock(Path("/dev/zero"))


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path
