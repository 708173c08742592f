"""Bounded influence for hostile adapters: --clip-norm and the outlier report.

The poisoning scenarios of the issue, end to end through ``fedbip merge``: honest clients in two
task groups, a victim, and an attacker that is (a) a ×1000 copy of an honest neighbour, or (b) a copy
of the victim plus a hidden component of equal norm. The attacker's share of the victim's merged
delta, ‖P'_va ΔW_a‖ / ‖Σ_j P'_vj ΔW_j‖, is computed in float64 from the inputs and the manifest's
weights, and the written adapter is checked to hold exactly Σ_j P'_vj ΔW_j.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbip_cli.cli import app
from fedbip_cli.defence import ClipNorm, clip_scales, clipped_weights, outliers, robust_z
from fedbip_cli.errors import UsageError
from fedbip_cli.manifest import MANIFEST_NAME
from fedbip_cli.options import MergeOptions
from tests.factories import dense_delta, write_lora_adapter

SHAPES = {"layers.0.q_proj": (16, 12), "layers.1.q_proj": (16, 12)}
runner = CliRunner()


# --- the maths, by hand ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "multiple", "value"),
    [("auto", 1.0, None), ("AUTO", 1.0, None), ("1.5x", 1.5, None), ("0.25", None, 0.25), ("3", None, 3.0)],
)
def test_clip_norm_values(text: str, multiple: float | None, value: float | None) -> None:
    assert ClipNorm.parse(text) == ClipNorm(multiple, value)
    assert ClipNorm.parse(None) is None


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "x", "0x", "-2x", "1e400", "two", ""])
def test_bad_clip_norms_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="is not a norm bound"):
        ClipNorm.parse(text)
    with pytest.raises(UsageError):
        MergeOptions(clip_norm=text)


def test_clip_norm_needs_a_merge_linear_in_the_weights() -> None:
    with pytest.raises(UsageError, match="--combine linear is not"):
        MergeOptions(clip_norm="auto", combine="linear")
    assert MergeOptions(clip_norm="auto", combine="cat").clip == ClipNorm(1.0)


def test_clip_scales_weight_columns_by_hand() -> None:
    norms = torch.tensor([1.0, 2.0, 3.0, 300.0, 0.0], dtype=torch.float64)
    # median 2 → 2x bound 4: only client 3 is scaled, by 4 / 300; a zero vector keeps scale 1.
    assert ClipNorm.parse("auto").bound(norms) == 2.0 and ClipNorm.parse("2x").bound(norms) == 4.0
    assert clip_scales(norms, 4.0).tolist() == [1.0, 1.0, 1.0, 4.0 / 300.0, 1.0]
    weights = torch.full((5, 5), 0.2, dtype=torch.float64)
    clipped, record = clipped_weights(weights, norms, ClipNorm.parse("2x"))
    assert torch.equal(clipped[:, 3], torch.full((5,), 0.2 * 4.0 / 300.0, dtype=torch.float64))
    assert torch.equal(clipped[:, [0, 1, 2, 4]], weights[:, [0, 1, 2, 4]])
    assert record == {"bound": 4.0, "clipped": {3: 4.0 / 300.0}}
    assert clipped_weights(weights, norms, None) == (weights, None)
    assert ClipNorm.parse("1.5").bound(norms) == 1.5
    even = torch.tensor([1.0, 2.0, 4.0, 100.0], dtype=torch.float64)
    assert ClipNorm.parse("auto").bound(even) == 3.0  # the mean of the middle two (torch.median gives 2)
    assert clip_scales(even, 3.0).tolist() == [1.0, 1.0, 0.75, 0.03]


def test_robust_z_and_outliers_on_planted_values() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    # median 3, |x − 3| = 2 1 0 1 97 → MAD 1; z = 0.6745 (x − 3).
    assert torch.allclose(robust_z(values), 0.6745 * (values - 3), rtol=0, atol=1e-15)
    # MAD 0 (three of four equal): deviations 0 0 0 4, mean 1 → z = (x − 1) / 1.253314.
    same = robust_z(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert same.tolist() == [0.0, 0.0, 0.0, 4.0 / 1.253314]
    assert robust_z(torch.tensor([2.0, 2.0, 2.0])).tolist() == [0.0, 0.0, 0.0]
    clients = ["a", "b", "c", "d", "e"]
    norms = torch.tensor([1.0, 1.2, 0.9, 1.1, 1000.0], dtype=torch.float64)
    similarity = torch.full((5, 5), 0.3, dtype=torch.float64)
    similarity.fill_diagonal_(1.0)
    similarity[1, 3] = similarity[3, 1] = 0.9995
    found = outliers(clients, similarity, norms)
    assert [o["client"] for o in found["norm"]] == ["e"] and found["norm"][0]["value"] == 1000.0
    assert found["near_copies"] == [{"clients": ["b", "d"], "similarity": 0.9995}]
    json.dumps(found, allow_nan=False)  # the manifest's JSON holds it
    # z alone would flag 2.0 among norms near 1 (MAD tiny), but it is not 3x the median: not flagged.
    honest = outliers(clients, torch.eye(5, dtype=torch.float64), torch.tensor([1.0, 1.01, 0.99, 1.0, 2.0]))
    assert honest["norm"] == [] and honest["similarity"] == []
    few = outliers(clients[:4], similarity[:4, :4], torch.tensor([1.0, 1.0, 1.0, 1000.0], dtype=torch.float64))
    assert few["norm"] == [] and few["near_copies"] == [{"clients": ["b", "d"], "similarity": 0.9995}]


# --- the poisoning scenarios, end to end -----------------------------------------------------------


def honest_factors(seed: int, group: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-4 factors: a task direction shared by the client's group, plus its own component."""
    shared = torch.Generator().manual_seed(1000 + group)
    own = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (n_out, n_in) in SHAPES.items():
        a_group, b_group = torch.randn(2, n_in, generator=shared), torch.randn(n_out, 2, generator=shared)
        a_own, b_own = torch.randn(2, n_in, generator=own), torch.randn(n_out, 2, generator=own)
        factors[module] = (torch.cat([a_group, a_own]), torch.cat([b_group, 0.6 * b_own], dim=1))
    return factors


def scenario(root: Path, attack: str) -> Path:
    """Six honest clients (h0..h5, groups 0 0 0 1 1 1), the victim h0, and an attacker ``zz``."""
    honest = {f"h{i}": honest_factors(i, i // 3) for i in range(6)}
    for name, factors in honest.items():
        write_lora_adapter(root / name, factors, r=4, lora_alpha=4)
    if attack == "scaled":  # a ×1000 copy of the victim's group neighbour h1
        attacker = {m: (a, 1000.0 * b) for m, (a, b) in honest["h1"].items()}
    else:  # the victim's update plus a hidden component of the same norm, orthogonal to it
        hidden = honest_factors(99, 7)
        attacker = {}
        for module, (a, b) in honest["h0"].items():
            a_h, b_h = hidden[module]
            delta, extra = b @ a, b_h @ a_h
            extra = extra - (extra * delta).sum() / (delta * delta).sum() * delta  # orthogonal to the victim's
            extra = extra * (delta.norm() / extra.norm())
            u, s, vh = torch.linalg.svd(delta + extra, full_matrices=False)
            attacker[module] = (vh[:8], u[:, :8] * s[:8])
    rank = next(iter(attacker.values()))[0].shape[0]
    write_lora_adapter(root / "zz", attacker, r=rank, lora_alpha=rank)
    return root


def attacker_share(sources: Path, out: Path, victim: str = "h0", attacker: str = "zz") -> float:
    """‖P'_va ΔW_a‖ / ‖M_v‖ over the whole model, in float64, from the inputs and the manifest's weights;
    asserts on the way that the written adapter holds M_v = Σ_j P'_vj ΔW_j (cat: to float32 rounding)."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    clients = manifest["clients"]
    row = torch.tensor(manifest["groups"]["model"]["weights"][clients.index(victim)], dtype=torch.float64)
    deltas = {c: {m: dense_delta(sources / c, m, shape) for m, shape in SHAPES.items()} for c in clients}
    merged = {m: sum(row[j] * deltas[c][m] for j, c in enumerate(clients)) for m in SHAPES}
    for module, shape in SHAPES.items():
        written = dense_delta(out / victim, module, shape)
        assert float((written - merged[module]).norm() / merged[module].norm()) < 1e-6
    a = clients.index(attacker)
    part = math.sqrt(sum(float((row[a] * deltas[attacker][m]).norm()) ** 2 for m in SHAPES))
    whole = math.sqrt(sum(float(merged[m].norm()) ** 2 for m in SHAPES))
    return part / whole


def merge(sources: Path, out: Path, *options: str) -> dict:
    result = runner.invoke(app, ["merge", str(sources), "--out", str(out), "--combine", "cat", "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_scaled_copy_dominates_without_clipping_and_is_bounded_with_it(tmp_path: Path) -> None:
    sources = scenario(tmp_path / "in", "scaled")
    plain = merge(sources, tmp_path / "plain")
    without = attacker_share(sources, tmp_path / "plain")
    clipped = merge(sources, tmp_path / "clipped", "--clip-norm", "auto")
    with_clip = attacker_share(sources, tmp_path / "clipped")
    neighbour = attacker_share(sources, tmp_path / "clipped", attacker="h1")  # an honest client of the group
    assert without > 0.99  # cosine ignores scale: an ordinary neighbour's weight, 1000 times the norm
    assert with_clip < 1.25 * neighbour < 0.35  # back to what an honest neighbour contributes
    group = clipped["defence"]["groups"]["model"]
    assert group["clip"]["clipped"]["zz"] < 0.01 and all(
        s > 0.5 for s in group["clip"]["clipped"].values() if s != group["clip"]["clipped"]["zz"]
    )
    assert [o["client"] for o in plain["defence"]["groups"]["model"]["outliers"]["norm"]] == ["zz"]
    assert plain["defence"]["clip_norm"] is None and clipped["defence"]["clip_norm"] == "1x"
    manifest = json.loads((tmp_path / "clipped" / MANIFEST_NAME).read_text())
    assert "--clip-norm 1x" in manifest["command"] and manifest["options"]["clip_norm"] == "1x"


def test_a_hidden_component_keeps_its_share_under_clipping_and_the_report_says_so(tmp_path: Path) -> None:
    """Norm clipping bounds scale, not direction: an attacker of ordinary norm keeps about its share."""
    sources = scenario(tmp_path / "in", "hidden")
    merge(sources, tmp_path / "plain")
    merge(sources, tmp_path / "clipped", "--clip-norm", "auto")
    merge(sources, tmp_path / "loose", "--clip-norm", "2x")
    without = attacker_share(sources, tmp_path / "plain")
    assert 0.25 < without < 0.45  # more than any honest neighbour: it is the victim's own update, and more
    assert 0.8 * without < attacker_share(sources, tmp_path / "clipped") < without  # √2 the median norm
    assert attacker_share(sources, tmp_path / "loose") == pytest.approx(without, rel=1e-9)  # under 2x: untouched


def test_inspect_reports_outliers_in_the_table_and_the_json(tmp_path: Path) -> None:
    sources = scenario(tmp_path / "in", "scaled")
    table = runner.invoke(app, ["inspect-similarity", str(sources)])
    assert table.exit_code == 0 and "zz has an outlying norm" in table.output
    data = json.loads(runner.invoke(app, ["inspect-similarity", str(sources), "--format", "json"]).output)
    assert [o["client"] for o in data["groups"]["model"]["outliers"]["norm"]] == ["zz"]


def test_config_file_takes_clip_norm(tmp_path: Path) -> None:
    sources = scenario(tmp_path / "in", "scaled")
    config = tmp_path / "fedbip.toml"
    config.write_text(f'sources = ["{sources}"]\nout = "{tmp_path / "out"}"\nclip_norm = "1.5x"\ncombine = "cat"\n')
    result = runner.invoke(app, ["merge", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["defence"]["clip_norm"] == "1.5x"
