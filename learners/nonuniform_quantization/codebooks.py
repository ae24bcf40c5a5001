"""Codebook numerics: scalar codebooks (1-D k-means) and product-quantization codebooks.

Scalar (non-uniform) quantization replaces every weight of a tensor by the nearest of 2**b
centroids. Three initializations (the hyperparameter ``init``), then Lloyd iterations:

- ``linear``: centroids evenly spaced between the smallest and the largest weight (Han et al.'s
  choice for Deep Compression: keeps the rare large weights representable);
- ``quantile``: centroid i at the (i + 1/2)/k quantile of the weights (density-based: every
  cluster starts with the same number of weights);
- ``kmeans++``: Arthur & Vassilvitskii's seeding (each next centroid drawn with probability
  proportional to the squared distance to the nearest chosen one), seeded, so reproducible.

Product quantization (Stock et al. 2019, "And the Bit Goes Down") cuts a kernel into
sub-vectors of ``block`` consecutive input-side weights (``Layout``) and shares a codebook of k
sub-vectors per layer. The codebook is fitted to reconstruct the layer's *outputs*: with the
layer's inputs x (im2col patches for a convolution), the error of one output column is
||x (w - w_hat)||^2, so each sub-vector's distance to a centroid is measured in the metric of
its block of the input Gram matrix H_i = x_i^T x_i (``weighted_kmeans``). With H_i = I this is
plain k-means on the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

try:  # installed with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def single_threaded_blas():
    """Many tiny LAPACK calls (batched 9x9 solves) slow down by 50x or more when OpenBLAS spreads each over
    threads that TensorFlow's are already using; one thread is faster for them."""
    return threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()

INITS = ("linear", "quantile", "kmeans++")


# ---------------------------------------------------------------------------- scalar codebooks
def init_codebook(values: np.ndarray, k: int, method: str, seed: int = 0) -> np.ndarray:
    """``k`` initial centroids (sorted, float64) for the scalar ``values`` by ``method``."""
    flat = np.asarray(values, np.float64).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot build a codebook for an empty tensor")
    if k < 1:
        raise ValueError(f"a codebook needs at least one centroid, not {k}")
    if method == "linear":
        return np.linspace(flat.min(), flat.max(), k)
    if method == "quantile":
        return np.quantile(flat, (np.arange(k) + 0.5) / k)
    if method == "kmeans++":
        return np.sort(kmeans_plus_plus(flat[:, None], k, seed)[:, 0])
    raise ValueError(f"unknown codebook initialization '{method}'; choose one of: {', '.join(INITS)}")


def kmeans_plus_plus(points: np.ndarray, k: int, seed: int = 0,
                     metric: Optional[np.ndarray] = None) -> np.ndarray:
    """k-means++ seeding of ``k`` rows of ``points`` (n, d). With fewer distinct points than ``k``,
    the remaining centroids repeat chosen points (they stay empty clusters)."""
    rng = np.random.default_rng(seed)
    points = np.asarray(points, np.float64)
    n = points.shape[0]
    chosen = [int(rng.integers(n))]
    nearest = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:
            chosen.append(chosen[-1])
            continue
        index = int(rng.choice(n, p=nearest / total))
        chosen.append(index)
        nearest = np.minimum(nearest, np.sum((points - points[index]) ** 2, axis=1))
    return points[chosen].copy()


def assign_scalar(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value (ties: the lower centroid)."""
    order = np.argsort(centroids, kind="stable")
    ordered = centroids[order]
    boundaries = (ordered[1:] + ordered[:-1]) / 2.0
    return order[np.searchsorted(boundaries, np.asarray(values).reshape(-1), side="left")]


def kmeans_1d(values: np.ndarray, centroids: np.ndarray, iterations: int = 20) -> Tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations on scalars from ``centroids``: (centroids, codes). Empty clusters keep
    their centroid (their code is never used)."""
    flat = np.asarray(values, np.float64).reshape(-1)
    centroids = np.asarray(centroids, np.float64).copy()
    codes = assign_scalar(flat, centroids)
    for _ in range(iterations):
        counts = np.bincount(codes, minlength=centroids.size)
        sums = np.bincount(codes, weights=flat, minlength=centroids.size)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new_codes = assign_scalar(flat, updated)
        centroids = updated
        if np.array_equal(new_codes, codes):
            break
        codes = new_codes
    return centroids, codes


def scalar_codebook(values: np.ndarray, bits: int, method: str, iterations: int = 20,
                    seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(2**bits centroids, code per value) for one tensor."""
    k = 1 << bits
    return kmeans_1d(values, init_codebook(values, k, method, seed), iterations)


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How a kernel is cut into sub-vectors of ``block`` weights.

    The kernel is transposed by ``perm`` and reshaped to a matrix (rows x columns) whose columns
    are output channels and whose rows are input-side weights (input channel, then kernel
    position); sub-vector (i, j) is rows [i*block, (i+1)*block) of column j, and sub-vectors are
    numbered i * columns + j. ``block = 1`` with the identity perm is plain element order.
    """

    shape: Tuple[int, ...]
    perm: Tuple[int, ...]
    block: int

    @property
    def columns(self) -> int:
        return int(self.shape[self.perm[-1]]) if len(self.shape) > 1 else 1

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape)) // self.columns

    @property
    def blocks(self) -> int:
        return self.rows // self.block

    @property
    def count(self) -> int:
        """Number of sub-vectors (codes)."""
        return self.blocks * self.columns

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __post_init__(self) -> None:
        if self.rows % self.block:
            raise ValueError(f"block {self.block} does not divide the {self.rows} input-side weights of a "
                             f"kernel of shape {self.shape}")

    def subvectors(self, kernel: np.ndarray) -> np.ndarray:
        """(count, block) sub-vectors of ``kernel``."""
        matrix = np.transpose(np.asarray(kernel).reshape(self.shape), self.perm).reshape(self.rows, self.columns)
        return matrix.reshape(self.blocks, self.block, self.columns).transpose(0, 2, 1).reshape(-1, self.block)

    def assemble(self, subvectors: np.ndarray) -> np.ndarray:
        """The kernel made of ``subvectors`` (the inverse of ``subvectors``)."""
        matrix = np.asarray(subvectors).reshape(self.blocks, self.columns, self.block).transpose(0, 2, 1)
        permuted = matrix.reshape([self.shape[p] for p in self.perm])
        return np.transpose(permuted, np.argsort(self.perm))

    def matrix(self, kernel: np.ndarray) -> np.ndarray:
        """(rows, columns): the kernel as the matrix of ``x @ W`` (rows in this layout's order)."""
        return np.transpose(np.asarray(kernel).reshape(self.shape), self.perm).reshape(self.rows, self.columns)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        permuted = np.asarray(matrix).reshape([self.shape[p] for p in self.perm])
        return np.transpose(permuted, np.argsort(self.perm))

    def to_json(self) -> dict:
        return {"perm": list(self.perm), "block": int(self.block)}


def scalar_layout(shape: Sequence[int]) -> Layout:
    return Layout(tuple(int(s) for s in shape), tuple(range(len(shape))), 1)


def input_major_perm(shape: Sequence[int], depthwise: bool = False) -> Tuple[int, ...]:
    """Axes order whose matrix has input channel, then kernel position, as rows and output channels
    as columns: (in, k1, k2, ..., out) for Conv/Dense kernels (..., in, out); depthwise kernels
    (kh, kw, in, multiplier) keep the kernel positions as rows and every channel as a column."""
    rank = len(shape)
    if rank <= 2 or depthwise:
        return tuple(range(rank))
    return (rank - 2, *range(rank - 2), rank - 1)


def fitting_block(rows: int, requested: int) -> int:
    """The largest divisor of ``rows`` that is at most ``requested`` (a layer's sub-vector length)."""
    for block in range(min(requested, rows), 0, -1):
        if rows % block == 0:
            return block
    return 1


# ---------------------------------------------------------------------------- product quantization
def block_metrics(gram: Optional[np.ndarray], layout: Layout) -> np.ndarray:
    """(blocks, block, block): the diagonal blocks of the input Gram matrix (identity without one)."""
    if gram is None:
        return np.broadcast_to(np.eye(layout.block), (layout.blocks, layout.block, layout.block)).copy()
    d = layout.block
    return np.stack([gram[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(layout.blocks)])


def weighted_kmeans(subvectors: np.ndarray, metrics: np.ndarray, k: int, *, columns: int, iterations: int = 20,
                    seed: int = 0, init: Optional[np.ndarray] = None,
                    damping: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """EM for a codebook of ``k`` sub-vectors minimizing sum_(i,j) (v_ij - c)^T H_i (v_ij - c).

    ``subvectors`` (count, d) are numbered i * columns + j (block i, output column j) and
    ``metrics`` (blocks, d, d) holds H_i. E-step: every sub-vector goes to the centroid nearest in
    its block's metric. M-step: each centroid is the exact minimizer for its members,
    c = (sum H_i)^-1 sum H_i v_ij (the plain mean when every H_i is the same). Returns
    (codebook (k, d), codes (count,)). An empty cluster is moved to the worst-served sub-vector.
    ``damping`` adds that fraction of the mean eigenvalue to every H_i, so directions the sampled
    inputs never excite (a channel dead on the sample) still keep the weights close.
    """
    with single_threaded_blas():
        return _weighted_kmeans(subvectors, metrics, k, columns, iterations, seed, init, damping)


def _weighted_kmeans(subvectors: np.ndarray, metrics: np.ndarray, k: int, columns: int, iterations: int, seed: int,
                     init: Optional[np.ndarray], damping: float) -> Tuple[np.ndarray, np.ndarray]:
    v = np.asarray(subvectors, np.float64)
    count, d = v.shape
    blocks = count // columns
    metrics = np.asarray(metrics, np.float64)
    block_of = np.repeat(np.arange(blocks), columns)
    scale = float(np.mean([np.trace(m) for m in metrics])) / d or 1.0
    metrics = metrics / scale + damping * np.eye(d)
    weighted = np.einsum("nde,ne->nd", metrics[block_of], v)  # H_i v for every sub-vector
    self_terms = np.einsum("nd,nd->n", v, weighted)
    centroids = np.asarray(init, np.float64).copy() if init is not None else kmeans_plus_plus(v, k, seed)
    codes = np.zeros(count, np.int64)
    rng = np.random.default_rng(seed + 1)
    ridge = 1e-8 * np.eye(d)
    for iteration in range(iterations + 1):
        # E-step: distance = v^T H v - 2 c^T H v + c^T H c, per block (its own H_i).
        cross = weighted @ centroids.T  # (count, k)
        centroid_terms = np.einsum("kd,bde,ke->bk", centroids, metrics, centroids)  # (blocks, k)
        distances = self_terms[:, None] - 2.0 * cross + centroid_terms[block_of]
        new_codes = np.argmin(distances, axis=1)
        if iteration and np.array_equal(new_codes, codes):
            break
        codes = new_codes
        if iteration == iterations:
            break
        # M-step: (sum of member metrics) c = sum of member H_i v.
        members = np.zeros((k, blocks))
        np.add.at(members, (codes, block_of), 1.0)
        systems = np.einsum("kb,bde->kde", members, metrics) + ridge
        targets = np.zeros((k, d))
        np.add.at(targets, codes, weighted)
        used = members.sum(axis=1) > 0
        centroids[used] = np.linalg.solve(systems[used], targets[used][..., None])[..., 0]
        empty = np.flatnonzero(~used)
        if empty.size:
            errors = distances[np.arange(count), codes]
            worst = np.argsort(errors)[::-1][:empty.size]
            centroids[empty] = v[worst] + 1e-6 * rng.standard_normal((empty.size, d))
    return centroids, codes


def reconstruction_error(inputs: np.ndarray, kernel_matrix: np.ndarray, approximation: np.ndarray,
                         targets: Optional[np.ndarray] = None) -> float:
    """Relative output error ||y - x W_hat||^2 / ||y||^2 with y = ``targets`` (default x W)."""
    reference = inputs @ kernel_matrix if targets is None else targets
    return float(np.sum((reference - inputs @ approximation) ** 2) / max(np.sum(reference ** 2), 1e-30))
