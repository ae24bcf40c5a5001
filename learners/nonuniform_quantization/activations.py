"""Layer input/output statistics for product quantization's activation objective.

For a Conv2D (as im2col: one row per output position, D = in_channels * kh * kw columns in the
``Layout`` row order) or a Dense layer, sampled on training images, we accumulate

    H = x~^T x~   and   G = x~^T y,   y = x W   (sums over sampled rows),

where x~ are the layer's inputs in the model being compressed (earlier layers already
quantized) and x, W the uncompressed baseline's inputs and kernel, at the same positions. Then
||y - x~ W_hat||^2 = tr(W_hat^T H W_hat) - 2 tr(W_hat^T G) + ||y||^2 for any W_hat, so the error
is known without keeping the rows, and W* = (H + ridge)^-1 G is the float kernel that best
reconstructs the baseline's outputs from the compressed inputs (the codebook then approximates
W* in the metric H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tensorflow as tf

from learners.nonuniform_quantization.codebooks import Layout

L = tf.keras.layers


@dataclass
class LayerStatistics:
    gram: np.ndarray  # (D, D) x~^T x~, rows in the layout's order
    cross: np.ndarray  # (D, out) x~^T y
    energy: float  # ||y||^2
    rows: int

    def error(self, matrix: np.ndarray) -> float:
        """Relative output error ||y - x~ W||^2 / ||y||^2 of the kernel matrix ``matrix`` (D, out)."""
        value = np.sum(matrix * (self.gram @ matrix)) - 2.0 * np.sum(matrix * self.cross) + self.energy
        return float(max(value, 0.0) / max(self.energy, 1e-30))

    def refit(self, ridge: float = 1e-3) -> np.ndarray:
        """W* = argmin ||y - x~ W||^2 + ridge * mean(diag H) * ||W||^2."""
        dimension = self.gram.shape[0]
        damping = ridge * float(np.trace(self.gram)) / dimension + 1e-12
        return np.linalg.solve(self.gram + damping * np.eye(dimension), self.cross)


def supports_activations(layer: tf.keras.layers.Layer) -> bool:
    """Conv2D (one group, channels last) and Dense: the layers whose outputs are x @ W."""
    if isinstance(layer, (L.DepthwiseConv2D, L.SeparableConv2D, L.Conv2DTranspose)):
        return False
    if isinstance(layer, L.Conv2D):
        return getattr(layer, "groups", 1) == 1 and layer.data_format == "channels_last"
    return isinstance(layer, L.Dense)


def input_rows(layer: tf.keras.layers.Layer, inputs: tf.Tensor) -> np.ndarray:
    """The layer's input as rows of x in ``x @ W`` (im2col for a convolution), columns in the
    layout's order (input channel, then kernel position)."""
    if isinstance(layer, L.Dense):
        values = np.asarray(inputs)
        return values.reshape(-1, values.shape[-1])
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    channels = int(inputs.shape[-1])
    patches = tf.image.extract_patches(inputs, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
                                       padding=layer.padding.upper())
    patches = tf.reshape(patches, [-1, kh, kw, channels])
    return tf.reshape(tf.transpose(patches, [0, 3, 1, 2]), [-1, channels * kh * kw]).numpy()


def layer_statistics(baseline: tf.keras.Model, work: tf.keras.Model, layer_name: str, layout: Layout,
                     kernel: np.ndarray, images: np.ndarray, rows: int, seed: int = 0,
                     batch_size: int = 64) -> Optional[LayerStatistics]:
    """H, G and ||y||^2 for one layer from ``rows`` sampled output positions of ``images``; None when
    the layer's input cannot be tapped (a layer called more than once, nested models)."""
    try:
        base_layer, work_layer = baseline.get_layer(layer_name), work.get_layer(layer_name)
        base_probe = tf.keras.Model(baseline.inputs, base_layer.input)
        work_probe = tf.keras.Model(work.inputs, work_layer.input)
    except (ValueError, AttributeError, RuntimeError):
        return None
    matrix = layout.matrix(kernel).astype(np.float64)
    dimension = matrix.shape[0]
    gram = np.zeros((dimension, dimension))
    cross = np.zeros((dimension, matrix.shape[1]))
    energy, taken = 0.0, 0
    rng = np.random.default_rng(seed)
    per_image = max(1, math.ceil(rows / max(1, len(images))))
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        base_rows = input_rows(base_layer, base_probe(batch, training=False))
        work_rows = input_rows(work_layer, work_probe(batch, training=False))
        count = min(len(base_rows), per_image * len(batch))
        pick = rng.choice(len(base_rows), size=count, replace=False)
        x = work_rows[pick].astype(np.float64)
        y = base_rows[pick].astype(np.float64) @ matrix
        gram += x.T @ x
        cross += x.T @ y
        energy += float(np.sum(y * y))
        taken += count
    return LayerStatistics(gram, cross, energy, taken)
