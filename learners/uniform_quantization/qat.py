"""Quantization-aware training models with tensorflow-model-optimization, and what they leave behind.

Only layers TFMOT's default 8-bit scheme knows are annotated (Conv2D, Dense, BatchNormalization
after a convolution, ReLU, Add, pooling, padding, reshapes...); any other layer stays float and
is listed, so a user model with a custom layer still gets a QAT model instead of an error.
After training, the learned weights are copied back into a plain Keras clone of the baseline
(no wrappers, no custom objects); the int8 TFLite file is converted from the QAT model itself,
so the converter uses the ranges the fake-quantizers learned.

A QAT model trains in bfloat16 (train.precision) through a mixed-precision twin like any other model:
this module tells the core how to rebuild TFMOT's wrappers for it (``register_twin_rebuild``). The
wrapped layers compute in bfloat16, while every fake-quantizer runs in float32 on the float32 weights
and ranges: TensorFlow's fake-quant kernels take float32 only, and the grid a layer trains against
must be the one the converter later reads from those float32 variables.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from pocketflow.export import load_interpreter
from pocketflow.precision import register_twin_rebuild

import tensorflow_model_optimization as tfmot  # noqa: E402  (tf.keras is tf_keras: pocketflow.keras_setup)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_registry as registry_module)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.quantize_wrapper import (  # noqa: E402
    QuantizeWrapper, QuantizeWrapperV2)

log = logging.getLogger(__name__)

_REGISTRY = registry_module.Default8BitQuantizeRegistry()
# Handled by TFMOT's graph transforms (folded into the preceding convolution / dense layer).
_TRANSFORMED = (tf.keras.layers.BatchNormalization,)
_WEIGHTED = (tf.keras.layers.Conv2D, tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Dense)


def quantizable(layer: tf.keras.layers.Layer) -> bool:
    """True when the default 8-bit scheme can annotate ``layer``."""
    if isinstance(layer, tf.keras.layers.InputLayer):
        return False
    return isinstance(layer, _TRANSFORMED) or _REGISTRY.supports(layer)


def float_layers(model: tf.keras.Model) -> List[str]:
    """Names (with types) of the layers a QAT model of ``model`` leaves in float."""
    return [f"{layer.name} ({type(layer).__name__})" for layer in model.layers
            if not isinstance(layer, tf.keras.layers.InputLayer) and not quantizable(layer)]


def quantize_aware(model: tf.keras.Model) -> Tuple[tf.keras.Model, List[str]]:
    """A QAT copy of ``model`` (the original is not modified) and the layers left float.

    The clone starts from ``model``'s weights. Unsupported layers are simply not annotated.
    """
    left_float: List[str] = []

    def annotate(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        clone = layer.__class__.from_config(layer.get_config())
        if quantizable(layer):
            return tfmot.quantization.keras.quantize_annotate_layer(clone)
        if not isinstance(layer, tf.keras.layers.InputLayer):
            left_float.append(f"{layer.name} ({type(layer).__name__})")
        return clone

    annotated = tf.keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    # quantize_apply rebuilds the model from its config; a Lambda layer of the user's own in-memory
    # model is no untrusted input, so Keras' safe mode (which refuses Python lambdas) is lifted.
    with tfmot.quantization.keras.quantize_scope(), _unsafe_deserialization():
        qat_model = tfmot.quantization.keras.quantize_apply(annotated)
    if left_float:
        log.info("QAT leaves %d layers float (TFMOT cannot annotate them): %s", len(left_float),
                 ", ".join(left_float))
    return qat_model, left_float


def _keras_module(name: str):
    """A module of the Keras that ``tf.keras`` is ("keras" or "tf_keras"), e.g. "saving.serialization_lib"."""
    package = tf.keras.layers.Layer.__module__.split(".")[0]
    return importlib.import_module(f"{package}.src.{name}")


def _unsafe_deserialization():
    import contextlib

    try:
        scope = _keras_module("saving.serialization_lib").SafeModeScope
    except (ImportError, AttributeError):  # another Keras 2 layout: keep the default
        return contextlib.nullcontext()
    return scope(False)


# ---------------------------------------------------------------- mixed-precision twins of QAT models
def _float32_variables():
    """A scope in which Keras's auto-cast variables read as what they store (float32), not as the
    layer's compute dtype."""
    return _keras_module("mixed_precision.autocast_variable").enable_auto_cast_variables(None)


class Float32Quantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """``quantizer`` applied in float32 to a tensor of a bfloat16 / float16 layer: the input (a weight
    or an activation) and the quantizer's range variables are read in float32, the fake-quantized
    result is cast to the layer's compute dtype."""

    def __init__(self, quantizer, compute_dtype: str) -> None:
        self.quantizer = quantizer
        self.compute_dtype = compute_dtype

    def build(self, tensor_shape, name, layer):
        return self.quantizer.build(tensor_shape, name, layer)

    def __call__(self, inputs, training, weights, **kwargs):
        with _float32_variables():
            quantized = self.quantizer(tf.cast(inputs, tf.float32), training, weights, **kwargs)
        return tf.cast(quantized, self.compute_dtype)

    def get_config(self):
        return {"quantizer": tf.keras.utils.serialize_keras_object(self.quantizer),
                "compute_dtype": self.compute_dtype}


class Float32QuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """A wrapper's quantize config with every quantizer made a ``Float32Quantizer``."""

    def __init__(self, config, compute_dtype: str) -> None:
        self.config = config
        self.compute_dtype = compute_dtype

    def _float32(self, pairs):
        return [(item, Float32Quantizer(quantizer, self.compute_dtype)) for item, quantizer in pairs]

    def get_weights_and_quantizers(self, layer):
        return self._float32(self.config.get_weights_and_quantizers(layer))

    def get_activations_and_quantizers(self, layer):
        return self._float32(self.config.get_activations_and_quantizers(layer))

    def set_quantize_weights(self, layer, quantize_weights):
        self.config.set_quantize_weights(layer, quantize_weights)

    def set_quantize_activations(self, layer, quantize_activations):
        self.config.set_quantize_activations(layer, quantize_activations)

    def get_output_quantizers(self, layer):
        return [Float32Quantizer(quantizer, self.compute_dtype)
                for quantizer in self.config.get_output_quantizers(layer)]

    def get_config(self):
        return {"config": tf.keras.utils.serialize_keras_object(self.config), "compute_dtype": self.compute_dtype}


def _rebuild_wrapper(wrapper, policy: Optional[tf.keras.mixed_precision.Policy]):
    """A fresh copy of a QuantizeWrapper: with ``policy``, the wrapper and its layer compute in it and
    its quantizers in float32; without, a float32 copy (the layer producing the model's output)."""
    inner_config = wrapper.layer.get_config()
    quantize_config = copy.deepcopy(wrapper.quantize_config)
    if policy is not None:
        inner_config["dtype"] = policy
        quantize_config = Float32QuantizeConfig(quantize_config, policy.compute_dtype)
    with tfmot.quantization.keras.quantize_scope():  # the layer's activation is TFMOT's in its config
        inner = wrapper.layer.__class__.from_config(inner_config)
    return type(wrapper)(inner, quantize_config, name=wrapper.name, **({"dtype": policy} if policy else {}))


def _rebuild_input_quantizer(layer, policy):
    """The input's QuantizeLayer stays float32 (the images are quantized as the int8 file will): the
    first wrapped layer casts its output to bfloat16."""
    return QuantizeLayer(copy.deepcopy(layer.quantizer), name=layer.name)


for _wrapper_type in (QuantizeWrapper, QuantizeWrapperV2):
    register_twin_rebuild(_wrapper_type, _rebuild_wrapper)
register_twin_rebuild(QuantizeLayer, _rebuild_input_quantizer)


def _inner_layers(model: tf.keras.Model) -> Dict[str, tf.keras.layers.Layer]:
    """Layer name -> the layer holding its weights (the wrapped layer inside a QuantizeWrapper)."""
    found: Dict[str, tf.keras.layers.Layer] = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        found[inner.name] = inner
    return found


def copy_back(qat_model: tf.keras.Model, float_model: tf.keras.Model) -> tf.keras.Model:
    """A plain clone of ``float_model`` holding the weights ``qat_model`` learned.

    QuantizeWrapper takes the kernel over from the layer it wraps, so weights are matched by
    variable name ("<layer>/<weight>"), which the wrappers keep.
    """
    plain = tf.keras.models.clone_model(float_model)
    plain.set_weights(float_model.get_weights())
    learned = {_short_name(w.name): w for w in qat_model.weights}
    for layer in plain.layers:
        values = []
        for weight in layer.weights:
            key = f"{layer.name}/{_short_name(weight.name).split('/')[-1]}"
            source = learned.get(key)
            if source is None or tuple(source.shape) != tuple(weight.shape):
                raise RuntimeError(f"the QAT model has no weight '{key}' of shape {tuple(weight.shape)} to "
                                   f"copy back")
            values.append(source.numpy())
        if values:
            layer.set_weights(values)
    return plain


def _short_name(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


_RANGE_SUFFIXES = ("output", "post_activation")


def calibrate(qat_model: tf.keras.Model, float_model: tf.keras.Model, images: np.ndarray) -> int:
    """Set the activation quantizers' ranges from the float model's activations on ``images``.

    TFMOT starts every range at [-6, 6] and moves it by an exponential average (decay 0.999),
    so a short QAT would otherwise train with ranges far from the data. Returns how many
    ranges were set.
    """
    layer_names = {layer.name for layer in float_model.layers}
    targets: Dict[str, List[tf.Variable]] = {}
    for layer in qat_model.layers:
        inner_name = getattr(layer, "layer", layer).name
        for weight in layer.weights:
            short = _short_name(weight.name).split("/")[-1]
            if isinstance(layer, tf.keras.layers.Layer) and type(layer).__name__ == "QuantizeLayer":
                if short.endswith(("_min", "_max")):
                    targets.setdefault("__input__", []).append(weight)
            elif inner_name in layer_names and short in {f"{p}_{e}" for p in _RANGE_SUFFIXES for e in ("min", "max")}:
                targets.setdefault(inner_name, []).append(weight)
    names = [name for name in targets if name != "__input__"]
    probe = tf.keras.Model(float_model.inputs, [float_model.get_layer(name).output for name in names])
    outputs = probe.predict(images, batch_size=128, verbose=0) if names else []
    if len(names) == 1:
        outputs = [outputs]
    observed = {name: value for name, value in zip(names, outputs)}
    observed["__input__"] = images
    for name, variables in targets.items():
        values = np.asarray(observed[name], dtype=np.float32)
        low, high = min(0.0, float(values.min())), max(0.0, float(values.max()))
        for variable in variables:
            variable.assign(low if _short_name(variable.name).endswith("_min") else high)
    return sum(len(v) for v in targets.values())


def tensor_dtypes(path: str | Path) -> Dict[str, Dict[str, int]]:
    """Counts of tensor dtypes in a TFLite file: {"weights": {...}, "activations": {...}}.

    Weights are the tensors with constant data (a buffer); activations the others.
    """
    interpreter, _ = load_interpreter(path)
    counts: Dict[str, Dict[str, int]] = {"weights": {}, "activations": {}}
    constant = _constant_tensors(interpreter)
    for detail in interpreter.get_tensor_details():
        if not detail["name"] or len(detail["shape"]) == 0 and detail["index"] not in constant:
            continue
        kind = "weights" if detail["index"] in constant else "activations"
        dtype = np.dtype(detail["dtype"]).name
        counts[kind][dtype] = counts[kind].get(dtype, 0) + 1
    return counts


def _constant_tensors(interpreter) -> set:
    """Indices of tensors that are parameters: inputs of operators that no operator produces."""
    produced, used = set(), set()
    details = interpreter._get_ops_details()  # noqa: SLF001 - the only public-ish view of the graph
    for op in details:
        produced.update(int(i) for i in op["outputs"])
        used.update(int(i) for i in op["inputs"] if i >= 0)
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    return used - produced - graph_inputs
