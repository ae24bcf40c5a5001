"""PocketFlow-TF2 package. Horovod is installed by scripts/install.sh (it must build against TF)."""

from setuptools import find_packages, setup

setup(
    name="pocketflow-tf2",
    version="0.1.0",
    description="Automated model compression for TensorFlow 2 / Keras: search, compress, export to TFLite",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["pocketflow", "pocketflow.*", "learners", "learners.*", "hpo", "hpo.*",
                                    "nets", "nets.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "tf-keras==2.21.0",  # Keras 2: TFMOT and Horovod 0.28 need it (pocketflow/keras_setup.py)
        "tensorflow-model-optimization==0.8.1",
        "ai-edge-litert>=2.3,<3",  # LiteRT: the runtime every shipped .tflite file is measured in
        "optuna>=5,<6",
        "cmaes>=0.10",  # --sampler cmaes
        "psycopg[binary]>=3",  # PostgreSQL study storage (postgresql:// URLs) for searchers on many machines
        "numpy>=2",
        "pyyaml>=6",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    # pytest-xdist: the suite runs on every core (pytest.ini), one test file per worker.
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3"]},
    entry_points={"console_scripts": ["pocketflow=pocketflow.cli:main"]},
)
