"""A user's files are never destroyed: every way to point fedbip at a user's file or directory.

Each case puts fedbip's outputs (``--out``, ``--lock``, a config's ``out``/``lock``/``cache``,
``simulate --overwrite``/``--resume``) on something fedbip did not write, and must end in one error
line naming it, with every file of the user's left byte for byte as it was, whatever
``--overwrite`` says. fedbip replaces only what it can prove it wrote: a directory its manifest
(merge) or run record (simulate) accounts for, a lock file with a ``fedbip_lock`` field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli.cli import app
from tests.factories import random_adapter

SHAPES = {"model.layers.0.q_proj": (6, 5), "model.layers.1.q_proj": (6, 5)}
runner = CliRunner()


@dataclass
class Case:
    """``build(root)`` returns the arguments after ``fedbip``; ``names`` is what the error line must name."""

    id: str
    build: Callable[[Path], list[str]]
    names: str
    exit_code: int = 1


def user_files(root: Path) -> None:
    """What a user keeps: a project directory, a notes file, a dotfile in a home directory."""
    (root / "victim" / "src").mkdir(parents=True)
    (root / "victim" / "src" / "main.py").write_text("print('my work')\n")
    (root / "notes.txt").write_text("my notes\n")
    (root / "home").mkdir()
    (root / "home" / ".bashrc").write_text("export PATH=$PATH:~/bin\n")


def clients(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        random_adapter(root / "project" / "adapters" / f"c{i}", SHAPES, gen)
    return root / "project" / "adapters"


def merge(*options: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        return ["merge", str(clients(root)), "--no-cache", "--device", "cpu", *[o.format(root=root) for o in options]]

    return build


def config(text: str, sources: str = '["adapters/"]') -> Callable[[Path], list[str]]:
    """A config file in ``root/project`` (a hostile one: someone else's repository)."""

    def build(root: Path) -> list[str]:
        clients(root)
        (root / "project" / "fedbip.toml").write_text(f"sources = {sources}\n" + text)
        return ["merge", "--config", str(root / "project" / "fedbip.toml"), "--no-cache", "--device", "cpu"]

    return build


def symlinked(link: str, to: str, then: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(root / to)
        return then(root)

    return build


def merged_then_user_file(root: Path) -> list[str]:
    """A real merge output, into which the user then put a file of theirs."""
    first = runner.invoke(app, merge("--out", "{root}/merged")(root))
    assert first.exit_code == 0, first.output
    (root / "merged" / "README.md").write_text("my notes on this merge\n")
    return merge("--out", "{root}/merged", "--overwrite")(root)


def forged_manifest(root: Path) -> list[str]:
    """A manifest that claims the directory but lists none of the user's files."""
    (root / "victim" / "fedbip-manifest.json").write_text(json.dumps({"fedbip_manifest": 1, "outputs": {}}))
    return merge("--out", "{root}/victim", "--overwrite")(root)


def inspect(*options: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\nmy holiday")
        return ["inspect-similarity", str(clients(root)), "--no-cache", *[o.format(root=root) for o in options]]

    return build


def simulate(*options: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        (root / "victim" / "summary.json").write_text('{"mine": true}\n')
        (root / "victim" / "adapters").mkdir()
        (root / "victim" / "adapters" / "mine.txt").write_text("mine\n")
        small = ["--rounds", "1", "--clients", "2", "--num-layers", "1", "--device", "cpu"]
        return ["simulate", "--out", str(root / "victim"), *small, *options]

    return build


CASES = [
    Case("merge-out-user-dir", merge("--out", "{root}/victim"), "victim"),
    Case("merge-out-user-dir-overwrite", merge("--out", "{root}/victim", "--overwrite"), "src"),
    Case("merge-out-merged-plus-user-file-overwrite", merged_then_user_file, "README.md"),
    Case("merge-out-forged-manifest-overwrite", forged_manifest, "src"),
    Case(
        "merge-out-link-to-user-dir-overwrite",
        symlinked("link", "victim", merge("--out", "{root}/link", "--overwrite")),
        "src",
    ),
    Case("merge-lock-user-file", merge("--out", "{root}/new", "--lock", "{root}/notes.txt"), "notes.txt"),
    Case(
        "merge-lock-user-file-overwrite",
        merge("--out", "{root}/new", "--lock", "{root}/notes.txt", "--overwrite"),
        "notes.txt",
    ),
    Case(
        "merge-lock-link-to-user-file",
        symlinked("lk", "notes.txt", merge("--out", "{root}/new", "--lock", "{root}/lk")),
        "lk",
    ),
    Case("merge-lock-user-dir", merge("--out", "{root}/new", "--lock", "{root}/victim"), "victim"),
    Case("config-out-parent", config('out = "../victim"\noverwrite = true\n'), "out", 2),
    Case("config-out-absolute", config('out = "/tmp"\noverwrite = true\n'), "out", 2),
    Case("config-lock-home", config('out = "merged"\nlock = "~/.bashrc"\n'), "lock", 2),
    Case("config-lock-parent", config('out = "merged"\nlock = "../notes.txt"\n'), "lock", 2),
    Case("config-cache-parent", config('out = "merged"\ncache = "../victim"\n'), "cache", 2),
    Case(
        "config-out-link-outside",
        symlinked("project/link", "victim", config('out = "link"\noverwrite = true\n')),
        "out",
        2,
    ),
    Case("config-sources-stdin", config('out = "merged"\n', sources='["@/dev/stdin"]'), "sources", 2),
    Case("config-sources-parent", config('out = "merged"\n', sources='["../victim"]'), "sources", 2),
    Case("inspect-heatmap-user-image", inspect("--heatmap", "{root}/photo.png"), "photo.png"),
    Case("inspect-matrix-user-file", inspect("--matrix", "{root}/notes.txt"), "notes.txt"),
    Case("inspect-heatmap-link", symlinked("img.svg", "notes.txt", inspect("--heatmap", "{root}/img.svg")), "img.svg"),
    Case("simulate-overwrite-user-dir", simulate("--overwrite"), "summary.json"),
    Case("simulate-resume-user-dir", simulate("--resume"), "summary.json"),
]


def tree(root: Path) -> dict[str, bytes]:
    """Every file of the user's (not fedbip's inputs or the new output it may write elsewhere)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "project" not in p.parts
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_users_files_are_never_replaced(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    user_files(tmp_path)
    args = case.build(tmp_path)
    before = tree(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == case.exit_code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and case.names in lines[0], result.stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), result.stderr
    assert tree(tmp_path) == before
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fedbip-")]


def test_a_merge_still_replaces_its_own_output(tmp_path: Path) -> None:
    """The proof of ownership accepts what fedbip wrote: a previous merge and its lock file."""
    args = merge("--out", "{root}/merged", "--lock", "{root}/fedbip.lock")(tmp_path)
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["c0", "c1", "fedbip-manifest.json"]


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_inspect_still_replaces_its_own_heatmap_and_matrix(tmp_path: Path, suffix: str) -> None:
    heatmap, matrix = tmp_path / f"s{suffix}", tmp_path / "s.safetensors"
    args = [
        "inspect-similarity",
        str(clients(tmp_path)),
        "--no-cache",
        "--heatmap",
        str(heatmap),
        "--matrix",
        str(matrix),
    ]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert heatmap.is_file() and matrix.is_file()


def test_the_table_covers_every_way_to_name_an_output() -> None:
    """Guard against the table shrinking: each way to point fedbip at a path keeps cases."""
    ways = {
        "merge-out",
        "merge-lock",
        "config-out",
        "config-lock",
        "config-cache",
        "simulate-overwrite",
        "simulate-resume",
    }
    assert all(any(case.id.startswith(way) for case in CASES) for way in ways)
