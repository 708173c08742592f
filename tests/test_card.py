"""Model cards (``OUT/<client>/README.md``): what they say, that they are outputs like any other,
and that the command they give reproduces the merge byte for byte."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
from factories import base_model_files, random_adapter
from hubcache import make_hub_cache, repository_files, use_offline_cache
from typer.testing import CliRunner

from fedbip_cli import __version__, card
from fedbip_cli.cli import app
from fedbip_cli.merge import energy_range

SHAPES = {
    "encoder.layer.0.attention.self.query": (8, 6),
    "encoder.layer.0.attention.self.value": (8, 6),
    "encoder.layer.1.attention.self.query": (8, 6),
}
runner = CliRunner()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, str, str]:
    """Three Hub clients and one local client merged layer-wise against a Hub base; (out, manifest, commit, base commit)."""
    use_offline_cache(monkeypatch, tmp_path / "hub")
    built = {
        n: random_adapter(tmp_path / "build" / n, SHAPES, torch.Generator().manual_seed(i), r=2 + i)
        for i, n in enumerate("abc")
    }
    commit = make_hub_cache(tmp_path / "hub", "org/adapters", repository_files(built))
    base_commit = make_hub_cache(tmp_path / "hub", "org/base", base_model_files(SHAPES))
    local = random_adapter(
        tmp_path / "local" / "d", SHAPES, torch.Generator().manual_seed(0), lora_alpha=7
    )  # a's direction
    out = tmp_path / "merged"
    result = runner.invoke(
        app,
        [
            "merge",
            "hf://org/adapters@main",
            str(local),
            "--base",
            "hf://org/base",
            "--out",
            str(out),
            "--layerwise",
            "--top-k",
            "3",
            "--rank",
            "3",
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "fedbip-manifest.json").read_text()), commit, base_commit


def test_card_content(hub_merge: tuple[Path, dict, str, str]) -> None:
    out, manifest, commit, base_commit = hub_merge
    card = (out / "a" / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    assert "library_name: peft\n" in front and "base_model: org/base\n" in front and "- fedbip\n" in front
    assert f"`hf://org/base` at commit `{base_commit}`" in body
    for entry in manifest["inputs"]:
        assert entry["source"] in body and entry["sha256"] in body
    assert body.count(f"`{commit}`") == 3 and "| d | " in body and "| local |" in body
    assert "- granularity: block (2 group(s)" in body
    assert "top-k: 3" in body and "- combine: svd at rank 3" in body
    low, mean = energy_range(manifest["energy_kept"]["a"])
    assert f"- energy kept: min {low:.4f}, mean {mean:.4f} over 3 module(s)" in body
    assert f"fedbip {__version__}" in body
    # This client's weight row in each group, largest first, zeros left out (top-k 3 of 4 clients).
    clients = manifest["clients"]
    for name, group in manifest["groups"].items():
        row = group["weights"][0]
        kept = sorted((j for j, w in enumerate(row) if w), key=lambda j: -row[j])
        assert len(kept) == 3
        assert f"| {name} | " + ", ".join(f"{clients[j]} {row[j]:.4f}" for j in kept) + " |" in body
    # d has a's factors at another scale: cosine 1, a's nearest neighbour.
    assert (
        "## Nearest neighbours\n\nBy cosine similarity of task vectors (mean cosine over the 2 groups): d 1.0000,"
        in body
    )
    assert f"```bash\n{manifest['command']}\n```" in body


def test_card_is_an_output_with_its_hash(hub_merge: tuple[Path, dict, str, str]) -> None:
    out, manifest, _, _ = hub_merge
    for client in manifest["clients"]:
        card = out / client / "README.md"
        assert manifest["outputs"][client][f"{client}/README.md"] == hashlib.sha256(card.read_bytes()).hexdigest()
        assert "\x1b" not in card.read_text() and str(out) not in card.read_text()


def test_card_command_reproduces_the_merge_after_main_moved(
    hub_merge: tuple[Path, dict, str, str], tmp_path: Path
) -> None:
    out, manifest, commit, _ = hub_merge
    command = manifest["command"]
    assert command.startswith(
        f"fedbip merge hf://org/adapters@{commit} {tmp_path / 'local' / 'd'} --out OUT --base hf://org/base@"
    )
    assert (
        "--granularity block --weighting paper --negative clip --temperature 1.0 --top-k 3 --combine svd --dtype auto --rank 3 --device cpu"
        in command
    )
    # main moves on: the pinned command still reads the merged commit.
    moved = {
        n: random_adapter(tmp_path / "build2" / n, SHAPES, torch.Generator().manual_seed(40 + i))
        for i, n in enumerate("abc")
    }
    make_hub_cache(tmp_path / "hub", "org/adapters", repository_files(moved))

    again = tmp_path / "again"
    words = [str(again) if w == "OUT" else w for w in shlex.split(command)]
    assert words[:2] == ["fedbip", "merge"]
    result = runner.invoke(app, words[1:])
    assert result.exit_code == 0, result.output
    before, after = tree_bytes(out), tree_bytes(again)
    adapters = [f"{c}/{f}" for c in manifest["clients"] for f in ("adapter_config.json", "adapter_model.safetensors")]
    assert {f: after[f] for f in adapters} == {f: before[f] for f in adapters}
    # The sources are now spelled pinned; the command that would reproduce the reproduction is the same one.
    rerun = json.loads(after["fedbip-manifest.json"])
    assert rerun["command"] == command
    assert rerun["inputs"][0]["source"] == f"hf://org/adapters@{commit}/a" and rerun["inputs"][0]["revision"] == commit


@pytest.mark.parametrize(
    ("combine", "energy", "rank"),
    [("linear", "- energy kept: unknown", None), ("cat", "- energy kept: min 1.0000, mean 1.0000", None)],
)
def test_card_for_other_combine_modes(tmp_path: Path, combine: str, energy: str, rank: int | None) -> None:
    for i in range(3):
        random_adapter(tmp_path / "clients" / f"c{i}", SHAPES, torch.Generator().manual_seed(i))
    result = runner.invoke(
        app, ["merge", str(tmp_path / "clients"), "--out", str(tmp_path / "o"), "--combine", combine, "--json"]
    )
    assert result.exit_code == 0, result.output
    card = (tmp_path / "o" / "c1" / "README.md").read_text()
    assert energy in card and f"- combine: {combine}\n" in card
    assert "`tiny-base`, as the adapters' configs declare it" in card and "base_model:" not in card
    assert "--rank" not in json.loads((tmp_path / "o" / "fedbip-manifest.json").read_text())["command"]


def test_command_names_an_at_list_as_given_and_pins_hub_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command names SOURCES as given (an @list stays an @list: expanding it would publish the
    merging machine's paths); a Hub source given directly is pinned to the commit it resolved to, and
    the manifest's inputs pin every client, the @list's Hub ones included."""
    use_offline_cache(monkeypatch, tmp_path / "hub")
    built = {
        n: random_adapter(tmp_path / "build" / n, SHAPES, torch.Generator().manual_seed(i)) for i, n in enumerate("ab")
    }
    commit = make_hub_cache(tmp_path / "hub", "org/adapters", repository_files(built))
    local = random_adapter(tmp_path / "local" / "c", SHAPES, torch.Generator().manual_seed(5))
    (tmp_path / "list.txt").write_text("hf://org/adapters@main/a  # one Hub client\nlocal/c\n")
    result = runner.invoke(
        app, ["merge", f"@{tmp_path / 'list.txt'}", "hf://org/adapters/b", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    command = json.loads((tmp_path / "o" / "fedbip-manifest.json").read_text())["command"]
    expected = f"fedbip merge @{tmp_path / 'list.txt'} hf://org/adapters@{commit}/b --out OUT"
    assert command.startswith(expected), command
    assert str(local.resolve()) not in command
    inputs = json.loads((tmp_path / "o" / "fedbip-manifest.json").read_text())["inputs"]
    assert commit in json.dumps(inputs)


def test_long_weight_rows_are_cut_with_the_rest_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(card, "CARD_WEIGHTS", 2)
    cell = card._weights_cell(["a", "b", "c", "d"], [0.5, 0.125, 0.25, 0.0])
    assert cell == "a 0.5000, c 0.2500, and 1 more summing to 0.1250"
    assert card._weights_cell(["a", "b"], [0.75, 0.25]) == "a 0.7500, b 0.2500"
