"""FedMerge's server step (arXiv 2504.06768; code shutong043/FedMerge, ``server_merging.py``), as
pure functions over tensors; not yet a registered strategy (issue 14).

The server keeps d global models Θ_1..Θ_d and a weight matrix W (clients × d); client i receives
θ_i = Σ_j S_ij Θ_j with S = softmax(W) by rows, trains it to θ'_i and sends it back; g_i = θ_i − θ'_i
is its pseudo-gradient. Followed from the code, in its order:

1. W by its gradient: ∂L_i/∂W_ij = S_ij ⟨Θ_j − θ_i, g_i⟩ (the chain rule through θ_i = Σ_j S_ij Θ_j
   and the softmax), scaled by each client's share of the examples n_i; the code normalises the
   step and repeats it until some entry of W has moved by more than its learning rate, which is the
   step scaled so that the largest entry moves by exactly ``lr_w`` — what ``update_w`` does.
2. Every Θ_j from the updates weighted by softmax(W) (the new W) and the clients' sizes, normalised
   over the clients for each j: Θ_j ← Θ_j − Σ_i w_ij g_i, w_ij = S_ij n_i / Σ_k S_kj n_k.

Choices made here: the inner products run over the whole trainable state (LoRA factors and head;
the code takes only the top linear layer), and only the round's participants count.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def merged(theta: dict[str, torch.Tensor], weights: torch.Tensor) -> State:
    """θ_i = Σ_j S_ij Θ_j for each row i of ``weights`` S (rows, d), Θ stacked on dim 0 (d, ...).

    Returns:
        per tensor name, the merged models stacked on dim 0 (rows, ...).
    """
    return {
        name: torch.einsum("rd,d...->r...", weights.to(torch.float64), t.to(torch.float64)).to(t.dtype)
        for name, t in theta.items()
    }


def _inner(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> torch.Tensor:
    """⟨left_a, right_b⟩ over every tensor, for stacks on dim 0: an (A, B) float64 matrix."""
    return sum(
        left[name].reshape(left[name].shape[0], -1).to(torch.float64)
        @ right[name].reshape(right[name].shape[0], -1).to(torch.float64).T
        for name in left
    )


def update_w(
    w: torch.Tensor,
    theta: dict[str, torch.Tensor],
    sent: dict[str, torch.Tensor],
    pseudo: dict[str, torch.Tensor],
    share: torch.Tensor,
    lr_w: float,
) -> torch.Tensor:
    """Step 1: W's rows of the K participants after one step (the other rows are the caller's).

    Args:
        w: (K, d) the participants' rows of W.
        theta: Θ stacked (d, ...) per tensor name.
        sent: θ_i, what each participant received, stacked (K, ...).
        pseudo: g_i = θ_i − θ'_i stacked (K, ...).
        share: (K,) each participant's share n_i of the examples.
        lr_w: how far the largest entry of W moves.
    """
    s = torch.softmax(w.to(torch.float64), dim=1)
    # ⟨Θ_j − θ_i, g_i⟩ = ⟨Θ_j, g_i⟩ − ⟨θ_i, g_i⟩
    along = _inner(pseudo, theta) - _inner(pseudo, sent).diagonal().unsqueeze(1)
    grad = share.to(torch.float64).unsqueeze(1) * s * along
    largest = grad.abs().max()
    if not largest > 0:
        return w.clone()
    return w - lr_w * grad / largest


def update_theta(
    w: torch.Tensor, theta: dict[str, torch.Tensor], pseudo: dict[str, torch.Tensor], share: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Step 2: Θ_j ← Θ_j − Σ_i w_ij g_i with w_ij = S_ij n_i / Σ_k S_kj n_k, S = softmax(``w``) (K, d)."""
    weighted = torch.softmax(w.to(torch.float64), dim=1) * share.to(torch.float64).unsqueeze(1)
    weighted = weighted / weighted.sum(dim=0, keepdim=True)
    return {
        name: theta[name] - torch.einsum("kd,k...->d...", weighted, pseudo[name].to(torch.float64)).to(t.dtype)
        for name, t in theta.items()
    }


def fedmerge_step(
    w: torch.Tensor,
    theta: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    share: torch.Tensor,
    lr_w: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One FedMerge server step over K participants: (new W rows (K, d), new Θ (d, ...)).

    Args:
        w: (K, d) the participants' rows of W, the ones their models were merged with.
        theta: Θ stacked (d, ...) per tensor name.
        trained: θ'_i, each participant's trained model, stacked (K, ...).
        share: (K,) the participants' example counts (normalised here).
        lr_w: W's step (``update_w``).
    """
    share = share.to(torch.float64) / share.sum()
    sent = merged(theta, torch.softmax(w.to(torch.float64), dim=1))
    pseudo = {name: sent[name] - trained[name] for name in theta}
    new_w = update_w(w, theta, sent, pseudo, share, lr_w)
    return new_w, update_theta(new_w, theta, pseudo, share)
