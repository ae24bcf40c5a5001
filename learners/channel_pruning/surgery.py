"""Model surgery: rebuild a functional Keras model with channels physically removed.

The model is re-created from its config with fewer ``filters``/``units`` in the pruned
producers; every layer's weights are copied, sliced along the output axis (producers)
and the input axis (consumers: Conv/Dense kernels, BatchNorm statistics, depthwise
kernels, separable kernels, Dense rows after a Flatten, Concatenate offsets). The result
contains only standard layers, so it saves and loads without custom objects.
"""

from __future__ import annotations

import contextlib
import importlib
import copy
from typing import Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf

from learners.channel_pruning import tf_ops
from learners.channel_pruning.graph import KIND_BATCHNORM, KIND_DEPTHWISE, KIND_PRODUCER, ChannelAnalysis, analyze
from learners.channel_pruning.layer_rules import rule_for

layers = tf.keras.layers


def _slice_weights(layer: tf.keras.layers.Layer, kind: Optional[str], weights: List[np.ndarray],
                   in_indices: Optional[np.ndarray], out_indices: Optional[np.ndarray]) -> List[np.ndarray]:
    """``weights`` of ``layer`` restricted to the kept input and output channels (its layer rule
    slices them; layers of other kinds keep all their channels, so their weights stay)."""
    if kind not in (KIND_PRODUCER, KIND_DEPTHWISE, KIND_BATCHNORM):
        return weights
    return rule_for(layer).slice_weights(layer, weights, in_indices, out_indices)


def _unsafe_deserialization():
    """Allow Lambda layers while rebuilding (the config comes from the live model, not a file),
    in whichever Keras package tf.keras resolved to (tf_keras under pocketflow.keras_setup)."""
    package = tf.keras.Model.__module__.split(".")[0]
    try:
        module = importlib.import_module(f"{package}.src.saving.serialization_lib")
    except ImportError:  # pragma: no cover - other Keras 2 layouts
        return contextlib.nullcontext()
    return module.SafeModeScope(False)


def _resize_channel_pad(entry: dict, analysis: ChannelAnalysis, name: str,
                        kept: Mapping[str, np.ndarray]) -> None:
    """A channel pad pads as many zeros as its bands keep; its Reshapes follow the new widths."""
    role = analysis.pad_role(name)
    layer_config = entry["config"]
    if role == "pad":
        before, after = analysis.pad_widths(name)
        width = len(analysis.output_indices(name, {}))  # before pruning
        kept_positions = analysis.output_indices(name, kept)
        padding = (int(np.sum(kept_positions < before)), int(np.sum(kept_positions >= width - after)))
        if tf_ops.is_tf_op(analysis.layer(name)):
            tf_ops.set_channel_padding(entry, *padding)  # tf.pad: the widths are a call argument
        else:
            layer_config["padding"] = padding
    elif role == "enter":
        layer_config["target_shape"] = tuple(layer_config["target_shape"][:-1]) + (
            len(analysis.input_indices(name, kept)),)
    elif role == "exit":
        layer_config["target_shape"] = tuple(layer_config["target_shape"][:-1]) + (
            len(analysis.output_indices(name, kept)),)


def prune(model: tf.keras.Model, keep: Mapping[str, np.ndarray],
          new_weights: Optional[Mapping[str, List[np.ndarray]]] = None,
          analysis: Optional[ChannelAnalysis] = None,
          custom_objects: Optional[Dict[str, object]] = None) -> tf.keras.Model:
    """A new model in which each group in ``keep`` has only the given channels.

    keep: group name -> kept channel indices (any order; groups not named keep all).
    new_weights: layer name -> weights to use instead of the sliced ones (same shapes as
    the pruned layer's), e.g. a consumer's kernel re-fitted by least squares.
    ``model`` is not modified.
    """
    analysis = analysis or analyze(model)
    kept = analysis.check_keep(keep)
    new_weights = dict(new_weights or {})
    config = copy.deepcopy(model.get_config())
    for entry in config["layers"]:
        layer_config = entry["config"]
        name = layer_config["name"]
        if analysis.pad_role(name) is not None:
            _resize_channel_pad(entry, analysis, name, kept)
        if analysis.layer_kind(name) != KIND_PRODUCER:
            continue
        layer_config[rule_for(analysis.layer(name)).width_key] = len(analysis.output_indices(name, kept))
    builder = tf.keras.Sequential if isinstance(model, tf.keras.Sequential) else tf.keras.Model
    # The config comes from a live model, not from a file, so its Lambda layers are as trusted
    # as the model itself: rebuild them without Keras' safe-mode refusal.
    with _unsafe_deserialization():
        pruned = builder.from_config(config, custom_objects=custom_objects)

    old_layers = {layer.name: layer for layer in model.layers}
    for new_layer in pruned.layers:
        name = new_layer.name
        old_layer = old_layers[name]
        weights = old_layer.get_weights()
        if not weights and name not in new_weights:
            continue
        kind = analysis.layer_kind(name)
        in_indices = analysis.input_indices(name, kept)
        out_indices = analysis.output_indices(name, kept)
        sliced = _slice_weights(old_layer, kind, weights, in_indices, out_indices)
        if name in new_weights:
            replacement = [np.asarray(w) for w in new_weights.pop(name)]
            expected = [tuple(w.shape) for w in sliced]
            if [w.shape for w in replacement] != expected:
                raise ValueError(f"new_weights['{name}'] has shapes {[w.shape for w in replacement]}; "
                                 f"the pruned layer needs {expected}")
            sliced = replacement
        new_layer.set_weights(sliced)
    if new_weights:
        raise ValueError(f"new_weights name layers that are not in the model: {sorted(new_weights)}")
    return pruned

