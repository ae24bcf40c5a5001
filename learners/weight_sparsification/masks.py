"""Which weights can be pruned, how many zeros each tensor gets, and the masks themselves.

Prunable weights are the kernels of Conv1D/2D/3D, Conv2DTranspose, DepthwiseConv2D,
SeparableConv2D (depthwise and pointwise) and Dense layers, found by walking the model
(nested models included); biases and BatchNorm are never pruned. Everything else in the
graph (Reshape, Permute, padding, custom glue) is left alone, so any functional model works.

Masks are our own (not TFMOT wrappers): a boolean array per kernel, applied by multiplying
the variable after every optimizer step. ``masks.npz`` in a run directory holds them for
later learners (``load_masks`` / ``apply_masks``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

L = tf.keras.layers

KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")
PATTERNS = ("unstructured", "2:4")
GROUP = 4  # M of the M:N pattern: groups of 4 consecutive input channels ...
GROUP_ZEROS = 2  # ... of which at least 2 are zero


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable kernel: where it lives and the axes that matter for patterns and file sizes."""

    key: str  # "<layer path>/<attribute>", e.g. "block2_conv/kernel" or "backbone/conv1/kernel"
    layer_path: str
    attribute: str
    shape: Tuple[int, ...]
    input_axis: Optional[int]  # the input-channel (reduction) axis for M:N groups; None: not groupable
    tflite_inner: int  # length of the innermost axis of the TFLite layout (the CSR index range)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def rows(self) -> int:
        """Rows of the TFLite CSR encoding (every axis but the innermost)."""
        return self.size // self.tflite_inner

    @property
    def groupable(self) -> bool:
        """Can carry the 2:4 pattern (input channels in whole groups of 4)."""
        return self.input_axis is not None and self.shape[self.input_axis] % GROUP == 0


def _layers(model: tf.keras.Model, prefix: str = "") -> Iterator[Tuple[str, tf.keras.layers.Layer]]:
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, tf.keras.Model):
            yield from _layers(layer, f"{path}/")
        else:
            yield path, layer


def _describe(layer: tf.keras.layers.Layer, attribute: str, shape: Tuple[int, ...]) -> Optional[Tuple]:
    """(input axis, TFLite inner length) of a kernel, or None when the layer is not prunable."""
    if isinstance(layer, (L.DepthwiseConv2D,)) or attribute == "depthwise_kernel":
        return None, shape[-2] * shape[-1]  # (kh, kw, in, multiplier): no reduction over channels
    if isinstance(layer, L.Conv2DTranspose):
        return len(shape) - 1, shape[-1]  # (kh, kw, out, in)
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense)) or attribute == "pointwise_kernel":
        if isinstance(layer, L.Dense) and len(shape) != 2:
            return None
        return len(shape) - 2, shape[-2]  # (..., in, out)
    return None


def prunable_weights(model: tf.keras.Model) -> List[PrunableWeight]:
    """Every prunable kernel of ``model`` in layer order (shared layers once)."""
    found: List[PrunableWeight] = []
    seen = set()
    for path, layer in _layers(model):
        for attribute in KERNEL_ATTRIBUTES:
            variable = getattr(layer, attribute, None)
            if not isinstance(variable, tf.Variable) or id(variable) in seen:
                continue
            shape = tuple(int(d) for d in variable.shape)
            described = _describe(layer, attribute, shape)
            if described is None:
                continue
            seen.add(id(variable))
            input_axis, inner = described
            found.append(PrunableWeight(f"{path}/{attribute}", path, attribute, shape, input_axis, int(inner)))
    return found


def variables_by_key(model: tf.keras.Model, weights: Sequence[PrunableWeight]) -> Dict[str, tf.Variable]:
    """The variables of ``weights`` inside ``model`` (a clone has the same layer paths)."""
    layers = dict(_layers(model))
    out = {}
    for weight in weights:
        layer = layers.get(weight.layer_path)
        variable = getattr(layer, weight.attribute, None) if layer is not None else None
        if variable is None or tuple(variable.shape) != weight.shape:
            raise ValueError(f"model has no prunable weight '{weight.key}' of shape {weight.shape}; masks belong "
                             f"to a model with the same architecture")
        out[weight.key] = variable
    return out


# ---------------------------------------------------------------------------- allocation
def density_bounds(weight: PrunableWeight, pattern: str, max_sparsity: float,
                   protected: bool) -> Tuple[int, int]:
    """(fewest, most) weights the tensor may keep."""
    if protected or (pattern == "2:4" and not weight.groupable):
        return weight.size, weight.size
    fewest = min(weight.size, max(1, int(math.ceil(weight.size * (1.0 - max_sparsity)))))
    most = weight.size // 2 if pattern == "2:4" else weight.size
    return min(fewest, most), most


def allocate(weights: Sequence[PrunableWeight], shape: Mapping[str, float], zeros: int, *, pattern: str,
             max_sparsity: float, protected: Sequence[str] = ()) -> Dict[str, int]:
    """Zeros per tensor so the total is exactly ``zeros`` (or the nearest the bounds allow).

    Each tensor keeps ``c * shape[key]`` of its weights (clipped to its bounds); the common
    scale ``c`` is found by bisection, then single weights are moved by largest remainder so
    the kept total is exact. The proposal's proportions between tensors are kept.
    """
    bounds = {w.key: density_bounds(w, pattern, max_sparsity, w.key in protected) for w in weights}
    sizes = {w.key: w.size for w in weights}
    total = sum(sizes.values())
    keep_target = total - int(zeros)
    fewest = sum(b[0] for b in bounds.values())
    most = sum(b[1] for b in bounds.values())
    if keep_target <= fewest:
        return {key: sizes[key] - bounds[key][0] for key in sizes}
    if keep_target >= most:
        return {key: sizes[key] - bounds[key][1] for key in sizes}
    weight_of = {key: max(float(shape.get(key, 1.0)), 1e-6) for key in sizes}

    def kept(scale: float) -> Dict[str, float]:
        return {key: min(bounds[key][1], max(bounds[key][0], scale * weight_of[key] * sizes[key]))
                for key in sizes}

    low, high = 0.0, 1.0 / min(weight_of.values())
    for _ in range(100):
        middle = (low + high) / 2
        if sum(kept(middle).values()) <= keep_target:
            low = middle
        else:
            high = middle
    real = kept(low)
    counts = {key: int(math.floor(value)) for key, value in real.items()}
    counts = {key: min(bounds[key][1], max(bounds[key][0], count)) for key, count in counts.items()}
    remainder = keep_target - sum(counts.values())
    order = sorted(sizes, key=lambda key: (real[key] - counts[key]), reverse=remainder > 0)
    while remainder != 0:
        moved = False
        for key in order:
            if remainder == 0:
                break
            step = 1 if remainder > 0 else -1
            if bounds[key][0] <= counts[key] + step <= bounds[key][1]:
                counts[key] += step
                remainder -= step
                moved = True
        if not moved:
            break
    return {key: sizes[key] - counts[key] for key in sizes}


# ---------------------------------------------------------------------------- masks
def magnitude_mask(values: np.ndarray, zeros: int, *, pattern: str = "unstructured",
                   input_axis: Optional[int] = None) -> np.ndarray:
    """Keep-mask (True = kept) with exactly ``zeros`` False entries, smallest magnitudes first.

    ``2:4``: the two smallest weights of every group of 4 consecutive input channels are the
    first to go; only after all of them (50%) are gone do other weights follow, by magnitude.
    So a tensor at 50% is exactly 2:4, and above 50% every group still has at least 2 zeros.
    """
    flat = np.abs(values).ravel().astype(np.float64)
    zeros = int(min(max(zeros, 0), flat.size))
    keep = np.ones(flat.size, bool)
    if zeros == 0:
        return keep.reshape(values.shape)
    if pattern == "2:4" and input_axis is not None:
        moved = np.moveaxis(np.abs(values), input_axis, -1)
        grouped = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // GROUP, GROUP))
        rank = np.argsort(np.argsort(grouped, axis=-1, kind="stable"), axis=-1, kind="stable")
        candidate = np.moveaxis((rank < GROUP_ZEROS).reshape(moved.shape), -1, input_axis).ravel()
        order = np.lexsort((flat, ~candidate))  # candidates first, each part by magnitude
        keep[order[:zeros]] = False
    else:
        keep[np.argpartition(flat, zeros - 1)[:zeros]] = False
    return keep.reshape(values.shape)


def nm_pattern_holds(values: np.ndarray, input_axis: int, group: int = GROUP, least_zeros: int = GROUP_ZEROS) -> bool:
    """True when every group of ``group`` consecutive input-channel weights has >= ``least_zeros`` zeros."""
    moved = np.moveaxis(values, input_axis, -1)
    grouped = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // group, group))
    return bool(np.all(np.sum(grouped == 0, axis=-1) >= least_zeros))


def compute_masks(variables: Mapping[str, tf.Variable], weights: Sequence[PrunableWeight],
                  zeros: Mapping[str, int], pattern: str) -> Dict[str, np.ndarray]:
    by_key = {w.key: w for w in weights}
    return {key: magnitude_mask(variables[key].numpy(), zeros.get(key, 0), pattern=pattern,
                                input_axis=by_key[key].input_axis)
            for key in variables}


class MaskSet:
    """Masks held as TensorFlow variables next to the model's kernels; ``apply()`` zeroes the
    pruned weights (one compiled function for all kernels, cheap enough to run after every step)."""

    def __init__(self, variables: Mapping[str, tf.Variable], masks: Mapping[str, np.ndarray]) -> None:
        self.variables = dict(variables)
        self._masks = {key: tf.Variable(np.asarray(masks[key], np.float32), trainable=False,
                                        name=f"mask_{i}") for i, key in enumerate(self.variables)}
        self._apply = tf.function(self._apply_all)

    def _apply_all(self) -> None:
        for key, variable in self.variables.items():
            variable.assign(tf.where(self._masks[key] > 0.5, variable, tf.zeros_like(variable)))

    def apply(self) -> None:
        self._apply()

    def update(self, masks: Mapping[str, np.ndarray]) -> None:
        for key, mask in masks.items():
            self._masks[key].assign(np.asarray(mask, np.float32))

    def numpy(self) -> Dict[str, np.ndarray]:
        return {key: mask.numpy() > 0.5 for key, mask in self._masks.items()}


# ---------------------------------------------------------------------------- measuring and files
def zero_counts(model: tf.keras.Model, weights: Sequence[PrunableWeight]) -> Dict[str, int]:
    variables = variables_by_key(model, weights)
    return {key: int(np.sum(variable.numpy() == 0)) for key, variable in variables.items()}


def sparsity(model: tf.keras.Model, weights: Sequence[PrunableWeight]) -> float:
    """Fraction of prunable weights that are exactly zero."""
    total = sum(w.size for w in weights)
    return sum(zero_counts(model, weights).values()) / total if total else 0.0


def save_masks(path: Path, masks: Mapping[str, np.ndarray]) -> int:
    """Write ``masks.npz`` (key -> bool array, True = kept); returns its size in bytes."""
    from pocketflow.export import write_atomic

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{key: np.asarray(mask, bool) for key, mask in masks.items()})
    write_atomic(Path(path), buffer.getvalue())
    return len(buffer.getvalue())


def load_masks(path: Path) -> Dict[str, np.ndarray]:
    """Masks written by the weight-sparse learner: '<layer path>/<attribute>' -> bool array (True = kept)."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {key: data[key].astype(bool) for key in data.files}


def apply_masks(model: tf.keras.Model, masks: Mapping[str, np.ndarray]) -> None:
    """Zero the pruned weights of ``model`` in place (e.g. after a quantization learner's step)."""
    layers = dict(_layers(model))
    for key, mask in masks.items():
        path, attribute = key.rsplit("/", 1)
        variable = getattr(layers.get(path), attribute, None)
        if variable is None or tuple(variable.shape) != mask.shape:
            raise ValueError(f"mask '{key}' of shape {mask.shape} matches no kernel of the model")
        variable.assign(variable.numpy() * mask.astype(variable.dtype.as_numpy_dtype))
