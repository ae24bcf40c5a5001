"""Channel pruning of a model: keep counts, selection per group, surgery, reconstruction.

``prune_model`` ties the parts together: the keep count of each group, the channels kept
(``criteria``: L1, LASSO as in He et al. 2017, greedy, or a registered criterion) from the
sampled feature maps of the group's readers (``sampling``), the smaller model (``surgery``),
and the least-squares re-fit of the readers (``reconstruction``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.criteria import criterion_named, l1_keep
from learners.channel_pruning.graph import ChannelAnalysis, analyze
from learners.channel_pruning.reconstruction import _refit_from_moments, _refit_sequential
from learners.channel_pruning.sampling import (
    MAX_FEATURES, BaselineCache, _flat_kernel, _Moments, _reconstructible, _sample_moments,
)
from learners.channel_pruning.surgery import prune
from pocketflow.metrics import count_params

logger = logging.getLogger(__name__)


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
                sequential: bool = True, centered: bool = True, analysis: Optional[ChannelAnalysis] = None,
                positions_per_image: int = 16, batch_size: int = 128, seed: int = 0,
                cache: Optional[BaselineCache] = None, shrinkage: float = 0.0) -> Tuple[tf.keras.Model, PruneInfo]:
    """Prune each group to max(1, round(ratio * channels)) channels; returns (model, info).

    criterion: "l1" (filter norms, no data); "lasso" (He et al. 2017: LASSO on the channels'
    contributions to the next layer's output); "greedy" (backward elimination with the exact
    least-squares re-fit cost, which also sees redundant channels). The last two need
    ``sample_images`` (one input array, e.g. 500 training images; single-input models).
    reconstruct: re-fit the layers that read pruned channels by least squares (default: on
    for "lasso"/"greedy", off for "l1"). sequential: re-fit layer after layer on the inputs
    of the already re-fitted pruned model (corrects the error that accumulates along the
    net); False re-fits all from the original's inputs. centered: the criterion counts only the varying
    part of each channel's contribution where the reader has a bias or BatchNorm to take up a constant
    (the re-fit's intercept, BatchNorm re-estimation or fine-tuning does); False where the pruned
    model is used as it is. Groups not named in ``keep_ratios``
    keep all their channels. Groups whose readers cannot be re-fitted (SeparableConv2D,
    Conv1D, ...) fall back to L1. cache: an empty BaselineCache to fill, then pass again with the
    same model, images and seed: the original model's sampled moments and re-fit targets are the
    same for every candidate, so a search computes them once instead of per trial. shrinkage: ridge
    weight pulling the re-fit towards the original kernel (relative to the mean input energy; 0 is
    plain least squares, a large value leaves the kept channels' weights as they were).
    """
    started = time.perf_counter()
    chosen = criterion_named(criterion)
    analysis = analysis or analyze(model)
    reconstruct = chosen.reconstructs if reconstruct is None else reconstruct
    counts = keep_counts(analysis, keep_ratios)
    pruned_groups = [g for g, n in counts.items() if n < analysis.groups[g].channels]
    terminators, why_not = _terminators(analysis, pruned_groups)
    if (chosen.needs_samples or reconstruct) and pruned_groups:
        if sample_images is None:
            raise ValueError(f"criterion '{criterion}' with reconstruction needs sample_images "
                             "(a batch of inputs, e.g. 500 training images)")
        if len(model.inputs) != 1:
            raise ValueError(f"model '{model.name}' has {len(model.inputs)} inputs; LASSO selection and "
                             "reconstruction sample a single-input model (use criterion 'l1')")
        sample_images = np.asarray(sample_images, dtype=np.float32)
    one_shot = reconstruct and not sequential
    moments: Dict[str, _Moments] = {}
    if terminators and (chosen.needs_samples or one_shot):
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
        if chosen.needs_samples and (blocked or not analysis.groups[group].terminators):
            keep[group] = l1_keep(analysis, group, counts[group])
            selection[group] = f"l1 (fallback: {'; '.join(blocked) or 'no reader to sample'})"
        else:
            keep[group] = chosen.keep(analysis, group, counts[group], moments, centered=centered)
            selection[group] = criterion

    new_weights: Dict[str, List[np.ndarray]] = {}
    reconstructed: List[str] = []
    if one_shot:
        for name in terminators:
            refit, reason = _refit_from_moments(analysis, name, keep, moments[name], shrinkage)
            if reason:
                why_not[name] = reason
                continue
            new_weights.update(refit)
            reconstructed.append(name)
    pruned = prune(model, keep, new_weights, analysis=analysis)
    if reconstruct and not one_shot and terminators:
        reconstructed, failed = _refit_sequential(analysis, pruned, keep, terminators, sample_images,
                                                  positions_per_image, batch_size, seed, cache, shrinkage)
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
