"""What each Keras layer class means for channel pruning, in one table.

A ``LayerRule`` says, for one layer class (and its subclasses, unless they have a rule of their
own: the rule is looked up along the class's MRO):

- ``classify``: the layer's *kind* for the channel analysis (producer, depthwise, batchnorm,
  transparent, flatten, merge, concat, barrier; see ``kinds``) with the reason for a barrier;
- ``slice_weights``: its weights restricted to the kept input and output channels (surgery);
- ``width_key``: the config key that holds a producer's output channels (surgery sets it);
- ``filter_weight``: which weight's last axis is the output filters (L1 scores);
- ``refit``: whether least-squares reconstruction may re-fit the layer from its sampled input
  patches (its kernel is (..., in, out) over those patches), or why not;
- its MACs are ``pocketflow.metrics``' (``register_mac_counter`` adds a counter for a new class).

A layer without a rule is a barrier: the channels that feed it are kept. A user's own layer
becomes prunable with ``register_layer_rule(MyLayer, LayerRule(...))``: for a per-channel layer,
``LayerRule(transparent)`` (weightless) or ``LayerRule(per_channel, slice_weights=slice_per_channel)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.kinds import (
    KIND_BARRIER, KIND_BATCHNORM, KIND_CONCAT, KIND_DEPTHWISE, KIND_FLATTEN, KIND_MERGE,
    KIND_PRODUCER, KIND_TRANSPARENT,
)

layers = tf.keras.layers

Classifier = Callable[[tf.keras.layers.Layer, List[tuple], List[tuple]], Tuple[str, str]]
Slicer = Callable[[tf.keras.layers.Layer, List[np.ndarray], np.ndarray, np.ndarray], List[np.ndarray]]


# ---------------------------------------------------------------------------- slicing
def keep_weights(layer, weights, in_indices, out_indices) -> List[np.ndarray]:
    """Weights that do not depend on the channels (or no weights)."""
    return weights


def slice_per_channel(layer, weights, in_indices, out_indices) -> List[np.ndarray]:
    """One value per channel in every weight (BatchNorm's gamma, beta and statistics)."""
    return [w[in_indices] for w in weights]


def slice_depthwise(layer, weights, in_indices, out_indices) -> List[np.ndarray]:
    return [weights[0][..., in_indices, :]] + [w[in_indices] for w in weights[1:]]


def slice_kernel(layer, weights, in_indices, out_indices) -> List[np.ndarray]:
    """A Conv1D/2D/3D kernel (..., in, out) or a Dense kernel (in, out), then per-output weights."""
    return [weights[0][..., in_indices, :][..., out_indices]] + [w[out_indices] for w in weights[1:]]


def slice_separable(layer, weights, in_indices, out_indices) -> List[np.ndarray]:
    multiplier = layer.depth_multiplier
    depthwise = weights[0][..., in_indices, :]
    rows = (in_indices[:, None] * multiplier + np.arange(multiplier)[None, :]).reshape(-1)
    pointwise = weights[1][..., rows, :][..., out_indices]
    return [depthwise, pointwise] + [w[out_indices] for w in weights[2:]]


# ---------------------------------------------------------------------------- kinds
def _single(kind: str) -> Classifier:
    def classify(layer, in_shapes, out_shapes):
        if len(in_shapes) != 1:
            return KIND_BARRIER, f"{type(layer).__name__} with {len(in_shapes)} inputs"
        return kind, ""
    return classify


producer = _single(KIND_PRODUCER)
transparent = _single(KIND_TRANSPARENT)
per_channel = _single(KIND_BATCHNORM)  # per-channel weights, channels pass through


def _barrier(why: str) -> Classifier:
    def classify(layer, in_shapes, out_shapes):
        return KIND_BARRIER, f"{type(layer).__name__} {why}"
    return classify


def _depthwise(layer, in_shapes, out_shapes):
    if layer.depth_multiplier != 1:
        return KIND_BARRIER, f"{type(layer).__name__} with depth_multiplier={layer.depth_multiplier}"
    return KIND_DEPTHWISE, ""


def _convolution(layer, in_shapes, out_shapes):
    if getattr(layer, "groups", 1) != 1:
        return KIND_BARRIER, f"{type(layer).__name__} with groups={layer.groups}"
    return KIND_PRODUCER, ""


def _batchnorm(layer, in_shapes, out_shapes):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = len(in_shapes[0])
    if [a % rank for a in axis] != [rank - 1]:
        return KIND_BARRIER, f"{type(layer).__name__} normalizes axis {layer.axis}, not the channel axis"
    return KIND_BATCHNORM, ""


# Element-wise activations: an Activation layer with one of these is channel-transparent.
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "tanh", "elu", "selu", "softplus",
    "softsign", "swish", "silu", "gelu", "exponential", "leaky_relu", "mish", "hard_silu",
    "hard_swish",
})


def _activation(layer, in_shapes, out_shapes):
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    if activation in ELEMENTWISE_ACTIVATIONS:
        return KIND_TRANSPARENT, ""
    return KIND_BARRIER, f"Activation '{activation}' mixes channels"


def _flatten(layer, in_shapes, out_shapes):
    if len(in_shapes) != 1:
        return KIND_BARRIER, f"{type(layer).__name__} with {len(in_shapes)} inputs"
    if any(d is None for d in in_shapes[0][1:]):
        return KIND_BARRIER, "Flatten of an input with unknown spatial size"
    return KIND_FLATTEN, ""


def _merge(layer, in_shapes, out_shapes):
    if len(set(in_shapes)) != 1:
        return KIND_BARRIER, f"{type(layer).__name__} broadcasts inputs of shapes {in_shapes}"
    return KIND_MERGE, ""


def _concatenate(layer, in_shapes, out_shapes):
    rank = len(in_shapes[0])
    if any(len(shape) != rank for shape in in_shapes):
        return KIND_BARRIER, f"{type(layer).__name__} of inputs with different ranks"
    if layer.axis % rank == rank - 1:
        return KIND_CONCAT, ""
    return KIND_MERGE, ""  # along a spatial axis: channel c of every input meets


# ---------------------------------------------------------------------------- re-fitting
def _refit_kernel(layer) -> Optional[str]:
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution '{layer.name}'"
    return None


def _not_refitted(layer) -> Optional[str]:
    return f"{type(layer).__name__} '{layer.name}' is not re-fitted"


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LayerRule:
    """What one layer class means for channel pruning (see the module docstring)."""

    classify: Classifier
    slice_weights: Slicer = keep_weights
    width_key: Optional[str] = None
    filter_weight: int = 0
    refit: Callable[[tf.keras.layers.Layer], Optional[str]] = _not_refitted


RULES: Dict[type, LayerRule] = {}


def register_layer_rule(layer_class: type, rule: LayerRule) -> None:
    """Say what ``layer_class`` (and its subclasses without a rule of their own) means for channels."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, tf.keras.layers.Layer)):
        raise TypeError(f"register_layer_rule needs a Keras layer class, not {layer_class!r}")
    RULES[layer_class] = rule


def rule_for(layer: tf.keras.layers.Layer) -> Optional[LayerRule]:
    """The rule of the layer's class, or of its nearest ancestor that has one; None: a barrier."""
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def _register(names: Sequence[str], rule: LayerRule) -> None:
    for name in names:
        if hasattr(layers, name):
            register_layer_rule(getattr(layers, name), rule)


_register(["Conv2D"], LayerRule(_convolution, slice_kernel, width_key="filters", refit=_refit_kernel))
_register(["Conv1D", "Conv3D"], LayerRule(_convolution, slice_kernel, width_key="filters"))
_register(["Dense"], LayerRule(producer, slice_kernel, width_key="units", refit=_refit_kernel))
_register(["SeparableConv1D", "SeparableConv2D"],
          LayerRule(_convolution, slice_separable, width_key="filters", filter_weight=1))
_register(["DepthwiseConv1D", "DepthwiseConv2D"], LayerRule(_depthwise, slice_depthwise))
_register(["Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"],
          LayerRule(_barrier("(transposed convolution) is not pruned")))
_register(["BatchNormalization"], LayerRule(_batchnorm, slice_per_channel))
_register(["Activation"], LayerRule(_activation))
# Layers that act on each channel independently and keep the channel count (SpatialDropout*
# derive from Dropout).
_register(["ReLU", "LeakyReLU", "ELU", "ThresholdedReLU", "Dropout", "GaussianDropout", "GaussianNoise",
           "AlphaDropout", "ActivityRegularization", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
           "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
           "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
           "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
           "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "Identity"],
          LayerRule(transparent))
_register(["Flatten"], LayerRule(_flatten))
_register(["Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average"], LayerRule(_merge))
_register(["Concatenate"], LayerRule(_concatenate))
