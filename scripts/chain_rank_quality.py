"""Does int8 change which channel-pruning candidate is best? The question behind the chains' staged search.

A chain (``--learner channel+uniform``) scores each pruning candidate in float and quantizes only the
winner. That is sound if post-training int8 moves every candidate's accuracy by about the same amount,
so the float ranking is the int8 ranking. This builds N candidates of one channel search (the reference
trial first, then the product's sampler, told the trial scores as in a real search), and for each
records the trial score (validation accuracy after the learner's BatchNorm re-estimation) and the
validation accuracy of the same candidate converted to full-integer int8 TFLite (post-training, the
learner's calibration set), both before any fine-tuning. Prints and writes the Spearman rank
correlation between the two and the accuracy int8 costs each candidate.

    python scripts/chain_rank_quality.py runs/chain-rank-r20-2x --candidates 10 -- \\
        --model ../shared/data/pretrained/resnet20_cifar10.h5 --dataset cifar10 \\
        --data-dir ../shared/data/cifar10 --set 'data.mean=[0.485,0.456,0.406]' \\
        --set 'data.std=[0.229,0.224,0.225]' --target-speedup 2.0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pocketflow import keras_setup  # noqa: E402  (one Keras for the process)

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hpo.samplers import make_sampler  # noqa: E402
from learners import LEARNERS  # noqa: E402
from learners.base import LearnerContext  # noqa: E402
from pocketflow.benchmarks.peers import load_run  # noqa: E402
from pocketflow.distributed import SingleProcess  # noqa: E402
from pocketflow.export import TFLiteModel, convert, tflite_accuracy, write_atomic  # noqa: E402
from pocketflow.metrics import count_macs  # noqa: E402
from pocketflow.training import accuracy  # noqa: E402

log = logging.getLogger("chain_rank_quality")


def main() -> int:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--candidates", type=int, default=10)
    args = parser.parse_args(sys.argv[1:split])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    output_dir = Path(args.output_dir)
    run = load_run(sys.argv[split + 1:], output_dir)
    config = run.config
    channel = LEARNERS.get("channel")
    options = channel.parse_options(config.learner_section("channel"), "the command line")
    uniform_options = LEARNERS.get("uniform").parse_options(config.learner_section("uniform"), "the command line")
    context = LearnerContext(dataset=run.dataset, schedule=run.schedule, target=config.target,
                             distributed=SingleProcess(), seed=config.seed, baseline_macs=count_macs(run.baseline))
    learner = channel(options, context)
    learner.prepare(run.baseline)
    representative = run.dataset.sample_train(uniform_options.representative_samples, seed=config.seed)
    images, labels = run.dataset.validation_arrays()
    validation = run.dataset.validation(256)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config.hpo.sampler, config.seed))
    study.enqueue_trial(learner.reference_params())
    rows = []
    for index in range(args.candidates):
        trial = study.ask()
        hparams = learner.search_space(trial)
        candidate = learner.compress(hparams).model
        score = accuracy(candidate, validation)
        study.tell(trial, score)
        started = time.time()
        path = output_dir / f"candidate_{index}_int8.tflite"
        write_atomic(path, convert(candidate, "int8", representative))
        int8 = tflite_accuracy(TFLiteModel(path, threads=2), images, labels)
        rows.append({"candidate": index, "criterion": hparams.criterion, "keep_counts": dict(hparams.keep_counts),
                     "speedup": context.baseline_macs / count_macs(candidate), "float_validation": score,
                     "int8_validation": int8, "int8_seconds": time.time() - started})
        log.info("candidate %d: float %.4f, int8 %.4f", index, score, int8)
        write_atomic(output_dir / "candidates.json", json.dumps(rows, indent=2).encode())
    drops = [row["float_validation"] - row["int8_validation"] for row in rows]
    best_float = max(range(len(rows)), key=lambda i: rows[i]["float_validation"])
    best_int8 = max(range(len(rows)), key=lambda i: rows[i]["int8_validation"])
    summary = {"candidates": len(rows), "command": " ".join(sys.argv),
               "spearman_float_with_int8": float(spearmanr([row["float_validation"] for row in rows],
                                                           [row["int8_validation"] for row in rows]).statistic),
               "int8_drop_points": {"mean": 100 * float(np.mean(drops)), "min": 100 * float(np.min(drops)),
                                    "max": 100 * float(np.max(drops))},
               "best_in_float": best_float, "best_in_int8": best_int8,
               "int8_of_the_float_winner_vs_best_int8_points": 100 * (rows[best_int8]["int8_validation"]
                                                                      - rows[best_float]["int8_validation"])}
    write_atomic(output_dir / "chain_rank_quality.json", json.dumps({"summary": summary, "candidates": rows},
                                                                    indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
