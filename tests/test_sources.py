"""Tests of SOURCES resolution: local directories, @lists, and hf:// through the real Hub cache code."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from hubcache import make_hub_cache, use_offline_cache
from huggingface_hub import constants as hub_constants
from safetensors.torch import save

from fedbip_cli.errors import SourceError
from fedbip_cli.sources import (
    FULL,
    LORA,
    HubRef,
    ResolvedSource,
    fetch_weights,
    model_shapes,
    pinned_spec,
    resolve_model_dir,
    resolve_revision,
    resolve_sources,
    resolve_specs,
)

CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}).encode()
WEIGHTS = b"not parsed by sources"


def adapter(directory: Path) -> Path:
    """A minimal adapter directory (sources only looks for adapter_config.json)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_bytes(CONFIG)
    (directory / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return directory


def checkpoint(directory: Path) -> Path:
    """A minimal fine-tuned model directory (sources only looks for config.json)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_bytes(b"{}")
    (directory / "model.safetensors").write_bytes(WEIGHTS)
    return directory


def names(sources: list[ResolvedSource]) -> list[str]:
    return [s.name for s in sources]


# --- local directories -------------------------------------------------------------------------


def test_directory_of_adapters_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ("zeta", "alpha", "mid", ".hidden"):
        adapter(tmp_path / "clients" / name)
    (tmp_path / "clients" / "notes").mkdir()
    (tmp_path / "clients" / "README.md").write_text("not an adapter")

    sources = resolve_sources(["clients"], base_dir=tmp_path)

    assert names(sources) == ["alpha", "mid", "zeta"]
    for source in sources:
        assert source.path == (tmp_path / "clients" / source.name).resolve()
        assert source.path.is_absolute()
        assert source.origin == f"clients/{source.name}"  # as given, joined with the client's directory
        assert source.revision is None


def test_single_adapter_directories_keep_order(tmp_path: Path) -> None:
    b = adapter(tmp_path / "b")
    a = adapter(tmp_path / "x" / "a")

    sources = resolve_sources([str(b), "x/a/"], base_dir=tmp_path)

    assert sources == [
        ResolvedSource("b", b.resolve(), str(b)),
        ResolvedSource("a", a.resolve(), "x/a/"),
    ]


def test_dot_names_the_client_after_the_directory(tmp_path: Path) -> None:
    adapter(tmp_path / "solo")
    assert names(resolve_sources(["."], base_dir=tmp_path / "solo")) == ["solo"]


def test_directory_without_adapters(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    adapter(tmp_path / "empty" / ".hidden")
    with pytest.raises(SourceError) as info:
        resolve_sources(["empty"], base_dir=tmp_path)
    assert info.value.where == "empty"
    assert "adapter_config.json" in info.value.hint


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        resolve_sources(["nope"], base_dir=tmp_path)
    assert info.value.message == "no such file or directory"
    assert "@FILE" in info.value.hint and "hf://" in info.value.hint


def test_kinds_of_clients(tmp_path: Path) -> None:
    checkpoint(tmp_path / "mixed" / "full-b")
    adapter(tmp_path / "mixed" / "lora-a")
    (tmp_path / "mixed" / "notes").mkdir()
    solo = checkpoint(tmp_path / "solo")

    sources = resolve_sources(["mixed", "solo"], base_dir=tmp_path)

    assert [(s.name, s.kind) for s in sources] == [("full-b", FULL), ("lora-a", LORA), ("solo", FULL)]
    assert sources[2].path == solo.resolve()
    # A directory holding adapter_config.json is an adapter even beside a config.json.
    (tmp_path / "mixed" / "lora-a" / "config.json").write_bytes(b"{}")
    assert resolve_sources(["mixed/lora-a"], base_dir=tmp_path)[0].kind == LORA


def test_file_is_not_a_source(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(SourceError, match="not a directory"):
        resolve_sources(["weights.safetensors"], base_dir=tmp_path)


def test_duplicate_names_are_listed(tmp_path: Path) -> None:
    adapter(tmp_path / "one" / "a")
    adapter(tmp_path / "one" / "b")
    adapter(tmp_path / "two" / "a")
    with pytest.raises(SourceError) as info:
        resolve_sources(["one", "two"], base_dir=tmp_path)
    message = info.value.message
    assert "'a'" in message and "'b'" not in message
    assert "one/a" in message and "two/a" in message
    assert "rename" in info.value.hint


# --- @lists ------------------------------------------------------------------------------------


def test_list_with_comments_relative_paths_and_nesting(tmp_path: Path) -> None:
    adapter(tmp_path / "lists" / "near")
    adapter(tmp_path / "far" / "f1")
    adapter(tmp_path / "far" / "f2")
    adapter(tmp_path / "lists" / "inner" / "deep")
    (tmp_path / "lists" / "inner" / "more.txt").write_text("deep  # relative to inner/\n", encoding="utf-8")
    (tmp_path / "lists" / "main.txt").write_text(
        "# clients of the March run\n\nnear\n   ../far   # a directory of adapters\n@inner/more.txt\n",
        encoding="utf-8",
    )

    sources = resolve_sources(["@lists/main.txt"], base_dir=tmp_path)

    assert names(sources) == ["near", "f1", "f2", "deep"]
    assert sources[-1].path == (tmp_path / "lists" / "inner" / "deep").resolve()


def test_list_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("@b.txt\n")
    (tmp_path / "b.txt").write_text("# back to a\n@a.txt\n")
    with pytest.raises(SourceError) as info:
        resolve_sources(["@a.txt"], base_dir=tmp_path)
    assert "includes itself" in str(info.value)
    assert info.value.where == f"{tmp_path / 'a.txt'}:1"
    assert f"{tmp_path / 'b.txt'}:2" in str(info.value)


def test_list_error_names_file_and_line(tmp_path: Path) -> None:
    adapter(tmp_path / "ok")
    (tmp_path / "list.txt").write_text("ok\n\nmissing\n")
    with pytest.raises(SourceError) as info:
        resolve_sources(["@list.txt"], base_dir=tmp_path)
    assert info.value.where == f"{tmp_path / 'list.txt'}:3"
    assert "missing: no such file or directory" in info.value.message


def test_missing_list_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="the @list file does not exist") as info:
        resolve_sources(["@absent.txt"], base_dir=tmp_path)
    assert info.value.where == str(tmp_path / "absent.txt")


# --- HubRef ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("hf://owner/repo", HubRef("owner/repo")),
        ("hf://owner/repo@v1.0", HubRef("owner/repo", "v1.0")),
        ("hf://owner/repo/sub/dir", HubRef("owner/repo", None, "sub/dir")),
        ("hf://owner/repo@main/sub", HubRef("owner/repo", "main", "sub")),
        ("hf://owner/repo@refs%2Fpr%2F3/sub", HubRef("owner/repo", "refs/pr/3", "sub")),
    ],
)
def test_hubref_round_trip(text: str, ref: HubRef) -> None:
    assert HubRef.parse(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "hf://",
        "hf://onlyowner",
        "hf://owner/",
        "hf:///repo",
        "hf://owner/repo@",
        "hf://owner/repo/",
        "hf://owner/repo/a//b",
        "hf://owner/repo/../x",
        "hf://owner/re po",
        "owner/repo",
    ],
)
def test_hubref_malformed(text: str) -> None:
    with pytest.raises(SourceError) as info:
        HubRef.parse(text)
    assert info.value.where == text
    assert "hf://owner/repo" in info.value.hint


# --- hf:// through the real huggingface_hub cache ----------------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    use_offline_cache(monkeypatch, cache)
    return cache


ADAPTER = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


def test_hub_repo_root(hub: Path) -> None:
    commit = make_hub_cache(hub, "owner/repo", {**ADAPTER, "README.md": b"# card"})

    [source] = resolve_sources(["hf://owner/repo"])

    assert source == ResolvedSource(
        "repo", hub.resolve() / "models--owner--repo" / "snapshots" / commit, "hf://owner/repo", commit
    )
    assert (source.path / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_hub_subfolder_at_branch(hub: Path) -> None:
    commit = make_hub_cache(hub, "owner/repo", {f"sub/{k}": v for k, v in ADAPTER.items()})

    [source] = resolve_sources(["hf://owner/repo@main/sub"])

    assert (source.name, source.origin, source.revision) == ("sub", "hf://owner/repo@main/sub", commit)
    assert json.loads((source.path / "adapter_config.json").read_text()) == json.loads(CONFIG)


def test_hub_pinned_commit_is_not_the_branch_head(hub: Path) -> None:
    old = make_hub_cache(hub, "owner/repo", {**ADAPTER, "adapter_model.safetensors": b"old"})
    new = make_hub_cache(hub, "owner/repo", ADAPTER)
    assert old != new

    [pinned] = resolve_sources([f"hf://owner/repo@{old}"])
    [head] = resolve_sources(["hf://owner/repo"])

    assert (pinned.revision, head.revision) == (old, new)
    assert (pinned.path / "adapter_model.safetensors").read_bytes() == b"old"


def test_hub_folder_of_adapters_expands(hub: Path, tmp_path: Path) -> None:
    files = {f"clients/{c}/{k}": v for c in ("b", "a") for k, v in ADAPTER.items()}
    commit = make_hub_cache(hub, "owner/repo", {**files, "clients/notes/x.txt": b"x"})
    adapter(tmp_path / "local")

    sources = resolve_sources(["local", "hf://owner/repo/clients"], base_dir=tmp_path)

    assert names(sources) == ["local", "a", "b"]
    assert [s.origin for s in sources[1:]] == ["hf://owner/repo/clients/a", "hf://owner/repo/clients/b"]
    assert {s.revision for s in sources[1:]} == {commit}


def test_hub_full_checkpoints_fetch_their_weights(hub: Path) -> None:
    shards = {
        "model.safetensors.index.json": b"{}",
        "model-00001-of-00002.safetensors": b"1",
        "model-00002-of-00002.safetensors": b"2",
    }
    files = {
        **{
            f"ft/one/{k}": v
            for k, v in {"config.json": b"{}", "model.safetensors": WEIGHTS, "pytorch_model.bin": b"x"}.items()
        },
        **{f"ft/two/{k}": v for k, v in {"config.json": b"{}", **shards}.items()},
    }
    # An interrupted download of the pickle does not matter: it is never fetched.
    commit = make_hub_cache(hub, "owner/ft", files, missing={"ft/one/pytorch_model.bin"})

    sources = resolve_sources(["hf://owner/ft/ft"])

    assert [(s.name, s.kind, s.revision) for s in sources] == [("one", FULL, commit), ("two", FULL, commit)]
    assert (sources[0].path / "model.safetensors").read_bytes() == WEIGHTS
    assert (sources[1].path / "model-00002-of-00002.safetensors").read_bytes() == b"2"
    # A missing shard does: the weights of a full checkpoint are fetched.
    make_hub_cache(hub, "owner/ft-2", files, missing={"ft/two/model-00002-of-00002.safetensors"})
    with pytest.raises(SourceError, match="partly downloaded"):
        resolve_sources(["hf://owner/ft-2/ft"])


def test_hub_configs_first_then_weights_at_the_same_commit(hub: Path) -> None:
    """Without weights, a Hub client's commit is known from its config alone; the weights come after."""
    files = {f"{c}/{k}": v for c in ("a", "b") for k, v in ADAPTER.items()}
    commit = make_hub_cache(
        hub, "owner/repo", files, missing={"a/adapter_model.safetensors", "b/adapter_model.safetensors"}
    )

    [(spec, sources)] = resolve_specs(["hf://owner/repo"], weights=False)

    assert spec == "hf://owner/repo" and [(s.name, s.revision) for s in sources] == [("a", commit), ("b", commit)]
    assert not (sources[0].path / "adapter_model.safetensors").exists()
    with pytest.raises(SourceError, match="partly downloaded") as info:
        fetch_weights(sources)  # the weights were needed, and are not there
    assert info.value.where == "hf://owner/repo"
    with pytest.raises(SourceError, match="partly downloaded"):
        resolve_specs(["hf://owner/repo"])  # the default fetches them at once

    make_hub_cache(hub, "owner/repo", files)  # the download completed
    fetch_weights(sources)
    assert (sources[1].path / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_hub_repo_not_in_cache_offline(hub: Path) -> None:
    with pytest.raises(SourceError) as info:
        resolve_sources(["hf://owner/absent"])
    assert info.value.where == "hf://owner/absent"
    assert "HF_HUB_OFFLINE" in info.value.message
    assert "run once online" in info.value.hint


def test_hub_revision_not_in_cache_offline(hub: Path) -> None:
    make_hub_cache(hub, "owner/repo", ADAPTER)
    for revision in ("v2", "0" * 40):
        with pytest.raises(SourceError, match="revision .* not in the local Hub cache"):
            resolve_sources([f"hf://owner/repo@{revision}"])


def test_hub_interrupted_download_is_reported(hub: Path) -> None:
    make_hub_cache(hub, "owner/repo", ADAPTER, missing={"adapter_model.safetensors"})
    with pytest.raises(SourceError, match="repository not in the local Hub cache .*partly downloaded"):
        resolve_sources(["hf://owner/repo"])


def test_hub_without_adapter(hub: Path) -> None:
    make_hub_cache(hub, "owner/repo", {"README.md": b"no adapter here"})
    with pytest.raises(SourceError, match="no adapter_config.json") as info:
        resolve_sources(["hf://owner/repo"])
    assert info.value.where == "hf://owner/repo"


def test_hub_missing_subfolder(hub: Path) -> None:
    make_hub_cache(hub, "owner/repo", ADAPTER)
    with pytest.raises(SourceError, match="no folder 'nested'"):
        resolve_sources(["hf://owner/repo/nested"])


def test_hub_duplicates_with_local(hub: Path, tmp_path: Path) -> None:
    make_hub_cache(hub, "owner/repo", ADAPTER)
    adapter(tmp_path / "repo")
    with pytest.raises(SourceError, match="duplicate client names.*'repo'"):
        resolve_sources(["repo", "hf://owner/repo"], base_dir=tmp_path)


# --- --base ------------------------------------------------------------------------------------


def test_model_dir_local_and_hub(hub: Path, tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    assert resolve_model_dir(str(tmp_path / "base")) == ((tmp_path / "base").resolve(), None)

    commit = make_hub_cache(hub, "owner/base", {"m/config.json": b"{}", "m/model.safetensors": WEIGHTS})
    path, revision = resolve_model_dir("hf://owner/base/m")
    assert revision == commit
    assert (path / "model.safetensors").read_bytes() == WEIGHTS


def safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    return save({name: torch.zeros(shape) for name, shape in shapes.items()})


def test_model_shapes_from_headers_local_and_hub(hub: Path, tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes({"q.weight": (8, 6), "q.bias": (8,)}))
    local = model_shapes("base", base_dir=tmp_path)
    assert (local.where, local.revision, local.shapes) == (
        str(tmp_path / "base"),
        None,
        {"q.weight": [8, 6], "q.bias": [8]},
    )
    assert local.dtypes == {"q.weight": "F32", "q.bias": "F32"} and local.directory == tmp_path / "base"
    assert local.files == {"q.weight": "model.safetensors", "q.bias": "model.safetensors"}
    assert resolve_revision(str(tmp_path / "base")) is None

    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": (4, 2)},
        "model-00002-of-00002.safetensors": {"b.weight": (3, 5)},
    }
    index = {"metadata": {}, "weight_map": {t: f for f, tensors in shards.items() for t in tensors}}
    files = {f"m/{f}": safetensors_bytes(tensors) for f, tensors in shards.items()}
    commit = make_hub_cache(
        hub,
        "owner/base",
        {"m/config.json": b"{}", "m/model.safetensors.index.json": json.dumps(index).encode(), **files},
    )
    assert resolve_revision("hf://owner/base/m") == commit
    shapes = model_shapes("hf://owner/base/m", revision=commit)
    assert (shapes.where, shapes.revision, shapes.shapes) == (
        "hf://owner/base/m",
        commit,
        {"a.weight": [4, 2], "b.weight": [3, 5]},
    )
    assert shapes.files == {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    assert (
        shapes.directory is not None and shapes.directory.name == "m" and (shapes.directory / "config.json").is_file()
    )


def test_model_shapes_offline_without_the_weights(hub: Path) -> None:
    """Offline, headers come from the cache: a base whose weights were never fetched is reported, naming the file."""
    commit = make_hub_cache(
        hub, "owner/base", {"config.json": b"{}", "model.safetensors": WEIGHTS}, missing={"model.safetensors"}
    )
    assert resolve_revision("hf://owner/base") == commit  # the configs are enough for the commit
    with pytest.raises(SourceError, match="model.safetensors is not in the local Hub cache .*HF_HUB_OFFLINE") as info:
        model_shapes("hf://owner/base")
    assert info.value.where == f"hf://owner/base@{commit}: model.safetensors"


def test_model_shapes_when_the_hub_cannot_be_reached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, with the base's configs cached but not its weights, and nothing listening at the endpoint."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(
        hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    files = {"config.json": b"{}", "model.safetensors": WEIGHTS}
    commit = make_hub_cache(tmp_path / "hub", "owner/base", files, missing={"model.safetensors"})
    with pytest.raises(SourceError, match="the Hub could not be reached") as info:
        model_shapes("hf://owner/base")  # the configs come from the cache; the header cannot
    assert info.value.where == f"hf://owner/base@{commit}: model.safetensors"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x00\x00\x00\x00\x00\x00\x00{}",
        (1 << 40).to_bytes(8, "little"),
        b"\x04\x00\x00\x00\x00\x00\x00\x00[12]",
    ],
    ids=["empty", "truncated", "huge-length", "not-an-object"],
)
def test_model_shapes_refuses_a_corrupt_header(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(SourceError, match="corrupt or truncated safetensors file") as info:
        model_shapes(str(tmp_path))
    assert info.value.where == str(tmp_path / "model.safetensors")


def test_model_shapes_without_safetensors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no \*\.safetensors weights found"):
        model_shapes(str(tmp_path))


def test_model_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve_model_dir(str(tmp_path / "absent"))


# --- pinned specs (the reproducing command) ----------------------------------------------------


def test_pinned_spec_pins_hub_revisions_and_keeps_paths_as_given() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert pinned_spec("hf://org/repo", commit) == f"hf://org/repo@{commit}"
    assert pinned_spec("hf://org/repo@refs%2Fpr%2F1/sub/dir", commit) == f"hf://org/repo@{commit}/sub/dir"
    assert pinned_spec("hf://org/repo@v1", None) == "hf://org/repo@v1"
    assert pinned_spec("adapters/../clients", None) == "adapters/../clients"
    assert pinned_spec("@more.txt", None) == "@more.txt"


def test_a_list_may_come_from_a_pipe_as_process_substitution_gives_it(tmp_path: Path) -> None:
    """``fedbip merge @<(find ...)``: the shell passes /dev/fd/N, a pipe; the bounded reader accepts
    pipes for @lists only (elsewhere one without a writer would block the open)."""
    adapter(tmp_path / "a")
    adapter(tmp_path / "b")
    read_end, write_end = os.pipe()
    os.write(write_end, f"{tmp_path / 'a'}\n{tmp_path / 'b'}\n".encode())
    os.close(write_end)
    try:
        names = [s.name for s in resolve_sources([f"@/dev/fd/{read_end}"])]
    finally:
        os.close(read_end)
    assert names == ["a", "b"]


def test_lists_nest_at_most_eight_deep(tmp_path: Path) -> None:
    adapter(tmp_path / "a")
    (tmp_path / "list-0.txt").write_text("a\n")
    for i in range(1, 10):
        (tmp_path / f"list-{i}.txt").write_text(f"@list-{i - 1}.txt\n")
    assert [s.name for s in resolve_sources(["@list-7.txt"], base_dir=tmp_path)] == ["a"]  # 8 lists: the limit
    with pytest.raises(SourceError, match="nested more than 8 deep") as caught:
        resolve_sources(["@list-8.txt"], base_dir=tmp_path)
    assert caught.value.where.startswith(f"{tmp_path / 'list-8.txt'}:1")
