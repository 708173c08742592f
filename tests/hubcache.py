"""Lay out a genuine huggingface_hub cache on disk, so that tests run the real Hub code offline.

The layout is the one ``snapshot_download`` / ``hf_hub_download`` write (huggingface_hub
``file_download.py``, ``_tree_cache.py``)::

    <cache_dir>/models--owner--repo/
        blobs/<etag>                       file contents; etag = sha256 for LFS files, git sha1 otherwise
        snapshots/<commit>/<path>          relative symlink to ../../blobs/<etag> (one more ../ per level)
        refs/<revision_name>               the commit hash, no newline
        trees/<commit>.json                the tree listing, used offline to detect incomplete snapshots

Offline, ``snapshot_download`` resolves a branch or tag through ``refs/``, takes a commit hash as is,
returns ``snapshots/<commit>`` and, when ``trees/<commit>.json`` exists, checks that every file
matching ``allow_patterns`` is present (else ``IncompleteSnapshotError``).

Use: ``commit = make_hub_cache(tmp_path / "hub", "owner/repo", {"adapter_config.json": b"{}"})``,
then ``use_offline_cache(monkeypatch, tmp_path / "hub")``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

# Files the Hub stores in Git LFS by default (its .gitattributes): their etag is the sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as etag and blob_id of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The Git LFS pointer file that git stores in place of an LFS file's contents."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


def blob_id(path: str, data: bytes) -> str:
    """A repository file's git blob id: of its LFS pointer for LFS files, else of its contents."""
    return git_blob_sha1(lfs_pointer(data) if path.endswith(LFS_SUFFIXES) else data)


def derived_commit(files: Mapping[str, bytes]) -> str:
    """A deterministic 40-hex commit hash for a set of repository files."""
    return hashlib.sha1(
        "".join(f"{path}\0{blob_id(path, files[path])}\0" for path in sorted(files)).encode()
    ).hexdigest()


def make_hub_cache(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, bytes],
    revision_name: str = "main",
    commit: str | None = None,
    *,
    missing: Collection[str] = (),
) -> str:
    """Write ``files`` as one commit of model repo ``repo_id`` in the Hub cache ``cache_dir``.

    Args:
        cache_dir: the cache root (what ``HF_HUB_CACHE`` points to).
        repo_id: ``owner/repo``.
        files: repository path (``/``-separated) -> contents.
        revision_name: the branch or tag whose ref is set to the commit (``refs/<revision_name>``).
        commit: the 40-hex commit hash; by default derived from the contents, so it is deterministic.
        missing: paths listed in the tree but absent from the snapshot, as after an interrupted download.

    Returns:
        The commit hash. Calling again with other files adds a commit; blobs are shared.
    """
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    tree: dict[str, dict[str, object]] = {}
    for path, data in sorted(files.items()):
        tree[path] = {"size": len(data), "blob_id": blob_id(path, data)}
        if path.endswith(LFS_SUFFIXES):
            tree[path].update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
    commit = commit or derived_commit(files)

    for path, data in files.items():
        if path in missing:
            continue
        entry = tree[path]
        blob = storage / "blobs" / str(entry.get("lfs_sha256", entry["blob_id"]))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))

    ref = storage / "refs" / revision_name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    trees = storage / "trees" / f"{commit}.json"
    trees.parent.mkdir(parents=True, exist_ok=True)
    trees.write_text(json.dumps({"format_version": 1, "files": tree}, indent=2))
    return commit


def repository_files(directories: Mapping[str, Path]) -> dict[str, bytes]:
    """The files of local directories as repository files: ``{"<folder>/<file name>": bytes}``.

    An empty folder name puts the files at the repository root.
    """
    return {
        f"{folder}/{f.name}".lstrip("/"): f.read_bytes()
        for folder, directory in directories.items()
        for f in sorted(directory.iterdir())
        if f.is_file()
    }


def use_offline_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Point huggingface_hub at ``cache_dir`` and forbid the network, for this test only.

    ``fedbip_cli.sources`` reads both variables at each call; a subprocess reads them at import.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
