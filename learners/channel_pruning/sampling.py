"""Sampling a layer's input as its kernel sees it, and the baseline statistics a search reuses.

Selection (LASSO, greedy) and reconstruction both work on rows of a reader's input patches,
taken at random output positions of a batch of images; the positions of a layer depend only on
the seed and the layer's name, so the baseline's rows and every candidate's rows correspond.
The second moments ``S = [X, 1]^T [X, 1]`` of those rows are all selection needs, so memory does
not grow with the number of samples.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from learners.channel_pruning.layer_rules import rule_for

MAX_FEATURES = 4096  # terminators with more input features (k*k*C) are not re-fitted
TARGET_CACHE_BYTES = 512 * 2 ** 20  # the baseline's re-fit targets kept for the next candidates, at most


def _reconstructible(layer: tf.keras.layers.Layer) -> Optional[str]:
    """None when the LASSO/least-squares model applies to ``layer`` (its layer rule says), else why not."""
    rule = rule_for(layer)
    return rule.refit(layer) if rule is not None else f"{type(layer).__name__} '{layer.name}' is not re-fitted"


def _flat_kernel(layer: tf.keras.layers.Layer) -> np.ndarray:
    kernel = layer.get_weights()[0]
    return kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)


def _features(layer: tf.keras.layers.Layer, inputs: np.ndarray, positions: int,
              rng: np.random.Generator) -> np.ndarray:
    """Sampled rows of the layer's input as its kernel sees them: (rows, kernel features)."""
    if isinstance(layer, tf.keras.layers.Dense):
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if rows.shape[1] > positions:
            pick = rng.integers(0, rows.shape[1], size=(rows.shape[0], positions))
            rows = np.take_along_axis(rows, pick[:, :, None], axis=1)
        return rows.reshape(-1, inputs.shape[-1])
    kernel_h, kernel_w = layer.kernel_size
    stride_h, stride_w = layer.strides
    dilation_h, dilation_w = layer.dilation_rate
    batch, height, width, channels = inputs.shape
    out_h, out_w = int(layer.output_shape[1]), int(layer.output_shape[2])
    if layer.padding == "same":
        pad_h = max((out_h - 1) * stride_h + (kernel_h - 1) * dilation_h + 1 - height, 0)
        pad_w = max((out_w - 1) * stride_w + (kernel_w - 1) * dilation_w + 1 - width, 0)
        inputs = np.pad(inputs, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                                 (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    count = min(positions, out_h * out_w)
    flat = np.stack([rng.choice(out_h * out_w, size=count, replace=False) for _ in range(batch)])
    image = np.repeat(np.arange(batch), count)
    row, col = (flat // out_w).reshape(-1), (flat % out_w).reshape(-1)
    rows = row[:, None] * stride_h + np.arange(kernel_h)[None, :] * dilation_h       # (R, kh)
    cols = col[:, None] * stride_w + np.arange(kernel_w)[None, :] * dilation_w       # (R, kw)
    patches = inputs[image[:, None, None], rows[:, :, None], cols[:, None, :], :]     # (R, kh, kw, C)
    return patches.reshape(len(image), kernel_h * kernel_w * channels)


def _positions_rng(seed: int, layer_name: str) -> np.random.Generator:
    """The sampled positions of one layer's input: the same for the baseline and every candidate
    (whatever else is sampled or cached), so their rows correspond."""
    return np.random.default_rng([seed, zlib.crc32(layer_name.encode())])


@dataclass
class _Moments:
    """Second moments of a terminator's sampled input, with a constant-1 feature last."""

    moments: np.ndarray
    rows: int = 0


@dataclass
class BaselineCache:
    """What every candidate of one search computes from the baseline alike, computed once.

    ``moments``: each reader's sampled input moments (LASSO's statistics, for every group's
    readers on the first candidate). ``targets``: the baseline's outputs at the sampled positions,
    per reader and chunk of images (the sequential re-fit's right-hand side), kept up to
    TARGET_CACHE_BYTES. Valid for one model, one array of sample images and one seed.
    """

    moments: Dict[str, _Moments] = field(default_factory=dict)
    targets: Dict[str, List[np.ndarray]] = field(default_factory=dict)
    target_bytes: int = 0

    def keep_targets(self, name: str, targets: List[np.ndarray]) -> None:
        size = sum(target.nbytes for target in targets)
        if self.target_bytes + size <= TARGET_CACHE_BYTES:
            self.targets[name] = targets
            self.target_bytes += size


def _sample_moments(model: tf.keras.Model, terminators: List[str], images: np.ndarray,
                    positions: int, batch_size: int, seed: int) -> Dict[str, _Moments]:
    """Accumulate [X, 1]^T [X, 1] for the input of every terminator over ``images``."""
    layers_ = [model.get_layer(name) for name in terminators]
    rngs = {layer.name: _positions_rng(seed, layer.name) for layer in layers_}
    probe = tf.keras.Model(model.inputs, [layer.input for layer in layers_])
    result = {}
    for layer in layers_:
        features = _flat_kernel(layer).shape[0] + 1
        result[layer.name] = _Moments(np.zeros((features, features), dtype=np.float64))
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start:start + batch_size], training=False)
        if len(layers_) == 1:
            outputs = [outputs]
        for layer, output in zip(layers_, outputs):
            rows = _features(layer, np.asarray(output, dtype=np.float32), positions,
                             rngs[layer.name]).astype(np.float64)
            rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
            entry = result[layer.name]
            entry.moments += rows.T @ rows
            entry.rows += rows.shape[0]
    return result


def _feature_channels(layer: tf.keras.layers.Layer, features: int) -> np.ndarray:
    """Input-channel position of every kernel feature (kernel flattened as (..., in, out))."""
    in_channels = int(layer.input_shape[-1])
    return np.arange(features) % in_channels
