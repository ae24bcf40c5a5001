"""Which channels to keep (L1, LASSO, greedy) and least-squares reconstruction of the next layer.

LASSO (He, Zhang and Sun 2017, "Channel Pruning for Accelerating Very Deep Neural
Networks"): for a group, sample the input of each layer that reads it (its *terminators*,
the next Conv2D/Dense) at random positions of a batch of images, write the terminator's
output as a sum of per-channel contributions ``Y = sum_c Z_c``, and solve
``min_beta ||Y - sum_c beta_c Z_c||^2 + alpha |beta|_1`` with alpha raised until at most k
coefficients are non-zero; the survivors are the kept channels. "greedy" instead drops
channels one by one by their exact cost after re-fitting (it also catches channels that
duplicate others, which LASSO on fixed kernels cannot see).

Then each terminator's kernel is re-fitted by least squares on its kept input channels so
that its (pre-activation) output matches the original model's; the mean of what was
removed goes into its bias, or into the moving mean of the BatchNorm that follows a
bias-free conv. By default the re-fit is sequential: layer after layer, on the inputs of
the already pruned and re-fitted model (He et al.'s correction of accumulated error).

Selection works on the second moments ``S = [X, 1]^T [X, 1]`` of each terminator's
sampled input patches X (contributions' Gram ``G_cd = sum_{f in c, g in d} S_fg (W W^T)_fg``),
so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.graph import KIND_BATCHNORM, ChannelAnalysis, _SEPARABLE, _model_nodes, analyze
from learners.channel_pruning.surgery import prune
from pocketflow.metrics import count_params

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "lasso", "greedy")
MAX_FEATURES = 4096  # terminators with more input features (k*k*C) are not re-fitted
TARGET_CACHE_BYTES = 512 * 2 ** 20  # the baseline's re-fit targets kept for the next candidates, at most


# ---------------------------------------------------------------------------- L1
def l1_scores(analysis: ChannelAnalysis, group: str) -> np.ndarray:
    """Per channel of ``group``: L1 norm of its filters, summed over the group's producers."""
    scores = np.zeros(analysis.groups[group].channels, dtype=np.float64)
    for name in analysis.groups[group].producers:
        layer = analysis.layer(name)
        kernel = layer.get_weights()[1 if isinstance(layer, _SEPARABLE) else 0]
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        for positions in analysis.group_positions(name, group, output=True):  # the group's band of outputs
            scores += norms[positions]
    return scores


def l1_keep(analysis: ChannelAnalysis, group: str, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` channels of ``group`` with the largest L1 filter norm."""
    order = np.argsort(-l1_scores(analysis, group), kind="stable")
    return np.sort(order[:count])


def keep_counts(analysis: ChannelAnalysis, keep_ratios: Mapping[str, float]) -> Dict[str, int]:
    """Channels to keep per group: max(1, round(ratio * channels)); unnamed groups keep all."""
    counts = {}
    for group, ratio in keep_ratios.items():
        if group not in analysis.groups:
            raise ValueError(f"unknown channel group '{group}'; prunable groups: {', '.join(analysis.groups)}")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"keep ratio of group '{group}' must be in (0, 1], got {ratio}")
        channels = analysis.groups[group].channels
        counts[group] = int(min(channels, max(1, round(float(ratio) * channels))))
    return counts


# ---------------------------------------------------------------------------- sampling
def _reconstructible(layer: tf.keras.layers.Layer) -> Optional[str]:
    """None when the LASSO/least-squares model applies to ``layer``, else why not."""
    if isinstance(layer, tf.keras.layers.Dense):
        return None
    if type(layer) is tf.keras.layers.Conv2D or (
            isinstance(layer, tf.keras.layers.Conv2D)
            and not isinstance(layer, (tf.keras.layers.Conv2DTranspose, tf.keras.layers.DepthwiseConv2D,
                                       tf.keras.layers.SeparableConv2D))):
        if layer.groups != 1:
            return f"grouped convolution '{layer.name}'"
        return None
    return f"{type(layer).__name__} '{layer.name}' is not re-fitted"


def _flat_kernel(layer: tf.keras.layers.Layer) -> np.ndarray:
    kernel = layer.get_weights()[0]
    return kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)


def _features(layer: tf.keras.layers.Layer, inputs: np.ndarray, positions: int,
              rng: np.random.Generator) -> np.ndarray:
    """Sampled rows of the layer's input as its kernel sees them: (rows, kernel features)."""
    if isinstance(layer, tf.keras.layers.Dense):
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if rows.shape[1] > positions:
            pick = rng.integers(0, rows.shape[1], size=(rows.shape[0], positions))
            rows = np.take_along_axis(rows, pick[:, :, None], axis=1)
        return rows.reshape(-1, inputs.shape[-1])
    kernel_h, kernel_w = layer.kernel_size
    stride_h, stride_w = layer.strides
    dilation_h, dilation_w = layer.dilation_rate
    batch, height, width, channels = inputs.shape
    out_h, out_w = int(layer.output_shape[1]), int(layer.output_shape[2])
    if layer.padding == "same":
        pad_h = max((out_h - 1) * stride_h + (kernel_h - 1) * dilation_h + 1 - height, 0)
        pad_w = max((out_w - 1) * stride_w + (kernel_w - 1) * dilation_w + 1 - width, 0)
        inputs = np.pad(inputs, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                                 (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    count = min(positions, out_h * out_w)
    flat = np.stack([rng.choice(out_h * out_w, size=count, replace=False) for _ in range(batch)])
    image = np.repeat(np.arange(batch), count)
    row, col = (flat // out_w).reshape(-1), (flat % out_w).reshape(-1)
    rows = row[:, None] * stride_h + np.arange(kernel_h)[None, :] * dilation_h       # (R, kh)
    cols = col[:, None] * stride_w + np.arange(kernel_w)[None, :] * dilation_w       # (R, kw)
    patches = inputs[image[:, None, None], rows[:, :, None], cols[:, None, :], :]     # (R, kh, kw, C)
    return patches.reshape(len(image), kernel_h * kernel_w * channels)


def _positions_rng(seed: int, layer_name: str) -> np.random.Generator:
    """The sampled positions of one layer's input: the same for the baseline and every candidate
    (whatever else is sampled or cached), so their rows correspond."""
    return np.random.default_rng([seed, zlib.crc32(layer_name.encode())])


@dataclass
class _Moments:
    """Second moments of a terminator's sampled input, with a constant-1 feature last."""

    moments: np.ndarray
    rows: int = 0


@dataclass
class BaselineCache:
    """What every candidate of one search computes from the baseline alike, computed once.

    ``moments``: each reader's sampled input moments (LASSO's statistics, for every group's
    readers on the first candidate). ``targets``: the baseline's outputs at the sampled positions,
    per reader and chunk of images (the sequential re-fit's right-hand side), kept up to
    TARGET_CACHE_BYTES. Valid for one model, one array of sample images and one seed.
    """

    moments: Dict[str, _Moments] = field(default_factory=dict)
    targets: Dict[str, List[np.ndarray]] = field(default_factory=dict)
    target_bytes: int = 0

    def keep_targets(self, name: str, targets: List[np.ndarray]) -> None:
        size = sum(target.nbytes for target in targets)
        if self.target_bytes + size <= TARGET_CACHE_BYTES:
            self.targets[name] = targets
            self.target_bytes += size


def _sample_moments(model: tf.keras.Model, terminators: List[str], images: np.ndarray,
                    positions: int, batch_size: int, seed: int) -> Dict[str, _Moments]:
    """Accumulate [X, 1]^T [X, 1] for the input of every terminator over ``images``."""
    layers_ = [model.get_layer(name) for name in terminators]
    rngs = {layer.name: _positions_rng(seed, layer.name) for layer in layers_}
    probe = tf.keras.Model(model.inputs, [layer.input for layer in layers_])
    result = {}
    for layer in layers_:
        features = _flat_kernel(layer).shape[0] + 1
        result[layer.name] = _Moments(np.zeros((features, features), dtype=np.float64))
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start:start + batch_size], training=False)
        if len(layers_) == 1:
            outputs = [outputs]
        for layer, output in zip(layers_, outputs):
            rows = _features(layer, np.asarray(output, dtype=np.float32), positions,
                             rngs[layer.name]).astype(np.float64)
            rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
            entry = result[layer.name]
            entry.moments += rows.T @ rows
            entry.rows += rows.shape[0]
    return result


def _feature_channels(layer: tf.keras.layers.Layer, features: int) -> np.ndarray:
    """Input-channel position of every kernel feature (kernel flattened as (..., in, out))."""
    in_channels = int(layer.input_shape[-1])
    return np.arange(features) % in_channels


# ---------------------------------------------------------------------------- LASSO
def _contribution_gram(analysis: ChannelAnalysis, group: str, terminator: str,
                       moments: _Moments, centered: bool) -> np.ndarray:
    """G[c, d] = <Z_c, Z_d> / rows: products of channel c's and d's contributions to the output.

    centered: the re-fit will absorb a constant shift (bias or BatchNorm mean), so only the
    varying part of a contribution counts.
    """
    kernel = _flat_kernel(analysis.layer(terminator))
    channels = analysis.groups[group].channels
    feature_label = _group_labels(analysis, group, terminator, kernel.shape[0])
    chosen = np.flatnonzero(feature_label >= 0)
    rows = max(moments.rows, 1)
    second = moments.moments[np.ix_(chosen, chosen)] / rows
    if centered and _bias_sink(analysis, terminator)[0]:
        mean = moments.moments[chosen, -1] / rows
        second = second - np.outer(mean, mean)
    weighted = second * (kernel[chosen] @ kernel[chosen].T)
    onehot = np.zeros((chosen.size, channels))
    onehot[np.arange(chosen.size), feature_label[chosen]] = 1.0
    return onehot.T @ weighted @ onehot


def lasso_keep(gram: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of ``count`` channels chosen by the LASSO on contributions with Gram ``gram``.

    The penalty is raised along a regularization path until at most ``count`` coefficients
    are non-zero; those (by |beta|) are kept, completed if needed by the channels that
    entered the path earliest, then by contribution energy.
    """
    from sklearn.linear_model import lasso_path

    channels = gram.shape[0]
    if count >= channels:
        return np.arange(channels)
    scale = float(np.trace(gram)) / channels or 1.0
    gram = gram / scale
    target = gram.sum(axis=1)  # <Y, Z_c> with Y = sum_c Z_c
    cholesky = np.linalg.cholesky(gram + 1e-9 * np.eye(channels))
    design = cholesky.T                       # design^T design = gram
    response = np.linalg.solve(cholesky, target)  # design^T response = target
    products = design.T @ response
    alpha_max = float(np.max(np.abs(products))) / channels  # all coefficients zero from here up
    alphas = np.geomspace(alpha_max, alpha_max * 1e-4, 200)
    # check_input=False skips scikit-learn's validation of every array at every alpha, which took
    # longer than the path itself; the arrays are given in the layouts it expects, and the path is the same.
    alphas, coefs, _ = lasso_path(np.asfortranarray(design), response, alphas=alphas, max_iter=5000,
                                  precompute=np.ascontiguousarray(design.T @ design), Xy=products,
                                  check_input=False)
    nonzero = np.abs(coefs) > 1e-12                      # (channels, alphas), alphas decreasing
    counts = nonzero.sum(axis=0)
    within = np.flatnonzero(counts <= count)
    last = within[-1] if within.size else 0
    entry = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), len(alphas))
    beta = np.abs(coefs[:, last])
    energy = np.diag(gram)
    # Lexicographic: non-zero at the chosen alpha, then |beta|, then path entry, then energy.
    order = np.lexsort((-energy, entry, -beta, ~nonzero[:, last]))
    return np.sort(order[:count])


def _group_labels(analysis: ChannelAnalysis, group: str, terminator: str, features: int) -> np.ndarray:
    """For every kernel feature of ``terminator``: the group channel it reads, or -1."""
    layer = analysis.layer(terminator)
    label = np.full(int(layer.input_shape[-1]), -1)
    for occurrence in analysis.group_positions(terminator, group):
        label[occurrence] = np.arange(analysis.groups[group].channels)
    return label[_feature_channels(layer, features)]


def greedy_keep(analysis: ChannelAnalysis, group: str, count: int,
                moments: Mapping[str, "_Moments"]) -> np.ndarray:
    """Sorted indices of ``count`` channels chosen by backward elimination with exact re-fit cost.

    A least-squares-aware refinement of He et al.'s selection: repeatedly drop the channel
    whose removal, *after re-fitting* the terminators' kernels on the remaining inputs,
    increases their output error least (the group form of Optimal Brain Surgeon:
    ``beta_b^T (P_bb)^-1 beta_b`` with P the inverse input second moments). Unlike LASSO on
    fixed kernels, it sees that a channel duplicated by another costs nothing once re-fitted.
    """
    channels = analysis.groups[group].channels
    states = []
    for terminator in analysis.groups[group].terminators:
        kernel = _flat_kernel(analysis.layer(terminator))
        features = kernel.shape[0]
        intercept, _ = _bias_sink(analysis, terminator)
        columns = np.arange(features + int(intercept))
        second = moments[terminator].moments[np.ix_(columns, columns)] / max(moments[terminator].rows, 1)
        ridge = 1e-7 * float(np.mean(np.diag(second))) + 1e-12
        inverse = np.linalg.inv(second + ridge * np.eye(columns.size))
        beta = np.vstack([kernel, np.zeros((1, kernel.shape[1]))]) if intercept else kernel
        labels = _group_labels(analysis, group, terminator, features)
        states.append([inverse, beta, np.append(labels, -1) if intercept else labels])
    alive = list(range(channels))
    while len(alive) > count:
        cost = np.zeros(channels)
        for inverse, beta, labels in states:
            for channel in alive:
                block = np.flatnonzero(labels == channel)
                cost[channel] += np.sum(beta[block] * np.linalg.solve(inverse[np.ix_(block, block)], beta[block]))
        drop = min(alive, key=lambda channel: cost[channel])
        alive.remove(drop)
        for state in states:
            inverse, beta, labels = state
            block, rest = np.flatnonzero(labels == drop), np.flatnonzero(labels != drop)
            coupling = inverse[np.ix_(rest, block)]
            pivot = inverse[np.ix_(block, block)]
            state[0] = inverse[np.ix_(rest, rest)] - coupling @ np.linalg.solve(pivot, coupling.T)
            state[1] = beta[rest] - coupling @ np.linalg.solve(pivot, beta[block])
            state[2] = labels[rest]
    return np.array(alive, dtype=np.int64)


# ---------------------------------------------------------------------------- least squares
def _bias_sink(analysis: ChannelAnalysis, terminator: str) -> Tuple[bool, Optional[str]]:
    """(whether the re-fit may shift the output, BatchNorm that absorbs the shift if no bias)."""
    layer = analysis.layer(terminator)
    if layer.use_bias:
        return True, None
    followers = analysis.successors(terminator)
    if (len(followers) == 1 and getattr(layer.activation, "__name__", "") == "linear"
            and analysis.layer_kind(followers[0]) == KIND_BATCHNORM):
        return True, followers[0]
    return False, None


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    ridge = 1e-7 * float(np.mean(np.diag(system))) + 1e-12
    return np.linalg.solve(system + ridge * np.eye(system.shape[0]), rhs)


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
                        moments: _Moments) -> Tuple[Dict[str, List[np.ndarray]], str]:
    """One-shot re-fit: inputs sampled from the original model, kept channels = a column subset."""
    layer = analysis.layer(terminator)
    kernel = _flat_kernel(layer)
    features = kernel.shape[0]
    kept_inputs = analysis.input_indices(terminator, keep)
    columns = np.flatnonzero(np.isin(_feature_channels(layer, features), kept_inputs))
    intercept, sink = _bias_sink(analysis, terminator)
    if intercept:
        columns = np.append(columns, features)  # the constant-1 feature
    if moments.rows < columns.size:
        return {}, f"{moments.rows} samples for {columns.size} unknowns"
    solution = _solve(moments.moments[np.ix_(columns, columns)], moments.moments[columns, :features] @ kernel)
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
                      seed: int, cache: Optional[BaselineCache] = None) -> Tuple[List[str], Dict[str, str]]:
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
        for layer_name, weights in _refit_weights(analysis, name, keep, _solve(system, rhs),
                                                  intercept, sink).items():
            pruned_layers[layer_name].set_weights(weights)
        done.append(name)
    return done, why_not


@dataclass
class PruneInfo:
    """What ``prune_model`` did, for logs and reports."""

    criterion: str
    keep_counts: Dict[str, int]
    kept: Dict[str, List[int]]
    selection: Dict[str, str] = field(default_factory=dict)       # group -> how it was chosen
    reconstructed: List[str] = field(default_factory=list)        # layers re-fitted by least squares
    not_reconstructed: Dict[str, str] = field(default_factory=dict)  # layer -> why not
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0


def _terminators(analysis: ChannelAnalysis, groups: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """Re-fittable layers reading any of ``groups`` (graph order), and why the others are not."""
    fittable, why_not = [], {}
    for group in groups:
        for name in analysis.groups[group].terminators:
            reason = _reconstructible(analysis.layer(name))
            if reason is None and _flat_kernel(analysis.layer(name)).shape[0] > MAX_FEATURES:
                reason = f"'{name}' has more than {MAX_FEATURES} input features"
            if reason is not None:
                why_not[name] = reason
            elif name not in fittable:
                fittable.append(name)
    return fittable, why_not


def prune_model(model: tf.keras.Model, keep_ratios: Mapping[str, float], criterion: str = "l1",
                sample_images: Optional[np.ndarray] = None, *, reconstruct: Optional[bool] = None,
                sequential: bool = True, analysis: Optional[ChannelAnalysis] = None,
                positions_per_image: int = 16, batch_size: int = 128, seed: int = 0,
                cache: Optional[BaselineCache] = None) -> Tuple[tf.keras.Model, PruneInfo]:
    """Prune each group to max(1, round(ratio * channels)) channels; returns (model, info).

    criterion: "l1" (filter norms, no data); "lasso" (He et al. 2017: LASSO on the channels'
    contributions to the next layer's output); "greedy" (backward elimination with the exact
    least-squares re-fit cost, which also sees redundant channels). The last two need
    ``sample_images`` (one input array, e.g. 500 training images; single-input models).
    reconstruct: re-fit the layers that read pruned channels by least squares (default: on
    for "lasso"/"greedy", off for "l1"). sequential: re-fit layer after layer on the inputs
    of the already re-fitted pruned model (corrects the error that accumulates along the
    net); False re-fits all from the original's inputs. Groups not named in ``keep_ratios``
    keep all their channels. Groups whose readers cannot be re-fitted (SeparableConv2D,
    Conv1D, ...) fall back to L1. cache: an empty BaselineCache to fill, then pass again with the
    same model, images and seed: the original model's sampled moments and re-fit targets are the
    same for every candidate, so a search computes them once instead of per trial.
    """
    started = time.perf_counter()
    if criterion not in CRITERIA:
        raise ValueError(f"unknown channel criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    analysis = analysis or analyze(model)
    reconstruct = (criterion != "l1") if reconstruct is None else reconstruct
    counts = keep_counts(analysis, keep_ratios)
    pruned_groups = [g for g, n in counts.items() if n < analysis.groups[g].channels]
    terminators, why_not = _terminators(analysis, pruned_groups)
    if (criterion != "l1" or reconstruct) and pruned_groups:
        if sample_images is None:
            raise ValueError(f"criterion '{criterion}' with reconstruction needs sample_images "
                             "(a batch of inputs, e.g. 500 training images)")
        if len(model.inputs) != 1:
            raise ValueError(f"model '{model.name}' has {len(model.inputs)} inputs; LASSO selection and "
                             "reconstruction sample a single-input model (use criterion 'l1')")
        sample_images = np.asarray(sample_images, dtype=np.float32)
    one_shot = reconstruct and not sequential
    moments: Dict[str, _Moments] = {}
    if terminators and (criterion != "l1" or one_shot):
        if cache is None:
            moments = _sample_moments(model, terminators, sample_images, positions_per_image, batch_size, seed)
        else:
            if not cache.moments:
                every, _ = _terminators(analysis, list(analysis.groups))
                cache.moments.update(_sample_moments(model, every, sample_images, positions_per_image,
                                                     batch_size, seed))
            moments = cache.moments

    keep: Dict[str, np.ndarray] = {}
    selection: Dict[str, str] = {}
    for group in pruned_groups:
        blocked = [why_not[t] for t in analysis.groups[group].terminators if t in why_not]
        data_driven = criterion != "l1" and not blocked and analysis.groups[group].terminators
        if data_driven and criterion == "lasso":
            gram = sum(_contribution_gram(analysis, group, t, moments[t], centered=reconstruct)
                       for t in analysis.groups[group].terminators)
            keep[group] = lasso_keep(gram, counts[group])
            selection[group] = "lasso"
        elif data_driven:
            keep[group] = greedy_keep(analysis, group, counts[group], moments)
            selection[group] = "greedy"
        else:
            keep[group] = l1_keep(analysis, group, counts[group])
            selection[group] = "l1" if criterion == "l1" else f"l1 (fallback: {'; '.join(blocked)})"

    new_weights: Dict[str, List[np.ndarray]] = {}
    reconstructed: List[str] = []
    if one_shot:
        for name in terminators:
            refit, reason = _refit_from_moments(analysis, name, keep, moments[name])
            if reason:
                why_not[name] = reason
                continue
            new_weights.update(refit)
            reconstructed.append(name)
    pruned = prune(model, keep, new_weights, analysis=analysis)
    if reconstruct and not one_shot and terminators:
        reconstructed, failed = _refit_sequential(analysis, pruned, keep, terminators, sample_images,
                                                  positions_per_image, batch_size, seed, cache)
        why_not.update(failed)
    info = PruneInfo(
        criterion=criterion,
        keep_counts={g: counts.get(g, analysis.groups[g].channels) for g in analysis.groups},
        kept={g: [int(i) for i in idx] for g, idx in keep.items()},
        selection=selection, reconstructed=reconstructed, not_reconstructed=why_not,
        macs_before=analysis.total_macs, macs_after=analysis.macs_for(counts),
        params_before=count_params(model), params_after=count_params(pruned),
        seconds=time.perf_counter() - started)
    logger.debug("channel pruning (%s): %d -> %d MACs (%.2fx) in %.1f s", criterion, info.macs_before,
                info.macs_after, info.macs_before / max(info.macs_after, 1), info.seconds)
    return pruned, info
