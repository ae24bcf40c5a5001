"""Time a model's TFLite files exported as the product does against the same files exported as
they were before layers XNNPACK declines were rewritten, interleaved, in float and int8.

Why: the export replaces a strided 1x1 pooling (a ResNet shortcut's subsampling) by an equivalent
1x1 depthwise convolution so the whole file runs in one XNNPACK partition; this script shows what
that is worth and checks the two files agree (outputs on random inputs).

    python scripts/time_delegation.py ../shared/data/pretrained/resnet20_cifar10.h5 [MODEL ...] --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Keras model files (.h5 or .keras)")
    parser.add_argument("--modes", default="float,int8")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from pocketflow import export
    from pocketflow.model_io import load_user_model

    def convert_as_before(model: tf.keras.Model, mode: str, representative: np.ndarray) -> bytes:
        """export.convert without the rewrite for the delegate."""
        serving = export._serving_module(model)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([serving.serve.get_concrete_function()], serving)
        export._CONFIGURE[mode](converter, representative)
        return converter.convert()

    print(f"runtime: {export.runtime_name()}, {args.threads} thread(s), batch 1, best of {args.rounds} medians")
    directory = Path(tempfile.mkdtemp(prefix="time_delegation_"))
    for model_path in args.models:
        model = load_user_model(model_path, trust=True)
        rng = np.random.default_rng(0)
        representative = rng.normal(size=(64, *model.input_shape[1:])).astype(np.float32)
        probe = rng.normal(size=(256, *model.input_shape[1:])).astype(np.float32)
        for mode in args.modes.split(","):
            before, after = directory / f"{Path(model_path).stem}_{mode}_before.tflite", \
                directory / f"{Path(model_path).stem}_{mode}_now.tflite"
            export.write_atomic(before, convert_as_before(model, mode, representative))
            export.write_atomic(after, export.convert(model, mode, representative))
            timings = export.compare_latency([before, after], rounds=args.rounds, threads=args.threads)
            outputs = [export.TFLiteModel(path, threads=2).predict(probe) for path in (before, after)]
            agree = float(np.mean(outputs[0].argmax(-1) == outputs[1].argmax(-1)))
            print(f"{Path(model_path).name} {mode}:")
            for label, path in (("before", before), ("now", after)):
                print(f"  {label:6s} {timings[str(path)]:.3f} ms  {export.delegation_of_file(path).summary()}")
            print(f"  ratio before/now {timings[str(before)] / timings[str(after)]:.2f}x; outputs: largest difference "
                  f"{np.abs(outputs[0] - outputs[1]).max():.3g}, top-1 agreement {agree:.2%}")


if __name__ == "__main__":
    main()
