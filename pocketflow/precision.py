"""Training precision: float32, or a mixed-precision twin of the model where the hardware has it.

bfloat16 halves the bytes every convolution moves and runs on AVX512-BF16 / AMX units (and on
recent GPUs), so a training step costs less; float16 needs loss scaling and is for GPUs. Only the
training changes: the model a learner hands over stays float32, is trained through a *twin* (the
same layers rebuilt with Keras's ``mixed_bfloat16`` policy: float32 variables, bfloat16 compute,
the output layers in float32), and gets the twin's weights back afterwards. Losses, BatchNorm
statistics, the optimizer state, the shadow weights and every exported file therefore stay what a
float32 run gives.

A training that cannot use a twin runs in float32 and says why: a model that ``clone_model`` cannot
rebuild (subclassed models, nested models, layers without a config), or a training whose per-step
hook edits the model's own weights (sparsity masks). Layers from outside Keras are rebuilt only where
the module that knows them registered how (``register_twin_rebuild``: the int8 learner's QAT wrappers).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

log = logging.getLogger(__name__)

FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"
AUTO = "auto"
_POLICIES = {BFLOAT16: "mixed_bfloat16", FLOAT16: "mixed_float16"}
_KERAS_LAYER_MODULES = ("tf_keras.src.layers.", "tf_keras.src.engine.input_layer")

# CPU flags (Linux /proc/cpuinfo) of units that compute bfloat16 dot products natively.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# GPUs from compute capability 8.0 (Ampere) have bfloat16 tensor cores.
BFLOAT16_GPU_CAPABILITY = (8, 0)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set:
    """The first processor's feature flags, or an empty set where the file does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def hardware_bfloat16() -> Tuple[bool, str]:
    """(whether bfloat16 compute is native here, what says so)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= BFLOAT16_GPU_CAPABILITY:
            return True, f"GPU with compute capability {capability[0]}.{capability[1]}"
    flags = cpu_flags()
    found = [flag for flag in BFLOAT16_CPU_FLAGS if flag in flags]
    if found:
        return True, "CPU with " + " and ".join(found)
    return False, "neither a CPU with AVX512-BF16 / AMX nor a GPU with compute capability >= 8.0"


def resolve_precision(requested: str) -> str:
    """The run's setting: ``auto`` stays ``auto`` where the hardware computes bfloat16 natively (each
    training then decides by its model's widths, ``model_precision``) and becomes float32 elsewhere."""
    if requested != AUTO:
        return requested
    native, _ = hardware_bfloat16()
    return AUTO if native else FLOAT32


# oneDNN's bfloat16 kernels (AMX tiles) are fast only for channel counts that are multiples of 16: a
# training step of a 3-layer CNN at widths 16/32/48/64 took 0.61/0.48/0.42/0.38x float32's time, at
# 8/11/20/24/40 it took 4.67/1.97/2.42/2.10/1.12x (`scripts/time_precision.py --widths`, README's table,
# 2 cores with AMX); a pruned ResNet-20's 5-epoch fine-tuning took 1,105 s in bfloat16 against 485 s.
BFLOAT16_WIDTH_MULTIPLE = 16


# Layer types from outside Keras with a known mixed-precision rebuild: type -> rebuild(layer, policy),
# where policy is None for a layer that must stay float32 (one producing the model's output).
_TWIN_REBUILDS: Dict[type, Callable[[Any, Any], Any]] = {}


def register_twin_rebuild(layer_type: type, rebuild: Callable[[Any, Any], Any]) -> None:
    """Let ``mixed_twin`` rebuild layers of ``layer_type`` (a type from outside Keras) with ``rebuild``:
    it returns a fresh, unbuilt layer of the same name whose weights are created in the same order."""
    _TWIN_REBUILDS[layer_type] = rebuild


def _output_layer_ids(model) -> set:
    """Identities of the layers that produce the model's outputs (they keep float32)."""
    return {id(tensor._keras_history.layer) for tensor in model.outputs}


def model_precision(model, precision: str) -> Tuple[str, Optional[str]]:
    """(precision to train ``model`` in, why float32 where ``auto`` chose it): ``auto`` is bfloat16 when
    every convolution and dense layer but the output's has a multiple of 16 output channels."""
    if precision != AUTO:
        return precision, None
    try:
        output_layers = _output_layer_ids(model)
        odd = [f"{layer.name} ({layer.output.shape[-1]})" for layer in model.layers
               if id(layer) not in output_layers and any("kernel" in weight.name for weight in layer.weights)
               and layer.output.shape[-1] % BFLOAT16_WIDTH_MULTIPLE]
    except (AttributeError, TypeError):  # a subclassed model: no graph to read widths from
        return FLOAT32, "auto keeps float32 for a model without a layer graph (its widths are unknown)"
    if odd:
        shown = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        return FLOAT32, (f"auto keeps float32 where layer widths are not multiples of {BFLOAT16_WIDTH_MULTIPLE} "
                         f"(bfloat16 runs slower there): {shown}")
    return BFLOAT16, None


def mixed_twin(model, precision: str):
    """(twin, None): ``model`` rebuilt with ``precision``'s mixed policy and holding its weights; or
    (None, reason) when it cannot be rebuilt (the caller trains ``model`` itself in float32)."""
    import tensorflow as tf

    policy = tf.keras.mixed_precision.Policy(_POLICIES[precision])
    if not isinstance(model, tf.keras.Sequential) and not getattr(model, "_is_graph_network", False):
        return None, "a subclassed model cannot be rebuilt layer by layer"
    if any(isinstance(layer, tf.keras.Model) for layer in model.layers):
        return None, "a model nested in the model is rebuilt without its layers' policy"
    # A layer from outside Keras (a quantization wrapper, a user's own) may keep state that is not in
    # its config or weights: a rebuilt copy could compute something else, silently.
    foreign = sorted({type(layer).__name__ for layer in model.layers
                      if not type(layer).__module__.startswith(_KERAS_LAYER_MODULES)
                      and type(layer) not in _TWIN_REBUILDS})
    if foreign:
        return None, f"layers from outside Keras ({', '.join(foreign)}) are not rebuilt in {precision}"
    # The layers whose outputs are the model's stay float32: a softmax or logits in bfloat16 lose
    # the small differences the loss is made of (Keras's own advice for mixed precision).
    output_layers = _output_layer_ids(model)

    def rebuild(layer):
        mixed = id(layer) not in output_layers and not isinstance(layer, tf.keras.layers.InputLayer)
        if type(layer) in _TWIN_REBUILDS:
            return _TWIN_REBUILDS[type(layer)](layer, policy if mixed else None)
        config = layer.get_config()
        if mixed:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    try:
        twin = tf.keras.models.clone_model(model, clone_function=rebuild)
        copy_weights(model, twin)
    except Exception as error:  # any layer Keras cannot rebuild from its config
        return None, f"the model could not be rebuilt in {precision} ({type(error).__name__}: {error})"
    return twin, None


def copy_weights(source, destination) -> None:
    """Every layer's weights, matched by layer name (``clone_model`` keeps the names and order)."""
    targets = {layer.name: layer for layer in destination.layers}
    for layer in source.layers:
        if layer.weights:
            targets[layer.name].set_weights(layer.get_weights())
