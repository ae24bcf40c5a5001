"""Peer methods run in the benchmark harness on the same model, data and training budget as ours.

Each peer takes the same main.py-style arguments as our runs (model or net, dataset, data
directory, preprocessing, target, ``--finetune-epochs``), so the two sides of a comparison read
one data pipeline and train with one recipe (``pocketflow.training.train`` with the fine-tuning
learning rate): only the compression method differs. Every peer ends in a TFLite file that is
evaluated in the interpreter on the test split and timed at batch 1, like ours.

Run one as ``python -m pocketflow.benchmarks.peers PEER OUTPUT_DIR -- MAIN_PY_ARGS...``; it writes
``OUTPUT_DIR/peer.json`` with the row the harness reads.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import tensorflow as tf

from pocketflow.config import RunConfig, build_run_config
from pocketflow.data import load_dataset
from pocketflow.data.base import Dataset
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteMeasurement, export_and_measure, write_atomic
from pocketflow.registry import Registry
from pocketflow.training import TrainSchedule, accuracy, from_trained, resolve_schedule, train

log = logging.getLogger(__name__)

PRUNING_FREQUENCY = 100  # prune_low_magnitude's default schedule updates the masks every 100 steps


@dataclass
class PeerRun:
    """What a peer receives: the baseline and the run's data, recipe and output directory."""

    config: RunConfig
    dataset: Dataset
    schedule: TrainSchedule
    baseline: tf.keras.Model
    output_dir: Path

    def finetune_schedule(self) -> TrainSchedule:
        epochs = self.config.train.finetune_epochs
        if epochs is None:
            raise ConfigError("peer runs need --finetune-epochs (the training budget both sides get)")
        return from_trained(self.schedule.with_epochs(epochs))

    def measure(self, model: tf.keras.Model, name: str, mode: str, configure=None) -> TFLiteMeasurement:
        images, labels = self.dataset.test_arrays()
        representative = self.dataset.sample_train(self.config.export.representative_samples, seed=self.config.seed)
        return export_and_measure(model, self.output_dir / f"{name}.tflite", mode, test_images=images,
                                  test_labels=labels, representative=representative,
                                  threads=self.config.export.threads, runs=self.config.export.latency_runs,
                                  configure=configure)


Peer = Callable[[PeerRun], Dict[str, Any]]
PEERS: Registry[Peer] = Registry("peer")


def _sparsity(model: tf.keras.Model) -> float:
    """Fraction of zeros in the Conv2D / Dense kernels (what prune_low_magnitude prunes)."""
    kernels = [layer.kernel.numpy() for layer in model.layers
               if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))
               and not isinstance(layer, tf.keras.layers.DepthwiseConv2D)]
    total = sum(k.size for k in kernels)
    return float(sum(int((k == 0).sum()) for k in kernels) / total) if total else 0.0


def _sparse_encoding(converter: tf.lite.TFLiteConverter) -> None:
    converter.optimizations = list(converter.optimizations) + [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]


@PEERS.register("tfmot-prune")
def tfmot_prune(run: PeerRun) -> Dict[str, Any]:
    """tfmot ``prune_low_magnitude`` with its default schedule shape (constant sparsity from step 0,
    masks updated every 100 steps) at the target sparsity, trained for the same epochs as ours."""
    import tensorflow_model_optimization as tfmot

    sparsity = run.config.target.sparsity
    if sparsity is None:
        raise ConfigError("the tfmot-prune peer needs --target-sparsity")
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=PRUNING_FREQUENCY)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(run.baseline, pruning_schedule=schedule)
    wrappers = [layer for layer in wrapped.layers if hasattr(layer, "pruning_obj")]
    for layer in wrappers:
        layer.pruning_step.assign(0)  # what UpdatePruningStep does at the start; the wrappers count steps

    def mask_weights() -> None:  # ... and at every epoch's end: weights = weights * mask
        for layer in wrappers:
            layer.pruning_obj.weight_mask_op()

    schedule_run = run.finetune_schedule()
    steps_per_epoch = max(1, run.dataset.num_train // min(schedule_run.batch_size, run.dataset.num_train))
    counter = {"step": 0}

    def after_step() -> None:
        counter["step"] += 1
        if counter["step"] % steps_per_epoch == 0:
            mask_weights()

    train(wrapped, run.dataset, schedule_run, seed=run.config.seed, after_step=after_step,
          description="tfmot prune_low_magnitude")
    mask_weights()
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    shipped = run.measure(stripped, "tfmot_pruned_sparse", "float", configure=_sparse_encoding)
    return {"accuracy": shipped.accuracy, "keras_accuracy": accuracy(stripped, run.dataset.test(256)),
            "sparsity": _sparsity(stripped), "shipped": shipped, "shipped_format": "sparse TFLite (converter)"}


@PEERS.register("tfmot-qat")
def tfmot_qat(run: PeerRun) -> Dict[str, Any]:
    """tfmot ``quantize_model`` with its defaults, trained for the same epochs, converted to int8."""
    import tensorflow_model_optimization as tfmot

    quantized = tfmot.quantization.keras.quantize_model(run.baseline)
    train(quantized, run.dataset, run.finetune_schedule(), seed=run.config.seed, description="tfmot QAT")
    shipped = run.measure(quantized, "tfmot_qat_int8", "int8")
    return {"accuracy": shipped.accuracy, "shipped": shipped, "shipped_format": "int8 TFLite"}


@PEERS.register("tflite-ptq")
def tflite_ptq(run: PeerRun) -> Dict[str, Any]:
    """TFLite's own post-training full-integer quantization (representative set, no training)."""
    shipped = run.measure(run.baseline, "tflite_ptq_int8", "int8")
    return {"accuracy": shipped.accuracy, "shipped": shipped, "shipped_format": "int8 TFLite"}


@PEERS.register("torch-pruning")
def torch_pruning(run: PeerRun) -> Dict[str, Any]:
    """Torch-Pruning 1.6 (group-norm importance, global ranking) on a PyTorch copy of the same weights."""
    from pocketflow.benchmarks.torch_pruning_peer import run_torch_pruning

    return run_torch_pruning(run)


def load_run(argv: List[str], output_dir: Path) -> PeerRun:
    """The baseline, data and recipe main.py would use for ``argv`` (a model file or a cached net)."""
    from learners import LEARNERS
    from nets import NETS
    from pocketflow.baseline import load_baseline, train_baseline
    from pocketflow.cli import build_parser, merged_config_dict
    from pocketflow.distributed import SingleProcess
    from pocketflow.runner import _schedule_for, resolve_names

    data, source = merged_config_dict(build_parser().parse_args(argv))
    config = resolve_names(build_run_config(data, LEARNERS.names(), source))
    dataset = load_dataset(config.data, config.seed)
    net = NETS.get(config.net) if config.net else None
    schedule = resolve_schedule(_schedule_for(net, config.data.name), config.train, config.data)
    if config.model:
        baseline = load_baseline(config.model, dataset, config.trust_model)
    else:
        baseline, _ = train_baseline(net, config.data, dataset, schedule, seed=config.seed,
                                     distributed=SingleProcess(), use_cache=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return PeerRun(config, dataset, schedule, baseline, output_dir)


def run_peer(name: str, argv: List[str], output_dir: Path) -> Dict[str, Any]:
    """Run peer ``name`` and return its row (also written to ``output_dir/peer.json``)."""
    peer = PEERS.get(name)
    started = time.time()
    run = load_run(argv, output_dir)
    baseline_accuracy = accuracy(run.baseline, run.dataset.test(256))
    baseline_file = run.measure(run.baseline, "baseline", "float")
    result = peer(run)
    shipped: TFLiteMeasurement = result.pop("shipped")
    row = {
        "method": name, "baseline_accuracy": baseline_accuracy, "accuracy": result.pop("accuracy"),
        "baseline_tflite_bytes": baseline_file.bytes, "baseline_tflite_latency_ms": baseline_file.latency_ms,
        "artifact_bytes": shipped.bytes, "artifact_path": shipped.path, "tflite_latency_ms": shipped.latency_ms,
        "mac_speedup": 1.0, "latency_speedup": baseline_file.latency_ms / shipped.latency_ms,
        "compression": baseline_file.bytes / shipped.bytes, "seconds": time.time() - started,
        "finetune_epochs": run.config.train.finetune_epochs, "runtime": shipped.runtime, **result,
    }
    write_atomic(output_dir / "peer.json", json.dumps(row, indent=2, default=str).encode())
    return row


def main(argv: List[str]) -> int:
    if len(argv) < 2 or "--" not in argv:
        print("usage: python -m pocketflow.benchmarks.peers PEER OUTPUT_DIR -- MAIN_PY_ARGS...\n"
              f"peers: {', '.join(PEERS.names())}", file=sys.stderr)
        return 2
    split = argv.index("--")
    name, output = argv[0], argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        row = run_peer(name, argv[split + 1:], Path(output))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: row[k] for k in ("method", "baseline_accuracy", "accuracy", "compression")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
