"""Which layer gets how many bits: measured sensitivity and a greedy allocation under the budget.

Sensitivity of a kernel = mean KL divergence between the float model's predictions and those
of the model with only that kernel quantized (at ``probe_bits``), on a sample of training
images: one forward pass per kernel, no training. The allocation then minimizes the summed
predicted damage, modelled as ``weight * 4**(probe_bits - bits)`` per kernel (each bit quarters
the quantization noise), subject to the parameter-weighted average bits budget. The optimizer
searches ``power``, which blends the damage weights from "every parameter alike"
(power 0: uniform bits) to "measured sensitivity" (power 1) and beyond, which is a
one-dimensional search TPE handles in a handful of trials.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Sequence

import numpy as np
import tensorflow as tf

from learners.bit_budget import project_bits


def _log_probabilities(outputs: np.ndarray, probabilities: bool) -> np.ndarray:
    outputs = np.asarray(outputs, np.float64)
    if probabilities:
        return np.log(np.clip(outputs, 1e-12, 1.0))
    shifted = outputs - outputs.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def predict(model: tf.keras.Model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(model(images[i:i + batch], training=False))
                           for i in range(0, len(images), batch)])


def kl_divergence(reference: np.ndarray, other: np.ndarray, probabilities: bool) -> float:
    """Mean KL(reference || other) over the rows of two prediction arrays (logits or probabilities)."""
    log_p, log_q = _log_probabilities(reference, probabilities), _log_probabilities(other, probabilities)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def measure_sensitivity(model: tf.keras.Model, variables: Mapping[str, tf.Variable],
                        quantized: Callable[[str], np.ndarray], images: np.ndarray,
                        probabilities: bool) -> Dict[str, float]:
    """KL divergence caused by quantizing each kernel alone (``quantized(key)`` gives its values).

    ``model`` must hold float weights; every kernel is restored after its probe."""
    reference = predict(model, images)
    found = {}
    for key, variable in variables.items():
        original = variable.numpy()
        variable.assign(quantized(key))
        try:
            found[key] = max(kl_divergence(reference, predict(model, images), probabilities), 0.0)
        finally:
            variable.assign(original)
    return found


def greedy_bits(weights: Mapping[str, float], sizes: Mapping[str, int], budget: float, probe_bits: int,
                low: int = 2, high: int = 8) -> Dict[str, int]:
    """Integer bits per kernel minimizing sum(weights[k] * 4**(probe_bits - bits[k])) with the
    parameter-weighted average <= ``budget``: from ``low`` everywhere, one bit at a time to the
    kernel with the largest damage saved per parameter among those that still fit."""
    bits = {key: low for key in sizes}
    allowed = budget * sum(sizes.values()) + 1e-9
    used = sum(low * size for size in sizes.values())
    while True:
        fitting = [key for key in sizes if bits[key] < high and used + sizes[key] <= allowed]
        if not fitting:
            break
        best = max(fitting, key=lambda k: (weights[k] * 0.75 * 4.0 ** (probe_bits - bits[k]) / sizes[k],
                                           -sizes[k], k))
        bits[best] += 1
        used += sizes[best]
    return bits


def sensitivity_bits(sensitivity: Mapping[str, float], sizes: Mapping[str, int], budget: float, power: float,
                     probe_bits: int, low: int = 2, high: int = 8) -> Dict[str, int]:
    """The allocation for one ``power``: damage weight size * (sensitivity per parameter)**power,
    normalized by its geometric mean; power 0 gives uniform bits (every parameter alike)."""
    if power == 0:
        return project_bits({key: budget for key in sizes}, sizes, budget, low, high)
    floor = 1e-12
    density = {key: max(sensitivity[key], floor) / sizes[key] for key in sizes}
    centre = math.exp(float(np.mean([math.log(value) for value in density.values()])))
    weights = {key: sizes[key] * (density[key] / centre) ** power for key in sizes}
    greedy = greedy_bits(weights, sizes, budget, probe_bits, low, high)
    return project_bits(greedy, sizes, budget, low, high)  # spends any slack the greedy left


def free_bits(proposed: Mapping[str, float], sizes: Mapping[str, int], budget: float,
              low: int = 2, high: int = 8) -> Dict[str, int]:
    """The optimizer's per-kernel proposal, projected onto the budget."""
    return project_bits(proposed, sizes, budget, low, high)


def describe_bits(bits: Mapping[str, int], order: Sequence[str]) -> str:
    return " ".join(str(bits[key]) for key in order)
