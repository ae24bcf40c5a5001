"""An experiment, not an option: main.py with the channel learner's least-squares re-fit rescaled, filter by
filter, to the norm its kept weights had before the re-fit, where a BatchNorm follows (its moving statistics
take the inverse scale, so the candidate computes exactly what the re-fit computes).

Why: the re-fit raises the readers' kernel norms (it makes up for the channels removed: on ResNet-20 at 3x the
factors this script applied were 0.52-0.84 per layer, by its own printout), and a
conv followed by BatchNorm trains at an effective rate of lr / |w|^2, so the re-fitted layers would recover
more slowly than the same layers with their own weights. This separates the re-fit's starting point from
that side effect.

    python scripts/experiments/refit_norms.py MAIN.PY ARGUMENTS   (with --set channel.refit=true)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import learners.channel_pruning.reconstruction as reconstruction  # noqa: E402  (pocketflow first: its Keras)
from pocketflow.cli import main  # noqa: E402
import numpy as np  # noqa: E402

original_refit_weights = reconstruction._refit_weights
rescaled = []


def refit_weights_with_original_norms(analysis, terminator, keep, solution, intercept, sink):
    result = original_refit_weights(analysis, terminator, keep, solution, intercept, sink)
    if sink is None:  # a bias, not a BatchNorm, takes the output: the scale would change the function
        return result
    kernel = result[terminator][0]
    original = analysis.layer(terminator).get_weights()[0]
    original = original[..., analysis.input_indices(terminator, keep), :][..., analysis.output_indices(terminator, keep)]
    axes = tuple(range(kernel.ndim - 1))
    scale = np.sqrt(np.sum(original ** 2, axis=axes) / np.maximum(np.sum(kernel ** 2, axis=axes), 1e-12))
    result[terminator] = [(kernel * scale).astype(np.float32)] + result[terminator][1:]
    batchnorm = analysis.layer(sink)
    names = [weight.name for weight in batchnorm.weights]
    bn_weights = list(result[sink])
    for index, name in enumerate(names):
        if "moving_mean" in name:
            bn_weights[index] = (bn_weights[index] * scale).astype(np.float32)
        elif "moving_variance" in name:
            bn_weights[index] = (bn_weights[index] * scale ** 2).astype(np.float32)
    result[sink] = bn_weights
    rescaled.append(f"{terminator}: {np.mean(scale):.2f}")
    return result


reconstruction._refit_weights = refit_weights_with_original_norms
code = main()
print("rescaled (mean factor per layer, last search):", ", ".join(rescaled[-12:]), flush=True)
sys.exit(code)
