"""FedBip's global weights computed by the harness, when fedbip's manifest is not there to give them.

The peft path and the dense reference merge with fedbip's own P (from ``fedbip-manifest.json``) so
that every contender computes the same M_i. When the global merge failed or timed out, this gives
the same P independently: P_ij = S⁺_ij / Σ_j S⁺_ij with S the whole-model cosine, from the exact
factor-space inner products <s_i B_i A_i, s_j B_j A_j> = sum((s_i B_i)ᵀ(s_j B_j) ∘ A_i A_jᵀ) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.lora_files import factors


def paper_weights(clients_dir: Path, clients: Sequence[str], modules: Sequence[str]) -> torch.Tensor:
    """(K, K) row-normalised clipped cosine of the clients' whole task vectors."""
    k = len(clients)
    inner = torch.zeros(k, k, dtype=torch.float64)
    for module in modules:
        pairs = [factors(clients_dir / c, module) for c in clients]
        b = torch.cat([f[0] for f in pairs], dim=1)
        a = torch.cat([f[1] for f in pairs], dim=0)
        owner = torch.repeat_interleave(
            torch.eye(k, dtype=torch.float64), torch.tensor([f[1].shape[0] for f in pairs]), dim=0
        )
        inner += owner.T @ ((b.T @ b) * (a @ a.T)) @ owner
    norms = inner.diagonal().sqrt()
    positive = (inner / norms[:, None] / norms[None, :]).clamp(min=0)
    return positive / positive.sum(dim=1, keepdim=True)
