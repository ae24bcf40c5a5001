#!/usr/bin/env bash
# Install PocketFlow-TF2 and everything it needs (Horovod included) into the active Python
# environment. Safe to run twice: pip skips what is installed, Horovod is built only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, this is {sys.version.split()[0]}"'
python -m pip install --upgrade "pip>=23" setuptools wheel
python -m pip install -e ".[test]"
# Optuna's GP sampler (--sampler gp) runs on PyTorch; the CPU build is enough.
python -c "import torch" 2>/dev/null || python -m pip install "torch==2.13.0"

# Horovod 0.28.1 builds from source against the installed TensorFlow, with Gloo (no MPI needed).
# CMake 4 rejects its bundled gloo, hence cmake<4; --no-build-isolation lets it see TensorFlow.
if python -c "import horovod.tensorflow" 2>/dev/null; then
    echo "horovod already installed"
else
    python -m pip install "cmake<4"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        python -m pip install --no-build-isolation --no-cache-dir horovod==0.28.1
fi
python -c "import horovod.tensorflow as hvd, tensorflow as tf; print('installed: tensorflow', tf.__version__, '+ horovod', hvd.__version__ if hasattr(hvd, '__version__') else '0.28.1')"
