"""PCA to 256 dimensions and spherical k-means to 256 pseudo-classes (step 1.5).

The reference loads a precomputed ``pca_A``, ``pca_b`` and centroids and assigns each embedding to
``argmax_j cos(embedding, centroid_j)``; the fitting code is not in the repository. Here PCA is
scikit-learn's (mean-centred, ``x -> (x - mean) @ components.T``) and the clustering is written
out: *spherical* k-means (Dhillon & Modha 2001) on the L2-normalised PCA embeddings, whose
centroids are re-normalised to unit length after every update and whose assignment is the cosine
argmax, exactly the reference's assignment rule. scikit-learn's ``KMeans`` minimises Euclidean
distance to *unnormalised* means, so its centroids are not the unit vectors the cosine rule
compares against (and its objective is not the cosine one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PseudoClassModel:
    """A fitted PCA + spherical k-means.

    Attributes:
        mean: PCA mean ``(C,)``.
        components: PCA components ``(D, C)``.
        centroids: unit-norm cluster centres ``(K, D)``.
    """

    mean: np.ndarray
    components: np.ndarray
    centroids: np.ndarray

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Raw features ``(N, C)`` -> unit-norm embeddings ``(N, D)`` float32."""
        projected = (np.asarray(features, np.float64) - self.mean) @ self.components.T
        return l2_normalise(projected).astype(np.float32)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """Pseudo-class of each unit-norm embedding ``(N, D)``: the most cosine-similar centroid, ``(N,)``."""
        if len(embeddings) == 0:
            return np.zeros(0, np.int64)
        return (np.asarray(embeddings, np.float64) @ self.centroids.T).argmax(axis=1).astype(np.int64)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, *, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """Spherical k-means of unit vectors.

    k-means++ seeding with the cosine distance ``1 - cos``, then alternate: assign each point to
    its most similar centroid; set each centroid to the normalised sum of its points (an empty
    cluster is re-seeded with the point farthest from its centroid). Stops when no assignment
    changes.

    Args:
        x: unit-norm points ``(N, D)``, ``N >= k``.
        k: number of clusters.
        iterations: most update rounds.
        seed: seeding randomness.

    Returns:
        Unit-norm centroids ``(k, D)`` float64.
    """
    x = torch.as_tensor(np.asarray(x, np.float64))
    n = x.shape[0]
    if n < k:
        raise ValueError(f"spherical k-means: {n} embeddings cannot make {k} clusters; lower the number of clusters")
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = 1 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = distance.clamp_min(0)
        index = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, 1 - x @ x[index])
    centroids = x[chosen].clone()
    assignment = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        similarity = x @ centroids.T
        new_assignment = similarity.argmax(dim=1)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fit = similarity.gather(1, assignment[:, None])[:, 0].clone()
        for empty in torch.nonzero(torch.bincount(assignment, minlength=k) == 0).flatten().tolist():
            farthest = int(fit.argmin())
            centroids[empty] = x[farthest]
            fit[farthest] = float("inf")  # each empty cluster gets a different point
    return centroids.numpy()


def fit_pseudo_classes(features: np.ndarray, *, dim: int = 256, clusters: int = 256, iterations: int = 50,
                       seed: int = 0) -> PseudoClassModel:
    """Fit PCA to ``dim`` and spherical k-means with ``clusters`` centres on raw features ``(N, C)``."""
    from sklearn.decomposition import PCA

    n, channels = features.shape
    if dim > min(n, channels):
        raise ValueError(f"PCA to {dim} dimensions needs at least {dim} embeddings of at least {dim} channels; "
                         f"got {n} of {channels}: lower embed_dim or add images")
    pca = PCA(n_components=dim, svd_solver="full" if n * channels <= 4_000_000 else "randomized", random_state=seed)
    pca.fit(np.asarray(features, np.float32))  # float32 halves the memory of a 100k x 2048 fit
    model = PseudoClassModel(pca.mean_.astype(np.float64), pca.components_.astype(np.float64), np.zeros((0, dim)))
    model.centroids = spherical_kmeans(model.embed(features), clusters, iterations=iterations, seed=seed)
    return model
