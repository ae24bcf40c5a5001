"""Codebook quantization: non-uniform (per-layer scalar codebooks, ``--learner non-uniform``) and
product quantization (sub-vector codebooks fitted to output activations, ``--learner
product-quant``). Both ship codebooks + bit-packed indices in the shared packed file; importing
this package registers its decoders (``product``, ``float16``)."""

from learners.nonuniform_quantization.artifact import (QuantizedKernel, artifact_to_tflite, load_artifact,
                                                       write_artifact)
from learners.nonuniform_quantization.codebooks import (INITS, Layout, init_codebook, kmeans_1d, scalar_codebook,
                                                        weighted_kmeans)

__all__ = ["INITS", "Layout", "QuantizedKernel", "artifact_to_tflite", "init_codebook", "kmeans_1d",
           "load_artifact", "scalar_codebook", "weighted_kmeans", "write_artifact"]
