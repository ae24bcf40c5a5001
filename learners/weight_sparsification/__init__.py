"""Weight sparsification: per-layer magnitude masks under a global sparsity or file-size
target, gradual pruning (Zhu & Gupta), and a shipped file that is really smaller (sparse
TFLite or our own sparse container)."""

from learners.weight_sparsification.artifact import (
    container_to_tflite, load_container, read_container, sparse_tflite, write_container,
)
from learners.weight_sparsification.masks import (
    PrunableWeight, allocate, apply_masks, load_masks, magnitude_mask, prunable_weights, save_masks,
)
from learners.weight_sparsification.schedule import GradualPruning, polynomial_sparsity

__all__ = ["GradualPruning", "PrunableWeight", "allocate", "apply_masks", "container_to_tflite", "load_container",
           "load_masks", "magnitude_mask", "polynomial_sparsity", "prunable_weights", "read_container",
           "save_masks", "sparse_tflite", "write_container"]
