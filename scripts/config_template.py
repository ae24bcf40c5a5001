"""Rewrite configs/template.yaml from the config classes: ``python scripts/config_template.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr

from pocketflow.config_template import learner_configs, render  # noqa: E402
from pocketflow.export import write_atomic  # noqa: E402

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "configs" / "template.yaml"
    write_atomic(target, render(learner_configs()).encode())
    print(f"wrote {target}")
