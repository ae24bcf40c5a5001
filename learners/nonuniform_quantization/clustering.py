"""Codebook fine-tuning: train, then pull every cluster together (codes fixed, or re-assigned).

After each optimizer step every weight (or sub-vector) is replaced by the mean of its cluster.
With SGD, momentum and L2 decay all linear in the gradient, this is exactly training the
centroids with each cluster's gradient averaged over its members (Deep Compression accumulates
them; the mean keeps the step size independent of the cluster's population), so the model keeps
at most 2**bits distinct values (sub-vectors) per kernel throughout. It works on any functional
model (no wrapper layers), Reshape/Permute glue included, and under Horovod (every rank applies
the same projection to the same averaged update).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from learners.nonuniform_quantization.artifact import QuantizedKernel
from learners.nonuniform_quantization.codebooks import Layout


def _subvectors(tensor: tf.Tensor, layout: Layout) -> tf.Tensor:
    matrix = tf.reshape(tf.transpose(tf.reshape(tensor, layout.shape), layout.perm), [layout.rows, layout.columns])
    blocks = tf.reshape(matrix, [layout.blocks, layout.block, layout.columns])
    return tf.reshape(tf.transpose(blocks, [0, 2, 1]), [-1, layout.block])


def _assemble(rows: tf.Tensor, layout: Layout) -> tf.Tensor:
    blocks = tf.transpose(tf.reshape(rows, [layout.blocks, layout.columns, layout.block]), [0, 2, 1])
    permuted = tf.reshape(blocks, [layout.shape[p] for p in layout.perm])
    inverse = [layout.perm.index(axis) for axis in range(len(layout.perm))]
    return tf.transpose(permuted, inverse)


class ClusterProjection:
    """``after_step`` hook: every quantized kernel set to its cluster means (codes fixed)."""

    def __init__(self, kernels: Mapping[str, Tuple[QuantizedKernel, tf.Variable]]) -> None:
        self._items = [(variable, kernel.layout, tf.constant(kernel.codes, tf.int32), kernel.centroids)
                       for kernel, variable in kernels.values()]
        self._project = tf.function(self._apply)

    def _apply(self) -> None:
        for variable, layout, codes, centroids in self._items:
            means = tf.math.unsorted_segment_mean(_subvectors(variable, layout), codes, centroids)
            variable.assign(_assemble(tf.gather(means, codes), layout))

    def __call__(self) -> None:
        if self._items:
            self._project()

    def finish(self) -> None:
        self()


class AdaptiveClusterProjection:
    """``after_step`` hook for scalar codebooks whose codes may change: straight-through training of
    a full-precision shadow of each kernel, re-clustered after every step.

    The optimizer's step is taken at the quantized weights (the model only ever holds centroids) and
    added to the shadow; each shadow weight then joins its nearest centroid (in one dimension the
    clusters are intervals between centroid midpoints) and every centroid moves to the mean of its
    members (one Lloyd step; an empty cluster keeps its centroid). With fixed codes a weight that
    the initial clustering put on the wrong side of a boundary stays there for good, which costs
    most at 2 bits; here it can cross once its gradient says so. Same step on every rank under
    Horovod, so ranks stay identical.
    """

    def __init__(self, kernels: Mapping[str, Tuple[QuantizedKernel, tf.Variable]],
                 shadows: Mapping[str, np.ndarray]) -> None:
        self._kernels = kernels
        self._items = []
        for key, (kernel, variable) in kernels.items():
            if kernel.layout.block != 1:
                raise ValueError(f"{key}: adaptive codes need a scalar codebook (block 1), not {kernel.layout.block}")
            current = variable.numpy().reshape(-1)
            shadow = np.asarray(shadows.get(key, current), np.float32).reshape(-1)
            table = np.sort(kernel.codebook_of(variable.numpy()).reshape(-1))
            self._items.append((key, variable, tf.Variable(shadow, trainable=False),
                                tf.Variable(current, trainable=False), tf.Variable(table, trainable=False),
                                tf.Variable(np.zeros(current.size, np.int32), trainable=False)))
        self._project = tf.function(self._apply)

    def _apply(self) -> None:
        for _, variable, shadow, shown, table, codes in self._items:
            current = tf.reshape(variable, [-1])
            shadow.assign_add(current - shown)
            centroids = tf.sort(table)
            assigned = tf.searchsorted((centroids[1:] + centroids[:-1]) / 2.0, shadow, side="left", out_type=tf.int32)
            count = tf.shape(centroids)[0]
            members = tf.math.unsorted_segment_sum(tf.ones_like(shadow), assigned, count)
            sums = tf.math.unsorted_segment_sum(shadow, assigned, count)
            means = tf.where(members > 0, sums / tf.maximum(members, 1.0), centroids)
            values = tf.gather(means, assigned)
            variable.assign(tf.reshape(values, tf.shape(variable)))
            shown.assign(values)
            table.assign(means)
            codes.assign(assigned)

    def __call__(self) -> None:
        if self._items:
            self._project()

    def finish(self) -> Dict[str, np.ndarray]:
        """Project once more, store the final codes in the kernels; the shadows, for a later stage."""
        self()
        shadows = {}
        for key, _, shadow, _, _, codes in self._items:
            self._kernels[key][0].codes = codes.numpy().astype(np.int64)
            shadows[key] = shadow.numpy()
        return shadows


# ---------------------------------------------------------------------------- bit allocation by bytes
def fit_bits_to_bytes(proposed: Mapping[str, float], cost: Mapping[str, Sequence[float]], budget: float,
                      low: Mapping[str, int], high: Mapping[str, int]) -> Optional[Dict[str, int]]:
    """Integer bits per layer whose total cost fits ``budget``, as close to the proposal as the budget allows.

    ``cost[name][b]`` is the layer's bytes at ``b`` bits (codes and codebook, so not linear in b).
    Starting from the rounded proposal, one bit at a time is taken from the layer furthest above its
    proposal (ties: the one that saves most bytes); then the bytes left are given back one bit at a
    time to the layers furthest below their proposal (ties: the cheapest step). None: even every
    layer at its lowest width does not fit.
    """
    bits = {n: int(min(high[n], max(low[n], math.floor(p + 0.5)))) for n, p in proposed.items()}
    used = sum(cost[n][bits[n]] for n in bits)
    while used > budget + 1e-9:
        reducible = [n for n in bits if bits[n] > low[n]]
        if not reducible:
            return None
        name = max(reducible, key=lambda n: (bits[n] - proposed[n], cost[n][bits[n]] - cost[n][bits[n] - 1], n))
        used -= cost[name][bits[name]] - cost[name][bits[name] - 1]
        bits[name] -= 1
    changed = True
    while changed:
        changed = False
        for name in sorted(bits, key=lambda n: (bits[n] - proposed[n],
                                                cost[n][min(bits[n] + 1, high[n])] - cost[n][bits[n]], n)):
            if bits[name] < high[name]:
                step = cost[name][bits[name] + 1] - cost[name][bits[name]]
                if used + step <= budget + 1e-9:
                    bits[name] += 1
                    used += step
                    changed = True
                    break
    return bits


def weighted_average(values: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    total = sum(sizes[n] for n in values)
    return sum(values[n] * sizes[n] for n in values) / total if total else 0.0

