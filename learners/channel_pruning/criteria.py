"""Channel selection criteria: which channels of a group to keep, as registered classes.

- ``l1``: the largest filter norms (no data; Li et al. 2017).
- ``lasso`` (He, Zhang and Sun 2017, "Channel Pruning for Accelerating Very Deep Neural
  Networks"): write each reader's output as a sum of per-channel contributions
  ``Y = sum_c Z_c`` and solve ``min_beta ||Y - sum_c beta_c Z_c||^2 + alpha |beta|_1`` with alpha
  raised until at most k coefficients are non-zero; the survivors are kept.
- ``greedy``: drop channels one by one by their exact cost *after* re-fitting (it also catches
  channels that duplicate others, which LASSO on fixed kernels cannot see).
- ``energy``: the largest contributions to the readers' outputs (sampled feature maps, so the
  BatchNorm scale and the readers' weights count), kept with their own weights: no re-fit.

Whether the readers of pruned channels are then re-fitted by least squares is each criterion's
``reconstructs`` (LASSO and greedy yes, L1 and energy no), which ``channel.refit`` overrides.

A new criterion is a ``Criterion`` subclass with a ``name`` and ``keep``, decorated with
``@register_criterion``; ``channel.criterion`` then accepts its name.
"""

from __future__ import annotations

from typing import Dict, Mapping, Type

import numpy as np

from learners.channel_pruning.graph import ChannelAnalysis
from learners.channel_pruning.layer_rules import rule_for
from learners.channel_pruning.reconstruction import _bias_sink
from learners.channel_pruning.sampling import _feature_channels, _flat_kernel, _Moments


class Criterion:
    """How the kept channels of one group are chosen.

    ``needs_samples``: ``keep`` reads the sampled input moments of the group's readers (a group
    whose readers cannot be sampled falls back to L1). ``reconstructs``: whether pruning with it
    re-fits the readers by default.
    """

    name = ""
    needs_samples = True
    reconstructs = True

    def keep(self, analysis: ChannelAnalysis, group: str, count: int, moments: Mapping[str, _Moments],
             centered: bool) -> np.ndarray:
        """Sorted indices of the ``count`` channels of ``group`` to keep. ``centered``: a constant shift
        of a contribution costs nothing, since something after the pruning takes it up (the re-fit's
        intercept, BatchNorm re-estimation, fine-tuning)."""
        raise NotImplementedError


CRITERIA: Dict[str, Criterion] = {}


def register_criterion(cls: Type[Criterion]) -> Type[Criterion]:
    """Class decorator: make ``cls`` available as ``channel.criterion = cls.name``."""
    if not cls.name or cls.name == "search":
        raise ValueError(f"a channel criterion needs a name other than 'search', not {cls.name!r}")
    CRITERIA[cls.name] = cls()
    return cls


def criterion_named(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown channel criterion '{name}'; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


# ---------------------------------------------------------------------------- L1
def l1_scores(analysis: ChannelAnalysis, group: str) -> np.ndarray:
    """Per channel of ``group``: L1 norm of its filters, summed over the group's producers."""
    scores = np.zeros(analysis.groups[group].channels, dtype=np.float64)
    for name in analysis.groups[group].producers:
        layer = analysis.layer(name)
        kernel = layer.get_weights()[rule_for(layer).filter_weight]
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        for positions in analysis.group_positions(name, group, output=True):  # the group's band of outputs
            scores += norms[positions]
    return scores


def l1_keep(analysis: ChannelAnalysis, group: str, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` channels of ``group`` with the largest L1 filter norm."""
    order = np.argsort(-l1_scores(analysis, group), kind="stable")
    return np.sort(order[:count])



@register_criterion
class L1Criterion(Criterion):
    name = "l1"
    needs_samples = False
    reconstructs = False

    def keep(self, analysis, group, count, moments, centered):
        return l1_keep(analysis, group, count)


# ---------------------------------------------------------------------------- LASSO
def _contribution_gram(analysis: ChannelAnalysis, group: str, terminator: str,
                       moments: _Moments, centered: bool) -> np.ndarray:
    """G[c, d] = <Z_c, Z_d> / rows: products of channel c's and d's contributions to the output.

    centered: a constant shift is absorbed after pruning (by the reader's bias or BatchNorm mean, re-fitted,
    re-estimated or trained), so only the varying part of a contribution counts.
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


@register_criterion
class LassoCriterion(Criterion):
    name = "lasso"

    def keep(self, analysis, group, count, moments, centered):
        gram = sum(_contribution_gram(analysis, group, reader, moments[reader], centered=centered)
                   for reader in analysis.groups[group].terminators)
        return lasso_keep(gram, count)


# ---------------------------------------------------------------------------- greedy
def greedy_keep(analysis: ChannelAnalysis, group: str, count: int,
                moments: Mapping[str, _Moments]) -> np.ndarray:
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




@register_criterion
class GreedyCriterion(Criterion):
    name = "greedy"

    def keep(self, analysis, group, count, moments, centered):
        return greedy_keep(analysis, group, count, moments)


# ---------------------------------------------------------------------------- energy
@register_criterion
class EnergyCriterion(Criterion):
    """The channels whose contributions to their readers' outputs carry the most energy, kept with
    their own weights (no re-fit). Unlike the filter's L1 norm it sees the BatchNorm scale between
    a filter and its output, the activation, and how strongly the readers weigh the channel. Only the
    varying part of a contribution counts where the reader has a bias or BatchNorm to take up a
    constant: a constant is what fine-tuning learns back first, and counting it picks channels for
    their mean rather than for what they tell apart (ResNet-20 at 3x, the uniform reference: 33.7%
    validation accuracy before fine-tuning, 27.1% when the classifier's constants counted)."""

    name = "energy"
    reconstructs = False

    def keep(self, analysis, group, count, moments, centered):
        energy = sum(np.diag(_contribution_gram(analysis, group, reader, moments[reader], centered=centered))
                     for reader in analysis.groups[group].terminators)
        order = np.argsort(-energy, kind="stable")
        return np.sort(order[:count])
