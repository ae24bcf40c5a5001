"""Fade the channels a candidate drops before removing them.

Removing channels at once leaves the rest of the net to make up for them during fine-tuning. Fading
them instead trains the unpruned model while the dropped channels' outputs shrink to zero step by
step (a BatchNorm's scale and shift, or the producer's own kernel and bias where none follows), so
the kept channels take over their work while the net still has it; at the fade's end the dropped
channels output exactly zero and removing them changes nothing.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning.graph import ChannelAnalysis
from learners.channel_pruning.kinds import KIND_BATCHNORM
from learners.channel_pruning.layer_rules import rule_for


def _weight_masks(layer: tf.keras.layers.Layer, in_indices: np.ndarray,
                  out_indices: np.ndarray) -> List[Tuple[tf.Variable, np.ndarray]]:
    """(variable, mask) for every trainable weight entry that the layer's pruning rule would keep when
    keeping ``in_indices`` and ``out_indices``: slicing each weight's flat positions with the rule's
    own slicer finds them, whatever the layout (BatchNorm, depthwise, kernel (..., in, out))."""
    variables = layer.weights
    positions = [np.arange(int(np.prod(v.shape)), dtype=np.int64).reshape(v.shape) for v in variables]
    sliced = rule_for(layer).slice_weights(layer, positions, in_indices, out_indices)
    trainable = {id(v) for v in layer.trainable_weights}
    masks = []
    for variable, chosen in zip(variables, sliced):
        if id(variable) in trainable:
            mask = np.zeros(int(np.prod(variable.shape)), bool)
            mask[np.asarray(chosen).ravel()] = True
            masks.append((variable, mask.reshape(variable.shape)))
    return masks


def _faded_variables(model: tf.keras.Model, analysis: ChannelAnalysis,
                     keep: Mapping[str, np.ndarray]) -> List[Tuple[tf.Variable, np.ndarray]]:
    """(variable, boolean mask of its entries that carry a dropped channel) for everything the fade scales:
    the per-channel layers on the group's path (BatchNorm, depthwise), and a producer's own kernel and
    bias where its output reaches something other than a BatchNorm (which would normalize a scaled
    input back)."""
    masks: Dict[int, Tuple[tf.Variable, np.ndarray]] = {}

    def add(found: List[Tuple[tf.Variable, np.ndarray]]) -> None:
        for variable, mask in found:
            entry = masks.setdefault(id(variable), (variable, np.zeros(variable.shape, bool)))
            entry[1][mask] = True

    for group, kept in keep.items():
        info = analysis.groups[group]
        dropped = np.setdiff1d(np.arange(info.channels), np.asarray(kept))
        if dropped.size == 0:
            continue
        for consumer in info.consumers:
            if consumer in info.terminators:
                continue  # it reads the channel and ends it: its input slice is what removal takes away
            positions = analysis.group_positions(consumer, group)[:, dropped].ravel()
            add(_weight_masks(model.get_layer(consumer), positions, positions))
        for producer in info.producers:
            if all(analysis.layer_kind(name) == KIND_BATCHNORM for name in analysis.successors(producer)):
                continue
            layer = model.get_layer(producer)
            positions = analysis.group_positions(producer, group, output=True)[:, dropped].ravel()
            add(_weight_masks(layer, np.arange(int(layer.input.shape[-1])), positions))
    return list(masks.values())


def fade_hook(model: tf.keras.Model, analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray],
              total_steps: int) -> Callable[[], None]:
    """A per-step hook for ``pocketflow.training.train`` that scales the dropped channels of ``model``
    (an unpruned copy analysed by ``analysis``) so that after step s of ``total_steps`` they carry
    (1 - s / total_steps) of what training gave them: zero after the last step."""
    faded = [(variable, tf.constant(mask)) for variable, mask in _faded_variables(model, analysis, keep)]
    done = [0]

    def after_step() -> None:
        step = done[0]
        factor = 0.0 if step + 1 >= total_steps else (total_steps - step - 1) / (total_steps - step)
        for variable, mask in faded:
            variable.assign(tf.where(mask, variable * factor, variable))
        done[0] = step + 1

    return after_step
