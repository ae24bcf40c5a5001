#!/usr/bin/env bash
# Install PocketFlow-TF2 and everything it needs (Horovod included) into the active Python
# environment. Safe to run twice: pip skips what is installed, Horovod is built only when missing.
# Tested on Python 3.11 and 3.12 (TensorFlow 2.21, tf-keras 2.21, TFMOT 0.8.1, numpy 2, LiteRT).
set -euo pipefail
cd "$(dirname "$0")/.."

python -c 'import sys; v = sys.version_info[:2]; assert (3, 11) <= v <= (3, 12), f"Python 3.11 or 3.12 is required, this is {sys.version.split()[0]}"'
python -m pip install --upgrade "pip>=23" setuptools wheel
python -m pip install -e ".[test]"
# Optuna's GP sampler (--sampler gp) and the Torch-Pruning peer run on PyTorch; the CPU build is enough.
python -c "import torch" 2>/dev/null || python -m pip install "torch==2.13.0" || python -m pip install torch
# The benchmark peer (pocketflow/benchmarks/torch_pruning_peer.py); pure Python, so no second torch.
python -m pip install --no-deps "torch-pruning==1.6.1"

# Horovod 0.28.1 builds from source against the installed TensorFlow, with Gloo (no MPI needed).
# CMake 4 rejects its bundled gloo, hence cmake<4; --no-build-isolation lets it see TensorFlow.
# Against TF >= 2.16 its xla_mpi_ops.cc includes headers that moved: highwayhash and farmhash ship
# inside TensorFlow's include directory under external/, and xla_builder.h moved from
# tensorflow/compiler/xla/client/ to xla/hlo/builder/. In a CPU (Gloo) build the file's body is
# inside `#if HAVE_GPU`, so only its includes must resolve: the two directories go on the include
# path and a one-line forwarding header stands in for the moved one. A GPU (NCCL) build compiles
# that XLA code and is not tested here.
if python -c "import horovod.tensorflow" 2>/dev/null; then
    echo "horovod already installed"
else
    python -m pip install "cmake<4"
    tf_include=$(python -c "import tensorflow as tf; print(tf.sysconfig.get_include())" 2>/dev/null)
    shim=$(mktemp -d)
    trap 'rm -rf "$shim"' EXIT
    mkdir -p "$shim/tensorflow/compiler/xla/client"
    echo '#include "xla/hlo/builder/xla_builder.h"' > "$shim/tensorflow/compiler/xla/client/xla_builder.h"
    CPLUS_INCLUDE_PATH="$shim:$tf_include/external/highwayhash:$tf_include/external/farmhash_archive/src${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}" \
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        python -m pip install --no-build-isolation --no-cache-dir horovod==0.28.1
fi
python -c "import pocketflow, horovod.tensorflow, tensorflow as tf; from pocketflow.export import runtime_name; print('installed: tensorflow', tf.__version__, '+ horovod 0.28.1,', 'measured with', runtime_name())"
