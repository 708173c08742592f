"""``fedbip merge`` against a Hub reached over HTTP (a fake one on 127.0.0.1, ``HF_ENDPOINT``), so
that huggingface_hub's real network code runs and the server can tell which bytes were asked for:
a Hub ``--base`` is checked from its safetensors header alone, and ``--locked`` refuses a moved
branch before any weights are downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from factories import base_model_files, random_adapter
from fakehub import FakeHub, FileRequest
from hubcache import make_hub_cache, repository_files
from safetensors import safe_open
from safetensors.torch import load, save
from tinybase import full_bert

ROOT = Path(__file__).resolve().parent.parent  # `python -m fedbip_cli` run here imports this checkout's package
# Wide enough that the base's weights (2 x 64 x 48 float32 = 24 KiB) dwarf its header (~200 bytes).
SHAPES = {"encoder.layer.0.attention.self.query": (64, 48), "encoder.layer.1.attention.self.value": (64, 48)}


def adapters(root: Path, seed: int) -> dict[str, bytes]:
    """Two adapters ``a/`` and ``b/`` as repository files."""
    made = {
        name: random_adapter(root / f"seed{seed}" / name, SHAPES, torch.Generator().manual_seed(seed + i))
        for i, name in enumerate("ab")
    }
    return repository_files(made)


def base(shapes: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """A base model's files: ``config.json`` and ``model.safetensors``."""
    return base_model_files(shapes, {"model_type": "bert"})


def header_end(data: bytes) -> int:
    """Where a safetensors file's header ends: its 8-byte length, plus that length."""
    return 8 + int.from_bytes(data[:8], "little")


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


class Run:
    """``fedbip merge`` in a subprocess pointed at ``hub``: online (no HF_HUB_OFFLINE), with a fresh HF_HOME."""

    def __init__(self, hub: FakeHub, tmp_path: Path) -> None:
        self.hf_home = tmp_path / "hf-home"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(self.hf_home),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
            "COLUMNS": "200",
        }

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fedbip_cli", "merge", *args]
        return subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)


def only_headers_read(hub: FakeHub, repo_id: str, files: dict[str, bytes]) -> list[FileRequest]:
    """Assert that every request for the weights of ``repo_id`` was a GET of a range within the header; return them."""
    requests = [r for r in hub.file_requests(".safetensors") if r.repo_id == repo_id]
    for request in requests:
        end = header_end(files[request.file])
        assert request.method == "GET" and request.range is not None, request
        assert request.end <= end < len(files[request.file]), (request, end)
    return requests


def test_dry_run_reads_only_the_header_of_a_hub_base(hub: FakeHub, tmp_path: Path) -> None:
    adapters_commit = hub.push("org/adapters", adapters(tmp_path / "build", seed=0))
    wide = {name: (out + 16, inp) for name, (out, inp) in SHAPES.items()}
    wrong_files = base(wide)
    hub.push("org/base", wrong_files)
    run = Run(hub, tmp_path)

    refused = run("hf://org/adapters", "--base", "hf://org/base", "--out", str(tmp_path / "merged"), "--dry-run")
    assert refused.returncode == 1, refused.stderr
    assert (
        "module encoder.layer.0.attention.self.query: the factors imply a weight of shape [64, 48], the base has [80, 48]"
        in refused.stderr
    )
    assert "another model than hf://org/base" in refused.stderr and "Traceback" not in refused.stderr
    read = only_headers_read(hub, "org/base", wrong_files)
    assert sorted(r.range for r in read) == ["bytes=0-7", f"bytes=8-{header_end(wrong_files['model.safetensors']) - 1}"]

    right_files = base(SHAPES)
    base_commit = hub.push("org/base", right_files)  # main moves to a base of the right width
    hub.requests.clear()
    planned = run("hf://org/adapters", "--base", "hf://org/base", "--out", str(tmp_path / "merged"), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert f"checked against the base hf://org/base at commit {base_commit}" in planned.stdout
    assert f"hf://org/adapters/a @ {adapters_commit[:12]}" in planned.stdout
    read = only_headers_read(hub, "org/base", right_files)
    served = sum(r.end - r.start for r in read)
    assert served == header_end(right_files["model.safetensors"]) < len(right_files["model.safetensors"]) // 50
    assert not (tmp_path / "merged").exists()
    assert {p.name for p in run.hf_home.glob("hub/models--org--base/snapshots/*/*")} == {"config.json"}  # no weights


def test_a_cached_base_is_read_from_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    hub.push("org/adapters", adapters(tmp_path / "build", seed=0))
    files = base(SHAPES)
    commit = hub.push("org/base", files)
    run = Run(hub, tmp_path)
    assert make_hub_cache(run.hf_home / "hub", "org/base", files) == commit  # as downloaded by an earlier run

    result = run(
        "hf://org/adapters", "--base", "hf://org/base", "--out", str(tmp_path / "merged"), "--dry-run", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["base"] == {"source": "hf://org/base", "revision": commit}
    assert [r for r in hub.file_requests() if r.repo_id == "org/base"] == []  # nothing of the base: all cached


def test_locked_refuses_a_moved_branch_before_downloading_weights(hub: FakeHub, tmp_path: Path) -> None:
    hub.push("org/adapters", adapters(tmp_path / "build", seed=0))
    base_files = base(SHAPES)
    hub.push("org/base", base_files)
    run = Run(hub, tmp_path)
    lock = tmp_path / "fedbip.lock"
    common = (
        "hf://org/adapters",
        "--base",
        "hf://org/base",
        "--out",
        str(tmp_path / "merged"),
        "--lock",
        str(lock),
        "--no-cache",
    )

    merged = run(*common)
    assert merged.returncode == 0, merged.stderr
    downloads = [r for r in hub.file_requests("adapter_model.safetensors") if r.method == "GET"]
    assert len(downloads) == 2 and all(r.range is None for r in downloads)  # a merge downloads the adapters' weights
    only_headers_read(hub, "org/base", base_files)  # and, of the base, the header alone

    moved = hub.push("org/adapters", adapters(tmp_path / "build", seed=10))
    hub.requests.clear()
    for extra in (("--dry-run",), ()):
        refused = run(*common, "--locked", *extra)
        assert refused.returncode == 1, refused.stderr
        assert f"hf://org/adapters (client a): resolves to commit {moved}; {lock} pins" in refused.stderr
    assert hub.file_requests("adapter_config.json"), "the configs are fetched: they resolve the commit"
    assert hub.file_requests(".safetensors") == []


def test_dry_run_over_hub_checkpoints_reads_only_headers(hub: FakeHub, tmp_path: Path) -> None:
    """Full fine-tuned checkpoints and their base on the Hub: a dry run plans them from their
    safetensors headers, fetching no weight byte of any of them, and still refuses a mismatch."""
    full = full_bert(tmp_path / "build")
    clients = repository_files({name: full.checkpoints / name for name in full.clients})
    ft_commit = hub.push("org/ft", clients)
    base_files = repository_files({"": full.base})
    base_commit = hub.push("org/base", base_files)
    run = Run(hub, tmp_path)

    planned = run(
        "hf://org/ft",
        "--base",
        "hf://org/base",
        "--out",
        str(tmp_path / "merged"),
        "--dry-run",
        "--json",
        "--to-lora",
        "2",
    )
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert [c["name"] for c in plan["clients"]] == full.clients
    assert {c["revision"] for c in plan["clients"]} == {ft_commit}
    assert plan["base"] == {"source": "hf://org/base", "revision": base_commit}
    with safe_open(str(full.base / "model.safetensors"), framework="pt") as f:
        assert plan["tensors"] == len(list(f.keys())) and all(c["tensors"] == plan["tensors"] for c in plan["clients"])
    assert plan["lora_modules"] > 0  # the architecture came from the base's config.json alone
    for repo, files in (("org/ft", clients), ("org/base", base_files)):
        read = only_headers_read(hub, repo, files)
        weights = [name for name in files if name.endswith(".safetensors")]
        assert sorted({r.file for r in read}) == sorted(weights)  # every header, and no more than headers
    cached = {p.name for p in run.hf_home.glob("hub/models--org--*/snapshots/*/**/*") if p.is_file()}
    assert cached and not any(name.endswith(".safetensors") for name in cached)
    assert not (tmp_path / "merged").exists()

    # A client whose weight has another shape than the base's is refused, still from headers alone.
    odd = dict(clients)
    name = f"{full.clients[0]}/model.safetensors"
    tensors = load(odd[name])
    first = sorted(n for n, t in tensors.items() if t.ndim == 2)[0]
    tensors[first] = torch.zeros(tensors[first].shape[0] + 1, tensors[first].shape[1])
    odd[name] = save(tensors)
    hub.push("org/ft", odd)
    hub.requests.clear()
    refused = run("hf://org/ft", "--base", "hf://org/base", "--out", str(tmp_path / "merged"), "--dry-run")
    assert (
        refused.returncode == 1 and f"tensor {first} has shape" in refused.stderr and "Traceback" not in refused.stderr
    )
    only_headers_read(hub, "org/ft", odd)
