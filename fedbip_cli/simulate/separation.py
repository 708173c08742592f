"""How well a similarity separates the true task groups: the paper's Figure 3 check, every round.

For each kind of vector the server could compare — this round's task vectors τ_k = θ_k − θ̄_k (the
paper), the raw trained parameters θ_k, whole trajectories θ_k − θ⁰ (an average of the rounds'
updates has the same cosine), and the server's EMA of past updates — the cosine matrix over the
participants gives two numbers: the mean similarity within the true groups minus the mean between
them (``gap``; > 0 when the vectors see the groups), and the adjusted Rand index of the clusters
``suggest_clusters`` finds in it against the true groups (``ari``; 1 = recovered, ~0 = chance).
"""

from __future__ import annotations

import torch

from fedbip_cli.clustering import adjusted_rand_index, cluster_labels, suggest_clusters

KINDS = ("update", "parameters", "cumulative", "ema")


def cosine_matrix(vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of K vectors given as tensors stacked on dim 0 (one entry per name),
    each vector the concatenation of its tensors; computed in float64. A zero vector has cosine 0."""
    flat = torch.cat([t.reshape(t.shape[0], -1).to(torch.float64) for t in vectors.values()], dim=1)
    norms = flat.norm(dim=1)
    inner = flat @ flat.T
    scale = torch.outer(norms, norms)
    return torch.where(scale > 0, inner / torch.where(scale > 0, scale, 1.0), 0.0)


def group_gap(similarity: torch.Tensor, groups: list[int]) -> float | None:
    """Mean off-diagonal similarity within the true groups minus the mean between groups, or None
    when there is no pair of one kind (every client alone, or a single group)."""
    labels = torch.tensor(groups)
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(groups), dtype=torch.bool)
    within, between = similarity[same & off], similarity[~same]
    if within.numel() == 0 or between.numel() == 0:
        return None
    return (within.mean() - between.mean()).item()


def cluster_ari(similarity: torch.Tensor, groups: list[int]) -> float:
    """ARI of the clusters suggested from ``similarity`` against the true ``groups``."""
    found = cluster_labels(suggest_clusters(similarity), len(groups))
    return adjusted_rand_index(found, groups)


def separation(similarity: torch.Tensor, groups: list[int]) -> dict[str, float | None]:
    """``{"gap": ..., "ari": ...}`` of one similarity matrix against the true groups."""
    return {"gap": group_gap(similarity, groups), "ari": cluster_ari(similarity, groups)}


def round_separation(
    participants: list[str],
    groups: dict[str, int | None],
    vectors: dict[str, dict[str, torch.Tensor]],
) -> dict[str, dict[str, float | None]] | None:
    """The separation of every kind in ``vectors`` (kind -> stacked tensors over the participants),
    or None when some participant's true group is unknown or fewer than 3 took part."""
    labels = [groups.get(c) for c in participants]
    if len(participants) < 3 or any(g is None for g in labels):
        return None
    return {kind: separation(cosine_matrix(stacked), labels) for kind, stacked in vectors.items()}
