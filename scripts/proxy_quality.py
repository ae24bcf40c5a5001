"""How well does a channel-pruning trial score predict the fine-tuned result?

Builds N candidates of one channel search (the reference trial first, then proposals of the
product's sampler, told their plain scores as in a real search), and for each one records the
trial scores we could use (validation accuracy of the reconstructed candidate as it is, and
after BatchNorm statistics are re-estimated on K training batches), then fine-tunes it as the
product does (distilled from the baseline, the fine-tuning learning rate) and measures its
test accuracy. Prints and writes the Spearman rank correlation of each score with that test
accuracy, and what each score costs.

    python scripts/proxy_quality.py runs/proxy-r20-3x --candidates 8 --finetune-epochs 1 \\
        --recalibrate 20,50 -- --model ../shared/data/pretrained/resnet20_cifar10.h5 --dataset cifar10 \\
        --data-dir ../shared/data/cifar10 --set 'data.mean=[0.485,0.456,0.406]' \\
        --set 'data.std=[0.229,0.224,0.225]' --target-speedup 3.0
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
from learners.base import Candidate, LearnerContext  # noqa: E402
from learners.distillation import Distiller  # noqa: E402
from pocketflow.training import recalibrate_batchnorm  # noqa: E402
from pocketflow.benchmarks.peers import load_run  # noqa: E402
from pocketflow.distributed import SingleProcess  # noqa: E402
from pocketflow.export import write_atomic  # noqa: E402
from pocketflow.metrics import count_macs  # noqa: E402
from pocketflow.training import accuracy  # noqa: E402

log = logging.getLogger("proxy_quality")


def main() -> int:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--recalibrate", default="20", help="comma-separated batch counts for the BatchNorm score")
    args = parser.parse_args(sys.argv[1:split])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    output_dir = Path(args.output_dir)
    run = load_run(sys.argv[split + 1:] + ["--finetune-epochs", str(args.finetune_epochs)], output_dir)
    config = run.config
    learner_class = LEARNERS.get("channel")
    options = learner_class.parse_options(config.learner_section("channel"), "the command line")
    context = LearnerContext(dataset=run.dataset, schedule=run.schedule, target=config.target,
                             distributed=SingleProcess(), seed=config.seed, baseline_macs=count_macs(run.baseline))
    learner = learner_class(options, context)
    learner.prepare(run.baseline)
    batch_counts = [int(text) for text in args.recalibrate.split(",") if text]
    teacher = Distiller(run.baseline, temperature=config.distillation.temperature, alpha=config.distillation.alpha)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config.hpo.sampler, config.seed))
    study.enqueue_trial(learner.reference_params())
    validation = run.dataset.validation(256)
    rows = []
    for index in range(args.candidates):
        trial = study.ask()
        hparams = learner.search_space(trial)
        started = time.time()
        candidate = learner.compress(hparams).model
        row = {"candidate": index, "keep_counts": dict(hparams.keep_counts),
               "speedup": context.baseline_macs / count_macs(candidate), "compress_seconds": time.time() - started}
        row["plain"] = accuracy(candidate, validation)
        study.tell(trial, row["plain"])
        for batches in batch_counts:
            weights = candidate.get_weights()
            started = time.time()
            recalibrate_batchnorm(candidate, run.dataset, batches, run.schedule.batch_size, seed=config.seed)
            row[f"batchnorm_{batches}"] = accuracy(candidate, validation)
            row[f"batchnorm_{batches}_seconds"] = time.time() - started
            candidate.set_weights(weights)
        started = time.time()
        learner.finetune(Candidate(candidate, hparams), args.finetune_epochs, teacher=teacher)
        row["finetune_seconds"] = time.time() - started
        row["validation_after"] = accuracy(candidate, validation)
        row["test_after"] = accuracy(candidate, run.dataset.test(256))
        rows.append(row)
        log.info("candidate %d: %s", index, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        write_atomic(output_dir / "candidates.json", json.dumps(rows, indent=2).encode())
    scores = ["plain"] + [f"batchnorm_{batches}" for batches in batch_counts]
    test = [row["test_after"] for row in rows]
    summary = {"candidates": len(rows), "finetune_epochs": args.finetune_epochs, "command": " ".join(sys.argv),
               "spearman_with_test_after_finetuning": {
                   score: float(spearmanr([row[score] for row in rows], test).statistic) for score in scores},
               "spearman_validation_after_with_test_after": float(
                   spearmanr([row["validation_after"] for row in rows], test).statistic)}
    write_atomic(output_dir / "proxy_quality.json", json.dumps({"summary": summary, "candidates": rows},
                                                               indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
