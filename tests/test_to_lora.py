"""--to-lora's pieces: the seeded randomized SVD against torch's dense SVD, and which tensors become LoRA modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tinybase import save_bert_base, save_gpt2_base

from fedbip_cli.to_lora import lora_targets, low_rank_factors, randomized_svd, tensor_generator


def with_spectrum(sigma: torch.Tensor, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(sigma) Vᵀ with random orthonormal U (rows × k) and V (cols × k)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(sigma), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(sigma), generator=gen, dtype=torch.float64)).Q
    return (u * sigma) @ v.T


def test_randomized_svd_finds_the_leading_triplets() -> None:
    sigma = 0.7 ** torch.arange(30, dtype=torch.float64)  # a decaying spectrum, full rank
    matrix = with_spectrum(sigma, 60, 40)
    u, s, vh = randomized_svd(matrix, 5, torch.Generator().manual_seed(1))
    assert (u.shape, s.shape, vh.shape) == ((60, 5), (5,), (5, 40))  # 5 + 8 < 40: the randomized path
    assert torch.allclose(s, sigma[:5], rtol=1e-10, atol=0)
    best = torch.linalg.svd(matrix, full_matrices=False)
    dense = (best.U[:, :5] * best.S[:5]) @ best.Vh[:5]
    assert float(((u * s) @ vh - dense).norm() / dense.norm()) < 1e-8


def test_energy_is_exact_below_and_one_at_the_rank() -> None:
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    matrix = with_spectrum(sigma, 50, 30)
    total = float((sigma**2).sum())
    two = low_rank_factors(matrix, 2, torch.Generator().manual_seed(0))
    assert two.energy == pytest.approx(float((sigma[:2] ** 2).sum()) / total, abs=1e-12)
    six = low_rank_factors(matrix, 6, torch.Generator().manual_seed(0))  # R ≥ rank(M), sketch 14 < 30
    assert six.energy == pytest.approx(1.0, abs=1e-12)
    assert float((six.b @ six.a - matrix).abs().max()) < 1e-12
    assert six.b.shape == (50, 6) and six.a.shape == (6, 30)
    # √σ split evenly: B's columns and A's rows have equal norms.
    assert torch.allclose(two.b.norm(dim=0), two.a.norm(dim=1), rtol=1e-10)


def test_full_rank_request_is_the_exact_svd_and_a_zero_matrix_keeps_everything() -> None:
    matrix = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = low_rank_factors(matrix, 4, torch.Generator())
    assert full.energy == pytest.approx(1.0, abs=1e-14) and torch.allclose(full.b @ full.a, matrix, atol=1e-12)
    assert low_rank_factors(torch.zeros(6, 4), 2, torch.Generator()).energy == 1.0


def test_the_sketch_is_seeded_by_the_tensor_name() -> None:
    matrix = torch.randn(80, 60, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    once = low_rank_factors(matrix, 3, tensor_generator("h.0.attn.c_attn.weight"))
    again = low_rank_factors(matrix, 3, tensor_generator("h.0.attn.c_attn.weight"))
    other = low_rank_factors(matrix, 3, tensor_generator("h.1.attn.c_attn.weight"))
    assert torch.equal(once.b, again.b) and torch.equal(once.a, again.a)
    assert not torch.equal(once.b, other.b)  # another sketch: a flat spectrum is not captured exactly
    assert 0 < once.energy < 1 and once.energy == pytest.approx(other.energy, rel=0.05)


def test_lora_targets_are_the_linear_weights(tmp_path: Path) -> None:
    bert = save_bert_base(tmp_path / "bert")
    with safe_open(bert / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    targets, skipped = lora_targets(bert, names)
    assert len(targets) == 13 and not any(t.transposed for t in targets)
    assert {t.module for t in targets} >= {
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.output.dense",
        "pooler.dense",
    }
    assert set(skipped) | {t.tensor for t in targets} == set(names)
    assert (
        skipped["embeddings.LayerNorm.weight"]
        == "LayerNorm weight; only the weights of linear layers become LoRA modules"
    )
    assert lora_targets(bert, ["no.such.weight"])[1]["no.such.weight"].startswith(
        "no layer of the base architecture holds it"
    )

    gpt2 = save_gpt2_base(tmp_path / "gpt2")
    targets, skipped = lora_targets(gpt2, ["h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "wte.weight"])
    assert [(t.module, t.transposed) for t in targets] == [("h.0.attn.c_attn", True)]
    assert skipped["wte.weight"].startswith("Embedding weight;")
    assert skipped["h.0.attn.c_attn.bias"].startswith("Conv1D bias;")
