"""Model cost metrics: multiply-accumulates (MACs), parameters, bytes.

Convention: MACs count the multiply-accumulates of Conv2D, Conv2DTranspose,
DepthwiseConv2D, SeparableConv2D and Dense layers for one input (batch 1), read from the
Keras graph's shapes. Biases, BatchNorm, activations, pooling and additions are not
counted (they are a few percent at most in the nets we ship). Speedup is
MACs(baseline) / MACs(compressed).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import tensorflow as tf

layers = tf.keras.layers


def _shapes(layer: tf.keras.layers.Layer, model: tf.keras.Model) -> Iterator[Tuple[tuple, tuple]]:
    """(input shape, output shape) of every call of ``layer`` inside ``model``'s graph.

    A layer reused by another model (``tf.keras.Model(new_input, layer(new_input))``) gains a
    node there too; only the nodes of ``model`` count. Spatial sizes must be known.
    """
    network_nodes = getattr(model, "_network_nodes", None)  # Keras 2 functional models keep them here
    for index in range(len(layer._inbound_nodes)):  # noqa: SLF001 - Keras 2 keeps the graph here
        if network_nodes is not None and f"{layer.name}_ib-{index}" not in network_nodes:
            continue
        input_shape = tuple(layer.get_input_shape_at(index))
        output_shape = tuple(layer.get_output_shape_at(index))
        if any(d is None for d in input_shape[1:] + output_shape[1:]):
            raise ValueError(
                f"cannot count the MACs of layer '{layer.name}': its input/output shapes "
                f"{input_shape} -> {output_shape} have unknown sizes; build the model with a fixed "
                f"input size, e.g. tf.keras.Input(shape=(224, 224, 3))")
        yield input_shape, output_shape


def _spatial(shape: tuple) -> int:
    return int(np.prod([d for d in shape[1:-1]], dtype=np.int64)) if len(shape) > 2 else 1


def _conv_macs(layer: layers.Conv2D, input_shape: tuple, output_shape: tuple) -> int:
    kernel_h, kernel_w = layer.kernel_size
    in_channels, out_channels = int(input_shape[-1]), int(output_shape[-1])
    groups = getattr(layer, "groups", 1)
    return _spatial(output_shape) * out_channels * kernel_h * kernel_w * in_channels // groups


def _transpose_macs(layer: layers.Conv2DTranspose, input_shape: tuple, output_shape: tuple) -> int:
    kernel_h, kernel_w = layer.kernel_size
    return _spatial(input_shape) * int(input_shape[-1]) * kernel_h * kernel_w * int(output_shape[-1])


def _depthwise_macs(layer: layers.DepthwiseConv2D, input_shape: tuple, output_shape: tuple) -> int:
    kernel_h, kernel_w = layer.kernel_size
    return _spatial(output_shape) * int(input_shape[-1]) * layer.depth_multiplier * kernel_h * kernel_w


def _separable_macs(layer: layers.SeparableConv2D, input_shape: tuple, output_shape: tuple) -> int:
    kernel_h, kernel_w = layer.kernel_size
    depthwise_channels = int(input_shape[-1]) * layer.depth_multiplier
    spatial = _spatial(output_shape)
    return spatial * depthwise_channels * (kernel_h * kernel_w + int(output_shape[-1]))


def _dense_macs(layer: layers.Dense, input_shape: tuple, output_shape: tuple) -> int:
    leading = int(np.prod(input_shape[1:-1], dtype=np.int64)) if len(input_shape) > 2 else 1
    return leading * int(input_shape[-1]) * int(output_shape[-1])


# Order matters: subclasses first (SeparableConv2D and DepthwiseConv2D derive from Conv2D).
_COUNTERS: List[Tuple[type, Callable[..., int]]] = [
    (layers.SeparableConv2D, _separable_macs),
    (layers.DepthwiseConv2D, _depthwise_macs),
    (layers.Conv2DTranspose, _transpose_macs),
    (layers.Conv2D, _conv_macs),
    (layers.Dense, _dense_macs),
]


def register_mac_counter(layer_class: type, counter: Callable[..., int]) -> None:
    """Count the MACs of ``layer_class`` (and its subclasses) with ``counter(layer, input_shape,
    output_shape)``; checked before the built-in counters, so it can also replace one."""
    _COUNTERS.insert(0, (layer_class, counter))


def mac_counter(layer: tf.keras.layers.Layer) -> Callable[..., int] | None:
    """The counter of ``layer``'s MACs, or None for a layer whose MACs are not counted."""
    for kind, counter in _COUNTERS:
        if isinstance(layer, kind):
            return counter
    return None


def layer_macs(model: tf.keras.Model) -> Dict[str, int]:
    """MACs per counted layer (nested models are walked, names prefixed by the sub-model's)."""
    result: Dict[str, int] = {}
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            for name, macs in layer_macs(layer).items():
                result[f"{layer.name}/{name}"] = macs
            continue
        counter = mac_counter(layer)
        if counter is None:
            continue
        total = sum(counter(layer, inp, out) for inp, out in _shapes(layer, model))
        result[layer.name] = int(total)
    return result


def count_macs(model: tf.keras.Model) -> int:
    """Total multiply-accumulates for one input (see the module docstring for the convention)."""
    return int(sum(layer_macs(model).values()))


def count_params(model: tf.keras.Model) -> int:
    """All weights, trainable or not (BatchNorm statistics included), as Keras counts them."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def weight_bytes(model: tf.keras.Model) -> int:
    """Bytes of the weights as stored in memory (float32: 4 per parameter)."""
    return int(sum(int(np.prod(w.shape)) * w.dtype.size for w in model.weights))
