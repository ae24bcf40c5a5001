"""What TensorFlow functions called on Keras tensors do to the channel axis.

A functional model written with ``x + shortcut``, ``tf.nn.relu(x)``, ``x[:, ::2, ::2, :]``,
``tf.pad(x, ...)`` or ``tf.concat([...], -1)`` holds ``TFOpLambda`` / ``SlicingOpLambda``
layers, one per call, with the call's arguments in its node. Each rule below reads those
arguments and says what the call does to the channels (a ``graph.KIND_*``), so such models are
pruned like the same model written with Keras layers. A function without a rule is a barrier:
its input channels are kept, which is safe.

A ``tf.pad`` that pads the channel axis with zeros is a *channel pad* (the option-A shortcut of
the CIFAR ResNets, written with TF ops); its widths are returned so that the analysis can place
the zero bands, and :func:`set_channel_padding` rewrites them in a model config.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.kinds import KIND_BARRIER, KIND_CHANNEL_PAD, KIND_CONCAT, KIND_MERGE, KIND_TRANSPARENT


@dataclass(frozen=True)
class OpCall:
    """One call of a TF function in a model: its symbol (``nn.relu``) and its bound arguments."""

    symbol: str
    arguments: Dict[str, object]
    in_shapes: List[tuple]
    out_shapes: List[tuple]


@dataclass(frozen=True)
class OpKind:
    kind: str
    reason: str = ""
    padding: Tuple[int, int] = (0, 0)  # zeros before and after the channel axis (channel pads)


def _is_tensor(value) -> bool:
    """A Keras tensor: a value flowing through the model (constants are not)."""
    return hasattr(value, "_keras_history")


def _is_scalar(value) -> bool:
    if isinstance(value, numbers.Number):
        return True
    shape = getattr(value, "shape", None)
    return shape is not None and not _is_tensor(value) and int(np.prod(tuple(shape), dtype=np.int64)) == 1


def _tensor_count(call: OpCall) -> int:
    return sum(1 for value in tf.nest.flatten(list(call.arguments.values())) if _is_tensor(value))


def _unary(call: OpCall) -> OpKind:
    """An element-wise function of one tensor (any other argument a scalar or a name)."""
    others = [value for name, value in call.arguments.items() if name != "name" and not _is_tensor(value)]
    if _tensor_count(call) != 1 or call.in_shapes[0] != call.out_shapes[0]:
        return OpKind(KIND_BARRIER, f"tf.{call.symbol} of more than one tensor or changing the shape")
    if not all(value is None or _is_scalar(value) or isinstance(value, (str, tf.DType)) for value in others):
        return OpKind(KIND_BARRIER, f"tf.{call.symbol} with a non-scalar argument")
    return OpKind(KIND_TRANSPARENT)


def _binary(call: OpCall) -> OpKind:
    """``x op y``: two tensors of one shape meet channel by channel; a scalar leaves channels alone."""
    if _tensor_count(call) >= 2:
        if len(call.in_shapes) != _tensor_count(call) or len(set(call.in_shapes)) != 1:
            return OpKind(KIND_BARRIER, f"tf.{call.symbol} broadcasts inputs of shapes {call.in_shapes}")
        return OpKind(KIND_MERGE)
    return _unary(call)


def _pad(call: OpCall) -> OpKind:
    paddings = call.arguments.get("paddings")
    if paddings is None or _is_tensor(paddings):
        return OpKind(KIND_BARRIER, "tf.pad with paddings computed in the graph")
    rows = np.asarray(paddings)
    if rows.ndim != 2 or rows.shape[0] != len(call.in_shapes[0]):
        return OpKind(KIND_BARRIER, f"tf.pad with paddings of shape {rows.shape}")
    before, after = int(rows[-1][0]), int(rows[-1][1])
    if before == after == 0:
        return OpKind(KIND_TRANSPARENT)  # spatial padding, any mode: channel by channel
    mode = str(call.arguments.get("mode", "CONSTANT")).upper()
    value = call.arguments.get("constant_values", 0)
    if mode != "CONSTANT" or not _is_scalar(value) or float(np.asarray(value)) != 0.0:
        return OpKind(KIND_BARRIER, f"tf.pad of the channel axis with mode {mode} / value {value}")
    return OpKind(KIND_CHANNEL_PAD, padding=(before, after))


def _concat(call: OpCall) -> OpKind:
    rank = len(call.in_shapes[0])
    axis = call.arguments.get("axis")
    if not isinstance(axis, numbers.Integral) or any(len(shape) != rank for shape in call.in_shapes):
        return OpKind(KIND_BARRIER, "tf.concat along an unknown axis or of inputs with different ranks")
    return OpKind(KIND_CONCAT if int(axis) % rank == rank - 1 else KIND_MERGE)


def _full_slice(item) -> bool:
    if isinstance(item, slice):
        item = {"start": item.start, "stop": item.stop, "step": item.step}
    return isinstance(item, dict) and all(item.get(key) is None for key in ("start", "stop", "step"))


def _getitem(call: OpCall) -> OpKind:
    """``x[...]``: channel-transparent when it keeps the rank and takes the whole channel axis."""
    spec = call.arguments.get("slice_spec")
    spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
    rank = len(call.in_shapes[0])
    reason = "slicing that changes the rank or cuts the channel axis"
    if len(call.out_shapes[0]) != rank or call.in_shapes[0][-1] != call.out_shapes[0][-1]:
        return OpKind(KIND_BARRIER, reason)
    if any(item is None or isinstance(item, numbers.Integral) or _is_tensor(item) for item in spec):
        return OpKind(KIND_BARRIER, reason)
    if Ellipsis in spec:
        trailing = spec[spec.index(Ellipsis) + 1:]
        last = trailing[-1] if trailing else slice(None)
    else:
        last = spec[-1] if len(spec) == rank else slice(None)
    return OpKind(KIND_TRANSPARENT if _full_slice(last) else KIND_BARRIER, "" if _full_slice(last) else reason)


def _same(call: OpCall) -> OpKind:
    """Same channels out as in (``zeros_like``, ``identity``): the layout passes through, so
    ``tf.concat([x, tf.zeros_like(x)], -1)`` keeps the zeros aligned with what is kept of x."""
    if _tensor_count(call) != 1 or call.in_shapes[0][-1] != call.out_shapes[0][-1]:
        return OpKind(KIND_BARRIER, f"tf.{call.symbol} changes the channel axis")
    return OpKind(KIND_TRANSPARENT)


_UNARY = (
    "nn.relu", "nn.relu6", "nn.elu", "nn.selu", "nn.silu", "nn.swish", "nn.gelu", "nn.leaky_relu",
    "nn.sigmoid", "math.sigmoid", "nn.tanh", "math.tanh", "math.softplus", "nn.softplus", "math.softsign",
    "nn.softsign", "math.abs", "math.negative", "__operators__.neg", "math.square", "math.sqrt", "math.exp",
    "clip_by_value", "cast", "dtypes.cast",
)
_BINARY = (
    "__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv", "math.divide",
    "math.maximum", "math.minimum", "math.add_n",
)
RULES: Dict[str, Callable[[OpCall], OpKind]] = {
    **{symbol: _unary for symbol in _UNARY},
    **{symbol: _binary for symbol in _BINARY},
    "pad": _pad, "compat.v1.pad": _pad,
    "concat": _concat,
    "__operators__.getitem": _getitem,
    "zeros_like": _same, "ones_like": _same, "identity": _same, "stop_gradient": _same,
}


def is_tf_op(layer: tf.keras.layers.Layer) -> bool:
    return hasattr(layer, "symbol") and hasattr(layer, "function") and type(layer).__name__ in (
        "TFOpLambda", "SlicingOpLambda")


def classify(layer: tf.keras.layers.Layer, node, in_shapes: List[tuple], out_shapes: List[tuple]) -> OpKind:
    """What the TF-op layer ``layer``, called at ``node``, does to the channel axis."""
    symbol = str(layer.symbol)
    rule = RULES.get(symbol)
    if rule is None:
        return OpKind(KIND_BARRIER, f"tf.{symbol} is not known to be channel-transparent")
    if len(out_shapes) != 1:
        return OpKind(KIND_BARRIER, f"tf.{symbol} has {len(out_shapes)} outputs")
    try:
        bound = inspect.signature(layer.function).bind(*node.call_args, **(node.call_kwargs or {}))
    except (TypeError, ValueError) as error:
        return OpKind(KIND_BARRIER, f"tf.{symbol}: its arguments are not readable ({error})")
    return rule(OpCall(symbol, dict(bound.arguments), list(in_shapes), list(out_shapes)))


def set_channel_padding(layer_entry: dict, before: int, after: int) -> None:
    """Rewrite the channel row of a ``tf.pad`` call in a functional model's layer entry."""
    found: List[dict] = []

    def visit(value) -> None:
        if isinstance(value, dict):
            if "paddings" in value:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(layer_entry.get("inbound_nodes", []))
    if len(found) != 1:
        raise ValueError(f"layer '{layer_entry.get('name')}': cannot find the paddings of its tf.pad call in "
                         "the model config")
    rows = [list(map(int, row)) for row in np.asarray(found[0]["paddings"]).tolist()]
    rows[-1] = [int(before), int(after)]
    found[0]["paddings"] = rows
