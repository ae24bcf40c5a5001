"""Least-squares reconstruction: re-fit the layers that read pruned channels.

Each terminator's kernel is re-fitted on its kept input channels so that its (pre-activation)
output matches the original model's; the mean of what was removed goes into its bias, or into
the moving mean of the BatchNorm that follows a bias-free conv. Sequential (the default): layer
after layer, on the inputs of the already pruned and re-fitted model (He et al.'s correction of
accumulated error); one-shot: every layer from the original model's sampled moments.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.graph import KIND_BATCHNORM, ChannelAnalysis, _model_nodes
from learners.channel_pruning.sampling import (
    BaselineCache, _feature_channels, _features, _flat_kernel, _Moments, _positions_rng,
)


def _bias_sink(analysis: ChannelAnalysis, terminator: str) -> Tuple[bool, Optional[str]]:
    """(whether the re-fit may shift the output, BatchNorm that absorbs the shift if no bias)."""
    layer = analysis.layer(terminator)
    if layer.use_bias:
        return True, None
    followers = analysis.successors(terminator)
    if (len(followers) == 1 and getattr(layer.activation, "__name__", "") == "linear"
            and analysis.layer_kind(followers[0]) == KIND_BATCHNORM
            and isinstance(analysis.layer(followers[0]), tf.keras.layers.BatchNormalization)):
        return True, followers[0]
    return False, None


def _solve(system: np.ndarray, rhs: np.ndarray, prior: Optional[np.ndarray] = None,
           shrinkage: float = 0.0) -> np.ndarray:
    """Least squares from the normal equations; with ``shrinkage`` > 0, ridge towards ``prior``
    (the original kernel's rows for the kept features, one row per penalised unknown; an
    intercept row after them is not penalised). ``shrinkage`` is relative to the mean input
    energy, so 1 weighs the pull towards the original like one average feature's data."""
    scale = float(np.mean(np.diag(system)))
    ridge = np.full(system.shape[0], 1e-7 * scale + 1e-12)
    target = rhs
    if shrinkage > 0 and prior is not None:
        penalised = prior.shape[0]
        ridge[:penalised] += shrinkage * scale
        target = rhs.copy()
        target[:penalised] += shrinkage * scale * prior
    return np.linalg.solve(system + np.diag(ridge), target)


def _original_rows(layer: tf.keras.layers.Layer, kept_inputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of the kernel features that read kept input channels, the original kernel's rows there)."""
    kernel = _flat_kernel(layer)
    columns = np.flatnonzero(np.isin(_feature_channels(layer, kernel.shape[0]), kept_inputs))
    return columns, kernel[columns]


def _refit_weights(analysis: ChannelAnalysis, terminator: str, keep: Mapping[str, np.ndarray],
                   solution: np.ndarray, intercept: bool, sink: Optional[str]) -> Dict[str, List[np.ndarray]]:
    """Pruned-shape weights of ``terminator`` (and of its BatchNorm) from a least-squares solution.

    ``solution``: rows = kept kernel features (then the intercept), columns = all outputs.
    """
    layer = analysis.layer(terminator)
    out_indices = analysis.output_indices(terminator, keep)
    kept_inputs = analysis.input_indices(terminator, keep)
    weights = layer.get_weights()
    out_channels = weights[0].shape[-1]
    kernel_rows = solution[:-1] if intercept else solution
    shift = solution[-1] if intercept else np.zeros(out_channels)
    shape = tuple(weights[0].shape[:-2]) + (len(kept_inputs), out_channels)
    kernel = kernel_rows.reshape(shape)[..., out_indices].astype(np.float32)
    if layer.use_bias:
        return {terminator: [kernel, (weights[1] + shift)[out_indices].astype(np.float32)]}
    result = {terminator: [kernel]}
    if sink is not None:
        batchnorm = analysis.layer(sink)
        bn_weights = batchnorm.get_weights()
        mean_index = next(i for i, w in enumerate(batchnorm.weights) if "moving_mean" in w.name)
        bn_weights[mean_index] = bn_weights[mean_index] - shift.astype(np.float32)
        result[sink] = [w[out_indices] for w in bn_weights]
    return result


def _refit_from_moments(analysis: ChannelAnalysis, terminator: str, keep: Mapping[str, np.ndarray],
                        moments: _Moments, shrinkage: float = 0.0) -> Tuple[Dict[str, List[np.ndarray]], str]:
    """One-shot re-fit: inputs sampled from the original model, kept channels = a column subset."""
    layer = analysis.layer(terminator)
    kernel = _flat_kernel(layer)
    features = kernel.shape[0]
    columns, prior = _original_rows(layer, analysis.input_indices(terminator, keep))
    intercept, sink = _bias_sink(analysis, terminator)
    if intercept:
        columns = np.append(columns, features)  # the constant-1 feature
    if moments.rows < columns.size:
        return {}, f"{moments.rows} samples for {columns.size} unknowns"
    solution = _solve(moments.moments[np.ix_(columns, columns)], moments.moments[columns, :features] @ kernel,
                      prior, shrinkage)
    return _refit_weights(analysis, terminator, keep, solution, intercept, sink), ""


def _node_keys(model: tf.keras.Model) -> List[Tuple[str, int]]:
    """(layer name, n-th call of that layer in this model) for each node, in graph order."""
    keys, seen = [], {}
    for node in _model_nodes(model):
        seen[node.layer.name] = seen.get(node.layer.name, -1) + 1
        keys.append((node.layer.name, seen[node.layer.name]))
    return keys


class _GraphRunner:
    """Runs a model layer by layer on fixed inputs, pausing before a named layer.

    Lets the re-fit of a layer see its input in the pruned model *after* the layers before
    it were re-fitted (He et al.'s correction of accumulated error).
    """

    def __init__(self, model: tf.keras.Model, keys: List[Tuple[str, int]], chunks: List[np.ndarray]) -> None:
        by_key = dict(zip(_node_keys(model), _model_nodes(model)))
        self.nodes = [by_key[key] for key in keys if not by_key[key].is_input]
        self.uses: Dict[str, int] = {}
        for node in self.nodes:
            for tensor_id in node.flat_input_ids:
                self.uses[tensor_id] = self.uses.get(tensor_id, 0) + 1
        self.values = {str(id(model.inputs[0])): [tf.constant(chunk) for chunk in chunks]}
        self.position = 0

    def input_of(self, layer_name: str) -> List[np.ndarray]:
        """Run up to (not including) ``layer_name``; its input, one array per chunk."""
        while self.nodes[self.position].layer.name != layer_name:
            node = self.nodes[self.position]
            results = []
            for chunk in range(len(next(iter(self.values.values())))):
                # Each Keras tensor in the call's arguments (positional or keyword: a TF op's
                # second operand is a keyword after loading) is replaced by its value.
                def value(item, chunk=chunk):
                    return self.values[str(id(item))][chunk] if hasattr(item, "_keras_history") else item

                args, kwargs = tf.nest.map_structure(value, (node.call_args, node.call_kwargs))
                results.append(tf.nest.flatten(node.layer(*args, **kwargs)))
            for tensor_id in node.flat_input_ids:
                self.uses[tensor_id] -= 1
                if self.uses[tensor_id] == 0:
                    del self.values[tensor_id]
            for index, tensor_id in enumerate(node.flat_output_ids):
                self.values[tensor_id] = [outputs[index] for outputs in results]
            self.position += 1
        node = self.nodes[self.position]
        return [np.asarray(value) for value in self.values[node.flat_input_ids[0]]]


def _baseline_targets(layer: tf.keras.layers.Layer, inputs: List[np.ndarray], positions: int,
                      seed: int) -> List[np.ndarray]:
    """The baseline layer's outputs (before bias) at the sampled positions, one array per chunk."""
    kernel, rng = _flat_kernel(layer), _positions_rng(seed, layer.name)
    return [_features(layer, chunk, positions, rng).astype(np.float64) @ kernel for chunk in inputs]


def _refit_sequential(analysis: ChannelAnalysis, pruned: tf.keras.Model, keep: Mapping[str, np.ndarray],
                      terminators: List[str], images: np.ndarray, positions: int, batch_size: int,
                      seed: int, cache: Optional[BaselineCache] = None,
                      shrinkage: float = 0.0) -> Tuple[List[str], Dict[str, str]]:
    """Re-fit ``terminators`` of ``pruned`` in place, in graph order, against the original outputs
    (taken from ``cache`` when an earlier candidate computed them: the baseline is only run for
    the layers whose targets are not there)."""
    model = analysis.model
    keys = _node_keys(model)
    chunks = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
    original, current = _GraphRunner(model, keys, chunks), _GraphRunner(pruned, keys, chunks)
    pruned_layers = {layer.name: layer for layer in pruned.layers}
    done, why_not = [], {}
    for name in sorted(terminators, key=lambda t: [k[0] for k in keys].index(t)):
        layer, new_layer = analysis.layer(name), pruned_layers[name]
        intercept, sink = _bias_sink(analysis, name)
        system, rhs, rows = 0.0, 0.0, 0
        targets = cache.targets.get(name) if cache is not None else None
        if targets is None:
            targets = _baseline_targets(layer, original.input_of(name), positions, seed)
            if cache is not None:
                cache.keep_targets(name, targets)
        rng_current = _positions_rng(seed, name)
        for target, x_current in zip(targets, current.input_of(name)):
            inputs = _features(new_layer, x_current, positions, rng_current).astype(np.float64)
            if intercept:
                inputs = np.concatenate([inputs, np.ones((inputs.shape[0], 1))], axis=1)
            system = system + inputs.T @ inputs
            rhs = rhs + inputs.T @ target
            rows += inputs.shape[0]
        if rows < system.shape[0]:
            why_not[name] = f"{rows} samples for {system.shape[0]} unknowns"
            continue
        prior = _original_rows(layer, analysis.input_indices(name, keep))[1] if shrinkage > 0 else None
        for layer_name, weights in _refit_weights(analysis, name, keep, _solve(system, rhs, prior, shrinkage),
                                                  intercept, sink).items():
            pruned_layers[layer_name].set_weights(weights)
        done.append(name)
    return done, why_not
