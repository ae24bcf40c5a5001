"""BatchNorm folding for the shipped low-bit file.

A BatchNormalization that directly follows a Conv/Dense layer is, at inference, a per-channel
gain g = gamma / sqrt(variance + epsilon) and shift beta - g * mean. Folded into the layer
(kernel * g, bias g * bias + shift) the file drops BN's four vectors per channel for one bias.
With per-channel quantization the fold is exact on the codes: only the channel's scale is
multiplied by g (``scale * g * (code - zero_point) = g * quantized``), so the folded file
decodes to precisely what the trained, fake-quantized model computes.

Only unambiguous pairs are folded: a top-level Conv1D/Conv2D/Dense/DepthwiseConv2D (multiplier
1) without activation, called once, whose only consumer is a BatchNormalization over the last
axis that is called once. Everything else (nested models, shared layers, other layouts) is left
as it is. The folded model is rebuilt from the original's config, so any functional graph
(Reshape/Permute glue, Lambda layers) keeps working.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import tensorflow as tf

L = tf.keras.layers
_PRODUCERS = (L.Conv1D, L.Conv2D, L.Dense, L.DepthwiseConv2D)
_EXCLUDED = (L.Conv2DTranspose, L.SeparableConv1D, L.SeparableConv2D, L.Conv3D)


@dataclass(frozen=True)
class FoldedPair:
    producer: str  # layer name of the Conv/Dense
    batchnorm: str  # layer name of the BatchNormalization folded into it
    kernel_attribute: str  # "kernel" or "depthwise_kernel"
    channel_axis: int  # axis of the kernel the BN channels run along


def _references(node: Any, name: str) -> int:
    """How often ``name`` is referenced as [name, node_index, tensor_index, ...] inside ``node``."""
    if isinstance(node, (list, tuple)):
        if len(node) >= 3 and node[0] == name and isinstance(node[1], int) and isinstance(node[2], int):
            return 1 + sum(_references(item, name) for item in node[3:])
        return sum(_references(item, name) for item in node)
    if isinstance(node, dict):
        return sum(_references(item, name) for item in node.values())
    return 0


def _rewired(node: Any, old: str, new: str) -> Any:
    if isinstance(node, list):
        if len(node) >= 3 and node[0] == old and isinstance(node[1], int) and isinstance(node[2], int):
            return [new] + [_rewired(item, old, new) for item in node[1:]]
        return [_rewired(item, old, new) for item in node]
    if isinstance(node, tuple):
        return tuple(_rewired(list(node), old, new))
    if isinstance(node, dict):
        return {key: _rewired(item, old, new) for key, item in node.items()}
    return node


def _single_input(entry: Mapping[str, Any]) -> Tuple[str, int, int] | None:
    nodes = entry.get("inbound_nodes") or []
    if len(nodes) != 1 or len(nodes[0]) != 1:
        return None
    reference = nodes[0][0]
    if not (isinstance(reference, (list, tuple)) and len(reference) >= 3):
        return None
    return reference[0], reference[1], reference[2]


def foldable_pairs(model: tf.keras.Model) -> List[FoldedPair]:
    """The (producer, BatchNorm) pairs of ``model`` that fold exactly (see the module docstring)."""
    config = model.get_config()
    entries = config.get("layers") if isinstance(config, dict) else None
    if not entries or not all("inbound_nodes" in entry for entry in entries):
        return []  # not a functional graph (e.g. Sequential): nothing is folded
    by_name = {entry["name"]: entry for entry in entries}
    pairs = []
    for entry in entries:
        if entry["class_name"] != "BatchNormalization":
            continue
        layer = model.get_layer(entry["name"])
        source = _single_input(entry)
        if source is None or source[1:] != (0, 0) or source[0] not in by_name:
            continue
        producer = model.get_layer(source[0])
        rank = len(producer.output.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if [a % rank for a in axes] != [rank - 1]:
            continue
        if not isinstance(producer, _PRODUCERS) or isinstance(producer, _EXCLUDED):
            continue
        if isinstance(producer, L.DepthwiseConv2D) and producer.depth_multiplier != 1:
            continue
        if getattr(producer.activation, "__name__", "") != "linear" or len(producer.inbound_nodes) != 1:
            continue
        if len(layer.inbound_nodes) != 1:
            continue
        consumers = sum(_references(other.get("inbound_nodes", []), producer.name) for other in entries)
        consumers += _references(config.get("output_layers", []), producer.name)
        if consumers != 1:
            continue
        attribute = "depthwise_kernel" if isinstance(producer, L.DepthwiseConv2D) else "kernel"
        kernel_rank = len(getattr(producer, attribute).shape)
        axis = kernel_rank - 2 if attribute == "depthwise_kernel" else kernel_rank - 1
        pairs.append(FoldedPair(producer.name, layer.name, attribute, axis))
    return pairs


def folded_model(model: tf.keras.Model, pairs: List[FoldedPair]) -> tf.keras.Model:
    """A new model with every pair's BatchNorm removed and its producer given a bias (weights
    are not set: ``fold_weights`` does that)."""
    from learners.uniform_quantization.qat import _unsafe_deserialization

    config = copy.deepcopy(model.get_config())
    removed = {pair.batchnorm: pair.producer for pair in pairs}
    producers = {pair.producer for pair in pairs}
    layers = []
    for entry in config["layers"]:
        if entry["name"] in removed:
            continue
        if entry["name"] in producers:
            entry["config"]["use_bias"] = True
        layers.append(entry)
    config["layers"] = layers
    for batchnorm, producer in removed.items():
        config["layers"] = _rewired(config["layers"], batchnorm, producer)
        config["output_layers"] = _rewired(config["output_layers"], batchnorm, producer)
    with _unsafe_deserialization():
        return tf.keras.Model.from_config(config)


def batchnorm_affine(layer: tf.keras.layers.BatchNormalization) -> Tuple[np.ndarray, np.ndarray]:
    """(gain, shift) per channel of a BatchNorm at inference."""
    variance = layer.moving_variance.numpy().astype(np.float64)
    mean = layer.moving_mean.numpy().astype(np.float64)
    gamma = layer.gamma.numpy().astype(np.float64) if layer.scale else np.ones_like(mean)
    beta = layer.beta.numpy().astype(np.float64) if layer.center else np.zeros_like(mean)
    gain = gamma / np.sqrt(variance + layer.epsilon)
    return gain.astype(np.float32), (beta - gain * mean).astype(np.float32)


def fold_weights(model: tf.keras.Model, folded: tf.keras.Model, pairs: List[FoldedPair],
                 kernels: Mapping[str, np.ndarray] | None = None) -> Dict[str, np.ndarray]:
    """Set ``folded``'s weights from ``model`` (kernels from ``kernels`` by layer name when given);
    returns the per-channel gain of every folded producer."""
    gains: Dict[str, np.ndarray] = {}
    by_producer = {pair.producer: pair for pair in pairs}
    kernels = kernels or {}
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        pair = by_producer.get(layer.name)
        if pair is None:
            layer.set_weights(source.get_weights())
            continue
        gain, shift = batchnorm_affine(model.get_layer(pair.batchnorm))
        kernel = np.asarray(kernels.get(layer.name, getattr(source, pair.kernel_attribute).numpy()), np.float32)
        shape = [1] * kernel.ndim
        shape[pair.channel_axis] = -1
        bias = source.bias.numpy() if getattr(source, "use_bias", False) else np.zeros_like(gain)
        layer.set_weights([kernel * gain.reshape(shape), (gain * bias + shift).astype(np.float32)])
        gains[layer.name] = gain
    return gains
