"""Low-bit uniform weight quantization: per-channel quantizers, clipping, and STE training.

A kernel is quantized per output channel (the last axis of Conv2D/Dense kernels, the input
channel axis of depthwise kernels) to ``bits`` in [2, 8]:

- ``asymmetric``: the channel's range [min, max], shrunk around its centre by ``ratio``, is
  cut into 2**bits - 1 steps; value = scale * (code - zero_point), codes in [0, 2**bits - 1],
  the zero point a float (weights need no exact zero, and both range ends are then levels).
- ``symmetric``: scale = ratio * max|w| / (2**(bits-1) - 1); codes q + 2**(bits-1) for
  q in [-(2**(bits-1) - 1), 2**(bits-1) - 1] (2 bits: ternary {-s, 0, s}).

Both are the ``affine`` decoder of ``learners.packing`` (scales then zero points per channel),
so the shipped file decodes to exactly what training saw. ``ratio`` (per channel, <= 1) clips
outliers; ``mse_ratios`` picks it per channel by the smallest squared error on a grid.

Training is straight-through (STE): ``ShadowQuantizer`` keeps float "shadow" kernels beside
the model. The model's kernels always hold quantized values, so the forward pass and the
gradients see the quantized network; after each optimizer step the hook adds the step's
update to the shadow and re-quantizes it. That is d(loss)/d(shadow) = d(loss)/d(quantized):
the straight-through estimator, on any functional model, without wrapping its layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

SCHEMES = ("asymmetric", "symmetric")
MIN_BITS, MAX_BITS = 2, 8
CLIP_GRID = tuple(np.round(np.linspace(0.3, 1.0, 15), 4))  # clipping ratios the MSE search tries


def channel_axis_of(attribute: str, shape: Sequence[int], input_axis: Optional[int]) -> int:
    """The axis that indexes channels of a kernel (one scale and zero point per entry): the output
    axis, except for depthwise kernels (kh, kw, in, multiplier), which use their input axis.
    ``input_axis`` is the reduction axis (Conv2DTranspose kernels are (kh, kw, out, in))."""
    rank = len(shape)
    if attribute == "depthwise_kernel" or input_axis is None or input_axis == rank - 1:
        return rank - 2
    return rank - 1


def _reduce_axes(rank: int, axis: int) -> Tuple[int, ...]:
    return tuple(i for i in range(rank) if i != axis)


def _per_channel(vector: tf.Tensor, rank: int, axis: int) -> tf.Tensor:
    """A per-channel vector shaped to broadcast against the kernel."""
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(vector, shape)


def quantize(weights, bits, axis: int, scheme: str = "asymmetric",
             ratio=None) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(codes, scales, zero_points) of ``weights``; codes are whole numbers in [0, 2**bits - 1]
    (as float32), scales and zero points one per channel along ``axis``.

    ``bits`` may be a Python number or a scalar tensor (one traced function serves every width);
    ``ratio`` is a scalar or per-channel clipping ratio in (0, 1] (None: 1, no clipping).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
    weights = tf.convert_to_tensor(weights, tf.float32)
    rank = weights.shape.rank
    axis = axis % rank
    reduce = _reduce_axes(rank, axis)
    bits = tf.cast(bits, tf.float32)
    channels = tf.shape(weights)[axis]
    ratio = tf.ones([channels], tf.float32) if ratio is None else \
        tf.broadcast_to(tf.cast(ratio, tf.float32), [channels])
    if scheme == "symmetric":
        half = tf.pow(2.0, bits - 1.0)
        levels = half - 1.0  # codes q + half with |q| <= levels
        largest = tf.reduce_max(tf.abs(weights), axis=reduce) * ratio
        scales = tf.where(largest > 0, largest / levels, tf.ones_like(largest))
        zero_points = tf.fill([channels], half)
        q = tf.clip_by_value(tf.round(weights / _per_channel(scales, rank, axis)), -levels, levels)
        return q + half, scales, zero_points
    top = tf.pow(2.0, bits) - 1.0
    low, high = tf.reduce_min(weights, axis=reduce), tf.reduce_max(weights, axis=reduce)
    centre, half_range = (low + high) / 2.0, (high - low) / 2.0 * ratio
    low = centre - half_range
    spread = 2.0 * half_range
    scales = tf.where(spread > 0, spread / top, tf.ones_like(spread))
    zero_points = -low / scales
    codes = tf.clip_by_value(tf.round(weights / _per_channel(scales, rank, axis)
                                      + _per_channel(zero_points, rank, axis)), 0.0, top)
    return codes, scales, zero_points


def dequantize(codes, scales, zero_points, axis: int) -> tf.Tensor:
    """value = scale[c] * (code - zero_point[c]): the same arithmetic as the ``affine`` decoder."""
    codes = tf.convert_to_tensor(codes, tf.float32)
    rank = codes.shape.rank
    axis = axis % rank
    return (codes - _per_channel(zero_points, rank, axis)) * _per_channel(scales, rank, axis)


def quantized_values(weights, bits, axis: int, scheme: str = "asymmetric", ratio=None) -> tf.Tensor:
    """The quantized weights (dequantized back to float), no gradient."""
    return dequantize(*quantize(weights, bits, axis, scheme, ratio), axis)


def fake_quantize(weights, bits, axis: int, scheme: str = "asymmetric", ratio=None) -> tf.Tensor:
    """Quantize in the forward pass; the gradient passes straight through (STE, identity)."""

    @tf.custom_gradient
    def _fake(values):
        def grad(upstream):
            return upstream

        return quantized_values(values, bits, axis, scheme, ratio), grad

    return _fake(tf.convert_to_tensor(weights, tf.float32))


def mse_ratios(weights: np.ndarray, bits: int, axis: int, scheme: str,
               grid: Sequence[float] = CLIP_GRID) -> np.ndarray:
    """Per channel, the clipping ratio of ``grid`` with the smallest squared quantization error."""
    weights = np.asarray(weights, np.float32)
    axis = axis % weights.ndim
    reduce = _reduce_axes(weights.ndim, axis)
    errors = []
    for ratio in grid:
        approx = quantized_values(weights, bits, axis, scheme, float(ratio)).numpy()
        errors.append(np.sum(np.square(approx - weights), axis=reduce))
    return np.asarray(grid, np.float32)[np.argmin(np.stack(errors), axis=0)]


# ---------------------------------------------------------------------------- STE training
@dataclass(frozen=True)
class KernelSpec:
    """How one kernel is quantized."""

    key: str
    variable: tf.Variable
    axis: int


class ShadowQuantizer:
    """``after_step`` hook: straight-through training of quantized kernels with float shadows.

    ``configure`` sets per-kernel bits and clipping ratios (variables, so one traced update
    serves every trial); ``start`` copies the model's current kernels into the shadows and
    quantizes the model; each call after an optimizer step moves the shadows by that step's
    update and quantizes again.
    """

    def __init__(self, kernels: Sequence[KernelSpec], scheme: str = "asymmetric") -> None:
        self.kernels = list(kernels)
        self.scheme = scheme
        self.shadow = {k.key: tf.Variable(k.variable.read_value(), trainable=False, name=f"shadow_{i}")
                       for i, k in enumerate(self.kernels)}
        self.last = {k.key: tf.Variable(k.variable.read_value(), trainable=False, name=f"quantized_{i}")
                     for i, k in enumerate(self.kernels)}
        self.bits = {k.key: tf.Variable(8.0, trainable=False, name=f"bits_{i}") for i, k in enumerate(self.kernels)}
        self.ratio = {k.key: tf.Variable(tf.ones([int(k.variable.shape[k.axis])]), trainable=False,
                                         name=f"ratio_{i}") for i, k in enumerate(self.kernels)}
        self._functions: Dict[Tuple[str, bool], tf.types.experimental.GenericFunction] = {}

    def configure(self, bits: Mapping[str, int], ratios: Mapping[str, np.ndarray], scheme: str) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
        self.scheme = scheme
        for kernel in self.kernels:
            self.bits[kernel.key].assign(float(bits[kernel.key]))
            self.ratio[kernel.key].assign(np.asarray(ratios[kernel.key], np.float32))

    def _update(self, follow: bool) -> None:
        for kernel in self.kernels:
            shadow, last = self.shadow[kernel.key], self.last[kernel.key]
            if follow:
                shadow.assign_add(kernel.variable - last)  # the optimizer's step, taken on the shadow
            quantized = quantized_values(shadow, self.bits[kernel.key], kernel.axis, self.scheme,
                                         self.ratio[kernel.key])
            kernel.variable.assign(quantized)
            last.assign(quantized)

    def _function(self, follow: bool):
        key = (self.scheme, follow)
        if key not in self._functions:
            self._functions[key] = tf.function(lambda: self._update(follow))
        return self._functions[key]

    def start(self) -> None:
        """Shadows <- the model's kernels (float); the model's kernels <- their quantized values."""
        for kernel in self.kernels:
            self.shadow[kernel.key].assign(kernel.variable)
        self._function(False)()

    def __call__(self) -> None:
        self._function(True)()

    def finish(self) -> None:
        self._function(False)()

    def encoded(self, key: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(codes as int64, scales, zero points, bits) of one kernel's current shadow."""
        kernel = next(k for k in self.kernels if k.key == key)
        bits = int(round(float(self.bits[key].numpy())))
        codes, scales, zero_points = quantize(self.shadow[key], bits, kernel.axis, self.scheme, self.ratio[key])
        return (np.rint(codes.numpy()).astype(np.int64), scales.numpy().astype(np.float32),
                zero_points.numpy().astype(np.float32), bits)


def distinct_per_channel(values: np.ndarray, axis: int) -> int:
    """The largest number of distinct values any channel (along ``axis``) of ``values`` holds."""
    moved = np.moveaxis(np.asarray(values), axis % np.ndim(values), 0)
    return max(int(np.unique(channel).size) for channel in moved) if moved.size else 0


def kernel_specs(model: tf.keras.Model, keys: Optional[Sequence[str]] = None):
    """``KernelSpec`` of every quantizable kernel (Conv/Depthwise/Separable/Dense), in layer order."""
    from learners.weight_sparsification.masks import prunable_weights, variables_by_key

    weights = prunable_weights(model)
    if keys is not None:
        wanted = set(keys)
        weights = [w for w in weights if w.key in wanted]
    variables = variables_by_key(model, weights)
    return [KernelSpec(w.key, variables[w.key], channel_axis_of(w.attribute, w.shape, w.input_axis))
            for w in weights]
