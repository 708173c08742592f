"""Read structure out of a client-by-client cosine similarity matrix.

Pure functions over a K x K similarity tensor (diagonal 1, values in [-1, 1]): the nearest
neighbours of each client, a suggested partition of the clients into clusters, and a one-matrix
overview of a layer-wise result. Nothing here prints; ``report`` renders what these return.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform

# A split must beat this mean silhouette to be reported. Unrelated task vectors are nearly
# orthogonal, and random partitions of 10 random unit vectors in 1,000+ dimensions score below 0.04,
# while two blocks of cosine 0.4 against 0.05 across score about 0.37.
MIN_SILHOUETTE = 0.1
# Cuts of the dendrogram tried: a suggestion of more groups than this helps no reader, and each cut
# costs O(K²) (50 cuts of 10 000 clients: about 5 s; all 9 998 of them: hours).
MAX_CLUSTERS = 50


class _HasGroups(Protocol):
    """What ``mean_similarity`` needs of a ``similarity.SimilarityResult``."""

    groups: dict


def nearest_neighbours(similarity: torch.Tensor, k: int = 3) -> list[list[tuple[int, float]]]:
    """The ``k`` most similar other clients of every client.

    Args:
        similarity: K x K similarity matrix.
        k: neighbours per client (fewer when K - 1 < k).

    Returns:
        For each client i, ``[(j, S_ij), ...]`` without i itself, by similarity descending; equal
        similarities are ordered by the smaller index first.
    """
    return [row_neighbours(row, i, k) for i, row in enumerate(_as_square(similarity))]


def row_neighbours(row: np.ndarray, index: int, k: int = 3) -> list[tuple[int, float]]:
    """The ``k`` most similar other clients of client ``index`` from its similarity row, as
    ``nearest_neighbours`` orders them (a stable sort keeps equal values in index order).

    Only the entries at least as large as the (k+1)-th largest are sorted (every tie included), so
    a row of 10 000 clients costs a partition, not a sort.
    """
    values = np.asarray(row, dtype=np.float64)
    candidates = np.arange(len(values))
    if len(values) > 4 * (k + 1):
        threshold = np.partition(values, len(values) - (k + 1))[len(values) - (k + 1)]
        candidates = np.flatnonzero(values >= threshold)
    order = candidates[np.argsort(-values[candidates], kind="stable")]
    return [(int(j), float(values[j])) for j in order[order != index][:k]]


def suggest_clusters(similarity: torch.Tensor, min_silhouette: float = MIN_SILHOUETTE) -> list[list[int]]:
    """Partition the clients into groups of mutually similar task vectors.

    Average-linkage hierarchical clustering on the cosine distance ``1 - S``; the number of
    clusters is the one in 2..min(K - 1, ``MAX_CLUSTERS``) with the best mean silhouette (ties go to
    fewer clusters). When K < 3 or no cut reaches ``min_silhouette``, there is no structure worth
    reporting and all clients form one cluster.

    Args:
        similarity: K x K similarity matrix.
        min_silhouette: the best silhouette must exceed this to split the clients.

    Returns:
        Clusters as sorted lists of client indices, ordered by their smallest index.
    """
    distance = _cosine_distance(similarity)
    k = distance.shape[0]
    if k < 3:
        return [list(range(k))] if k else []
    tree = linkage(squareform(distance, checks=False), method="average")
    # In the dendrogram's leaf order every cut's clusters are runs of neighbours, so each silhouette
    # sums distances over ranges (O(K²) per cut) instead of a product with the K × C membership.
    leaves = leaves_list(tree)
    ordered = distance[np.ix_(leaves, leaves)]
    best_labels, best_score = None, min_silhouette
    for n_clusters in range(2, min(k, MAX_CLUSTERS + 1)):
        labels = fcluster(tree, n_clusters, criterion="maxclust")
        score = silhouette(ordered, labels[leaves])
        # Strictly better only, so that equal scores keep the coarser partition found first.
        if score > best_score:
            best_labels, best_score = labels, score
    if best_labels is None:
        return [list(range(k))]
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(best_labels.tolist()):
        clusters.setdefault(label, []).append(index)
    return sorted(clusters.values(), key=lambda members: members[0])


def silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition under a precomputed distance matrix.

    For client i, ``a`` is its mean distance to the rest of its cluster and ``b`` the smallest mean
    distance to another cluster; ``s_i = (b - a) / max(a, b)``, and 0 for a client alone in its
    cluster (the usual convention). A partition with a single cluster scores 0.

    Args:
        distance: K x K symmetric distance matrix with zero diagonal.
        labels: K cluster labels.

    Returns:
        The mean of ``s_i`` over all clients, in [-1, 1].
    """
    names, cluster = np.unique(np.asarray(labels), return_inverse=True)
    if len(names) < 2:
        return 0.0
    sums = _cluster_sums(distance, cluster, len(names))
    counts = np.bincount(cluster, minlength=len(names)).astype(np.float64)
    rows = np.arange(len(cluster))
    own = counts[cluster]
    a = sums[rows, cluster] / np.maximum(own - 1, 1)
    means = sums / counts
    means[rows, cluster] = np.inf
    b = means.min(axis=1)
    largest = np.maximum(a, b)
    defined = (own > 1) & (largest > 0)
    scores = np.where(defined, (b - a) / np.where(defined, largest, 1.0), 0.0)
    return float(scores.mean())


def _cluster_sums(distance: np.ndarray, cluster: np.ndarray, count: int) -> np.ndarray:
    """Every client's summed distance to every cluster, (K, C).

    When each cluster is one run of consecutive clients (a cut of a dendrogram in leaf order) the
    sums are taken over column ranges, O(K²); otherwise one product with the membership, O(K²C).
    """
    starts = np.concatenate([[0], np.flatnonzero(np.diff(cluster)) + 1])
    if len(starts) != count:
        return distance @ np.eye(count)[cluster]
    sums = np.empty((distance.shape[0], count))
    sums[:, cluster[starts]] = np.add.reduceat(distance, starts, axis=1)
    return sums


def mean_similarity(result: _HasGroups) -> torch.Tensor:
    """One overview matrix of a result: the plain mean of its groups' similarity matrices.

    Every group (block or module) counts equally, whatever its size or the norms of the task
    vectors in it, so this is a layer-wise overview and not the whole-model cosine. For a result
    with a single group (granularity "model") it is that group's matrix.

    Args:
        result: a ``similarity.SimilarityResult`` (anything with ``groups`` mapping to objects with a
            K x K ``similarity`` tensor).

    Returns:
        K x K float64 tensor.
    """
    matrices = [group.similarity.to(torch.float64) for group in result.groups.values()]
    if not matrices:
        raise ValueError("similarity result has no groups")
    return torch.stack(matrices).mean(dim=0)


def _as_square(similarity: torch.Tensor) -> np.ndarray:
    values = torch.as_tensor(similarity).detach().to("cpu", torch.float64).numpy()
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"similarity must be a square K x K matrix, got shape {tuple(values.shape)}")
    return values


def _cosine_distance(similarity: torch.Tensor) -> np.ndarray:
    # Float noise can leave S slightly outside [-1, 1] or asymmetric; linkage needs a clean metric.
    distance = np.clip(1.0 - _as_square(similarity), 0.0, 2.0)
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance


def adjusted_rand_index(labels_a: list[int], labels_b: list[int]) -> float:
    """Adjusted Rand index of two labelings of the same items (1 = identical partitions, ~0 = chance).

    Hubert & Arabie (1985): (index − expected) / (max − expected) over pair counts of the
    contingency table; two partitions that are both trivial (all one cluster) score 1.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError("labelings differ in length")
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    _, a = np.unique(np.asarray(labels_a), return_inverse=True)
    _, b = np.unique(np.asarray(labels_b), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    index = pairs(table).sum()
    rows, cols = pairs(table.sum(axis=1)).sum(), pairs(table.sum(axis=0)).sum()
    expected = rows * cols / pairs(len(labels_a)) if len(labels_a) > 1 else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def cluster_labels(clusters: list[list[int]], size: int) -> list[int]:
    """Per-item cluster numbers from a list of clusters of item indices."""
    labels = [0] * size
    for number, members in enumerate(clusters):
        for i in members:
            labels[i] = number
    return labels
