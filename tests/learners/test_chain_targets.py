"""Chains whose targets are split between the stages (overall compression, fixed bits, latency), and
chains into low-bit, codebook and sparse stages; tests/learners/test_chain.py has the channel+int8 run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from learners import LEARNERS
from pocketflow.cli import main
from pocketflow.config import build_run_config
from pocketflow.data import load_dataset
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteModel, tflite_accuracy
from pocketflow.metrics import count_macs
from tests.verify_run import assert_report_matches_files

pytestmark = pytest.mark.integration


def test_channel_then_codebooks_meets_an_overall_compression_measured_on_the_shipped_file(tmp_path):
    """channel+non-uniform: --target-speedup steers the search, --target-compression is overall (the original
    baseline's float file over the shipped one): the codebook stage sizes its file with the pruning counted."""
    from learners.nonuniform_quantization.artifact import load_artifact

    run_dir = tmp_path / "run"
    assert main(["--learner", "channel+non-uniform", "--target-speedup", "2", "--target-compression", "12",
                 "--trials", "3", "--finetune-epochs", "1", "-q", "--output-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    assert report["status"] == "completed" and best["shipped_format"].startswith("codebook file")
    # the search checked the first stage's target only: its trials met it before any codebook existed
    assert report["search"]["feasible_trials"] >= 1
    artifact = Path(best["artifact_path"])
    baseline_bytes = report["baseline"]["bytes"]  # its float TFLite file
    assert baseline_bytes / artifact.stat().st_size == pytest.approx(best["compression"]) and best["compression"] >= 12
    assert best["target_check"]["compression"]["met"] is True and best["target_check"]["speedup"]["met"] is True
    # pruning alone is far from 12x: the codebooks took the rest of the budget, not a fixed width
    first, last = best["stages"]
    assert baseline_bytes / first["bytes"] < 3 and (first["learner"], last["learner"]) == ("channel", "non-uniform")
    assert first["macs"] == best["macs"] and last["artifact_path"] == best["artifact_path"]

    config = build_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()), LEARNERS.names(), "config")
    images, labels = load_dataset(config.data, config.seed).test_arrays()
    rebuilt = load_artifact(artifact)  # the codebook file holds the pruned architecture
    assert count_macs(rebuilt) == best["macs"]
    predicted = np.argmax(rebuilt.predict(images, verbose=0), axis=-1)
    assert float(np.mean(predicted == labels)) == pytest.approx(last["artifact_accuracy"], abs=1e-9)
    assert last["artifact_accuracy"] >= 0.9
    assert tflite_accuracy(TFLiteModel(last["tflite_path"]), images, labels) == pytest.approx(
        last["tflite_accuracy"], abs=1e-9)
    assert_report_matches_files(run_dir)
    from pocketflow.runs import show  # `pocketflow show RUN` and the run's last lines name each stage's figures

    shown = show(str(run_dir))
    assert f"stage 1:  channel, 0.8 epochs, float TFLite test accuracy {100 * first['tflite_accuracy']:.2f}%" in \
        "\n".join(shown)
    assert f"stage 2:  non-uniform, 0.2 epochs, codebook file test accuracy {100 * last['tflite_accuracy']:.2f}%" in \
        "\n".join(shown)


def _run_chain(tmp_path, *args):
    """main.py with ``args`` and a small budget; the run directory and its report."""
    run_dir = tmp_path / "run"
    assert main([*args, "--finetune-epochs", "0.3", "-q", "--output-dir", str(run_dir)]) == 0
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_an_overall_compression_at_fixed_bits_is_made_up_by_the_pruning(tmp_path):
    """--target-bits 4 fixes the codebook stage's width, so the pruning searches under a float-file budget
    sized before training: pruning at 2x MACs alone would leave the 4-bit file short of 20x."""
    run_dir, report = _run_chain(tmp_path, "--learner", "channel+non-uniform", "--target-speedup", "2",
                                 "--target-bits", "4", "--target-compression", "20", "--trials", "2")
    best = report["best"]
    check = best["target_check"]
    assert check["compression"]["met"] is True and check["bits"]["met"] is True and check["speedup"]["met"] is True
    baseline_bytes = report["baseline"]["bytes"]
    assert baseline_bytes / Path(best["artifact_path"]).stat().st_size >= 20
    split = best["compression_split"]
    reference = split["reference"]
    # the reference candidate (2x MACs, no size ceiling): its 4-bit file would have missed the target
    assert baseline_bytes / reference["last_stage_bytes"] < 20
    assert split["pruning_float_compression"] > baseline_bytes / reference["float_bytes"]
    first = best["stages"][0]
    assert baseline_bytes / first["bytes"] >= split["pruning_float_compression"] * 0.99  # the budget held
    assert best["average_bits"] <= 4
    assert any("was split" in line for line in (run_dir / "report.md").read_text().splitlines())
    assert_report_matches_files(run_dir)


def test_a_joint_search_scores_every_trial_after_both_stages_and_ships_the_winners_widths(tmp_path):
    """<chain>.search = joint: each trial proposes the codebook widths too, goes through both stages (no
    training) and is checked against the overall compression; the winner's widths are the shipped ones."""
    import csv

    run_dir, report = _run_chain(tmp_path, "--learner", "channel+non-uniform", "--target-speedup", "2",
                                 "--target-compression", "14", "--set", "channel+non-uniform.search=joint",
                                 "--trials", "2")
    best = report["best"]
    assert best["target_check"]["compression"]["met"] is True and best["target_check"]["speedup"]["met"] is True
    with open(run_dir / "trials.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and all('"bits_' in row["params"] and '"keep_' in row["params"] for row in rows)
    assert all(float(row["compression"]) >= 14 and float(row["speedup"]) >= 2 for row in rows)  # both stages' figures
    winner = next(row for row in rows if int(row["number"]) == report["search"]["best_trial"])
    assert best["average_bits"] == pytest.approx(float(winner["bits"]))  # its allocation, on the fine-tuned model
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["channel+non-uniform"]["search"] == "joint"
    assert "Searched jointly" in (run_dir / "report.md").read_text()
    assert_report_matches_files(run_dir)


def test_a_joint_search_needs_a_last_stage_with_something_to_search():
    from learners.base import LearnerContext
    from nets.digits_cnn import build_digits_cnn
    from pocketflow.config import DataConfig, TargetConfig
    from pocketflow.distributed import SingleProcess
    from pocketflow.training import TrainSchedule

    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    chain = LEARNERS.get("channel+uniform")
    context = LearnerContext(dataset=dataset, schedule=TrainSchedule(1, 32, 0.01, "cosine", "sgd", 5e-4, False),
                             target=TargetConfig(speedup=2.0), distributed=SingleProcess())
    learner = chain(chain.parse_options({"search": "joint"}, "the test"), context)
    with pytest.raises(ConfigError, match=r"channel\+uniform.search = joint needs a last stage with hyperparameters"):
        learner.prepare(build_digits_cnn(dataset.input_shape, dataset.num_classes, width=8))


def test_the_stages_targets_with_and_without_fixed_bits():
    from pocketflow.config import TargetConfig

    chain = LEARNERS.get("channel+uniform")
    first, last = chain.stage_targets(TargetConfig(speedup=2.0, compression=10.0))
    assert first.requested() == {"speedup": 2.0} and last.requested() == {"compression": 10.0}
    first, last = chain.stage_targets(TargetConfig(speedup=2.0, compression=10.0, bits=8.0))
    assert first.requested() == {"speedup": 2.0} and last.requested() == {"bits": 8.0}  # split after prepare
    assert chain.splits_compression(TargetConfig(speedup=2.0, compression=10.0, bits=8.0))


def test_an_overall_compression_no_pruning_can_reach_at_fixed_bits_is_one_clear_line(tmp_path, capsys):
    assert main(["--learner", "channel+uniform", "--target-speedup", "2", "--target-bits", "8",
                 "--target-compression", "900", "--trials", "1", "--finetune-epochs", "0", "-q",
                 "--set", "uniform.method=ptq", "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "an overall --target-compression of 900 cannot be met at --target-bits 8" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_channel_then_low_bit_ships_a_packed_file_that_kept_its_accuracy(tmp_path):
    """channel+uniform with --target-bits 4: the uniform stage takes its low-bit path on the pruned model,
    distilled from the original (BatchNorm trains then: frozen, the distilled fine-tuning diverged)."""
    run_dir = tmp_path / "run"
    assert main(["--learner", "channel+uniform", "--target-speedup", "2", "--target-bits", "4", "--trials", "2",
                 "--finetune-epochs", "1", "--set", "uniform.sensitivity_samples=64",
                 "--set", "uniform.representative_samples=32", "-q", "--output-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    assert best["shipped_format"] == "packed low-bit" and Path(best["artifact_path"]).name == "model_lowbit.npz"
    assert best["target_check"]["bits"] == {"target": 4.0, "shipped": best["average_bits"], "met": True}
    first, last = best["stages"]
    assert last["tflite_accuracy"] >= 0.95 and first["tflite_accuracy"] - last["tflite_accuracy"] < 0.03
    assert best["compression"] > 10  # 4-bit codes of a 2x-pruned model
    assert_report_matches_files(run_dir)


def test_an_overall_compression_picks_int8_where_it_suffices_with_the_pruning_counted():
    """channel+uniform --target-compression R: int8 (about 3-4x on its own) when the pruned model needs
    no more than that to reach R overall; low-bit codes otherwise."""
    from learners.base import LearnerContext
    from learners.uniform_quantization.learner import UniformQuantizationLearner
    from learners.uniform_quantization.mixed import MixedPrecisionLearner
    from nets.digits_cnn import build_digits_cnn
    from pocketflow.config import DataConfig, TargetConfig
    from pocketflow.distributed import SingleProcess
    from pocketflow.metrics import count_params
    from pocketflow.training import TrainSchedule

    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    baseline = build_digits_cnn(dataset.input_shape, dataset.num_classes, width=16)
    pruned = build_digits_cnn(dataset.input_shape, dataset.num_classes, width=8)
    share = count_params(pruned) / count_params(baseline)
    chain = LEARNERS.get("channel+uniform")
    options = chain.parse_options({}, "the test")
    for overall, expected in ((2.5 / share, UniformQuantizationLearner), (4.0 / share, MixedPrecisionLearner),
                              (1.5, UniformQuantizationLearner)):
        target = TargetConfig(speedup=2.0, compression=overall)
        context = LearnerContext(dataset=dataset, schedule=TrainSchedule(1, 32, 0.01, "cosine", "sgd", 5e-4, False),
                                 target=target, distributed=SingleProcess())
        learner = chain(options, context)
        learner.prepare(baseline)
        relative = learner._relative(chain.stage_targets(target)[1], pruned)
        assert relative.speedup is None  # the pruning's target stays with the pruning
        assert chain.stage_classes[-1].strategy(options.stages["uniform"], relative) is expected, overall


def test_channel_then_sparse_int8_values_ships_a_container_that_loads_with_the_measured_accuracy(tmp_path):
    """channel+weight-sparse: 75% zeros in the pruned model's kernels, int8 values (--bits 8 reaches the
    weight-sparse stage); the sparsity is counted in the shipped weights, the compression in its bytes."""
    from learners.weight_sparsification.artifact import load_container
    from pocketflow.training import accuracy

    run_dir = tmp_path / "run"
    assert main(["--learner", "channel+weight-sparse", "--target-speedup", "2", "--target-sparsity", "0.75",
                 "--bits", "8", "--trials", "2", "--finetune-epochs", "1", "-q", "--output-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    assert best["target_check"]["sparsity"]["met"] is True and best["target_check"]["speedup"]["met"] is True
    first, last = best["stages"]
    assert last["learner"] == "weight-sparse" and last["artifact_path"] == best["artifact_path"]
    artifact = Path(best["artifact_path"])
    assert report["baseline"]["bytes"] / artifact.stat().st_size == pytest.approx(best["compression"])
    assert best["compression"] > 10  # int8 values of a quarter of a 2x-pruned model's weights

    config = build_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()), LEARNERS.names(), "config")
    dataset = load_dataset(config.data, config.seed)
    model = load_container(artifact)
    assert count_macs(model) == best["macs"]
    kernels = [w for w in model.weights if "kernel" in w.name]
    zeros = sum(int(np.sum(w.numpy() == 0)) for w in kernels) / sum(int(w.shape.num_elements()) for w in kernels)
    assert zeros >= 0.75 - 1e-3
    assert accuracy(model, dataset.test(256)) == pytest.approx(last["artifact_accuracy"], abs=1e-9)
    assert last["artifact_accuracy"] >= 0.9
    assert "weight-sparse: 0.2 epochs, sparse container (int8) test accuracy" in (
        run_dir / "report.md").read_text()
    assert_report_matches_files(run_dir)


def test_sparse_then_int8_is_weight_sparse_int8_with_each_stage_measured(tmp_path):
    """weight-sparse+uniform (YAML list form): the weight-sparse learner's own int8 stage (bits 8, full-integer
    by default), an overall compression met on the shipped file, and both stages' files on record and
    measured again here: the sparse float model and the shipped int8 container (loaded back in Keras)."""
    from learners.weight_sparsification.artifact import load_container
    from pocketflow.export import delegation_of_file
    from pocketflow.training import accuracy

    config_path = tmp_path / "chain.yaml"
    config_path.write_text("learner: [weight-sparse, uniform]\ntarget: {compression: 12}\n")
    run_dir = tmp_path / "run"
    assert main(["--config", str(config_path), "--trials", "2", "--finetune-epochs", "1", "-q",
                 "--output-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    assert report["learner"] == "weight-sparse+uniform" and best["target_check"]["compression"]["met"] is True
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["weight-sparse"]["bits"] == 8 and recorded["weight-sparse"]["int8_mode"] == "full"
    first, last = best["stages"]
    assert (first["learner"], last["learner"]) == ("weight-sparse", "uniform")
    assert last["artifact_path"] == best["artifact_path"] and last["bits"] == 8
    assert first["sparsity"] == pytest.approx(best["sparsity"]) and first["finetune_epochs"] == pytest.approx(1.0)

    config = build_run_config(recorded, LEARNERS.names(), "config")
    dataset = load_dataset(config.data, config.seed)
    images, labels = dataset.test_arrays()
    sparse_float = TFLiteModel(first["tflite_path"])
    assert sparse_float.interpreter.get_input_details()[0]["dtype"] == np.float32
    assert tflite_accuracy(sparse_float, images, labels) == pytest.approx(first["tflite_accuracy"], abs=1e-9)
    assert Path(first["tflite_path"]).stat().st_size == first["bytes"] > 2 * best["artifact_bytes"]  # int8 values
    shipped = Path(best["artifact_path"])
    assert report["baseline"]["bytes"] / shipped.stat().st_size == pytest.approx(best["compression"])
    assert best["compression"] >= 12.0
    if shipped.suffix == ".npz":  # the container (the smaller file on digits)
        assert accuracy(load_container(shipped), dataset.test(256)) == pytest.approx(last["artifact_accuracy"],
                                                                                    abs=1e-9)
    int8_file = TFLiteModel(best["sparse_files"]["tflite"]["path"])
    assert int8_file.interpreter.get_input_details()[0]["dtype"] == np.int8  # full-integer
    assert delegation_of_file(int8_file.path).full  # XNNPACK takes the whole file (not so in dynamic-range)
    assert "Stages of weight-sparse+uniform" in (run_dir / "report.md").read_text()
    assert_report_matches_files(run_dir)


def _latency_split_chain(tmp_path, name, target, timings=None):
    """A chain prepared on an untrained digits CNN, with the latency split's timings recorded in its run
    directory beforehand (as --resume finds them), so the planning is exact arithmetic on any CPU."""
    from learners.base import LearnerContext
    from nets.digits_cnn import build_digits_cnn
    from pocketflow.config import DataConfig
    from pocketflow.distributed import SingleProcess
    from pocketflow.training import TrainSchedule

    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    if timings is not None:
        (tmp_path / "latency_split.json").write_text(json.dumps(timings))
    chain = LEARNERS.get(name)
    context = LearnerContext(dataset=dataset, schedule=TrainSchedule(1, 32, 0.01, "cosine", "sgd", 5e-4, False),
                             target=target, distributed=SingleProcess(), run_directory=tmp_path,
                             baseline_latency_ms=1.0)
    stages = {"channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
              "uniform": {"representative_samples": 16, "compare_dynamic": False}}
    learner = chain(chain.parse_options({"stages": {key: value for key, value in stages.items()
                                                    if key in chain.sections}}, "the test"), context)
    learner.prepare(build_digits_cnn(dataset.input_shape, dataset.num_classes, width=8))
    return learner


# The original model's float file 1.0 ms and int8 file 0.5 ms; the reference candidate's 0.4 and 0.3 ms.
TIMINGS = {"original": {"float": 1.0, "last": 0.5}, "reference": {"float": 0.4, "last": 0.3}}


def test_an_overall_latency_target_is_split_by_the_stages_files_timed_before_training(tmp_path):
    """channel+uniform with --target-latency-speedup: the int8 file's time is taken as linear in the float
    file's between the original's and the reference candidate's timed files, and the pruning plans the
    float ratio that puts the int8 file on the target; the search checks that share."""
    from pocketflow.config import TargetConfig

    target = TargetConfig(speedup=1.5, latency_speedup=2.5)
    learner = _latency_split_chain(tmp_path, "channel+uniform", target, TIMINGS)
    # int8 goal 1.0 / 2.5 = 0.4 ms less the 1.5% margin; slope (0.5 - 0.3) / (1.0 - 0.4) = 1/3; float needed
    # 0.4 + (0.4 / 1.015 - 0.3) * 3 = 0.682 ms
    planned = 1 / (0.4 + (0.4 / 1.015 - 0.3) * 3)
    assert learner.first.context.target.latency_speedup == pytest.approx(planned)
    assert learner.searched_targets(target) == {"speedup": 1.5, "latency_speedup": 2.5}  # checked as the int8 file's
    assert learner.latency_split["timings_ms"] == TIMINGS  # the recorded timings, not new ones
    assert learner.latency_split["pruning_float_latency_speedup"] == pytest.approx(planned)
    # a trial's predicted float ratio is reported as the int8 file's: float 0.7 ms -> int8 0.4 ms -> 2.5x
    assert learner._overall_latency({"latency_speedup": 1 / 0.7})["latency_speedup"] == pytest.approx(2.5)
    assert learner._overall_latency({"latency_speedup": 2.5})["latency_speedup"] == pytest.approx(1 / (0.3 + 0.0))
    reached = learner.reachable()
    assert reached["latency_speedup"] == pytest.approx(
        learner._overall_latency({"latency_speedup": learner.first.reachable()["latency_speedup"]})["latency_speedup"])

    # --target-latency-ms is the same ratio of the baseline's measured file (1.0 ms in this context)
    learner = _latency_split_chain(tmp_path, "channel+uniform", TargetConfig(speedup=1.5, latency_ms=0.4), TIMINGS)
    assert learner.first.context.target.latency_speedup == pytest.approx(planned)
    assert learner.first.context.target.latency_ms is None


def test_a_latency_split_the_last_stage_meets_alone_or_no_pruning_can_reach(tmp_path, caplog):
    from pocketflow.config import TargetConfig

    # 3.3x: float needed 0.4 + (1 / 3.3495 - 0.3) * 3 = 0.395 ms, faster than the reference candidate's 0.4 ms
    # (the line extrapolated, and the int8 file barely moves): a warning
    with caplog.at_level("WARNING", logger="learners.chain"):
        learner = _latency_split_chain(tmp_path, "channel+uniform", TargetConfig(speedup=1.5, latency_speedup=3.3),
                                       TIMINGS)
    assert learner.first.context.target.latency_speedup == pytest.approx(1 / (0.4 + (1 / 3.3495 - 0.3) * 3))
    assert "expect a large accuracy cost, or ask for 2.00x or less" in caplog.text

    # 1.5x: int8 alone gives 2x; with a MAC target the pruning keeps only that one
    learner = _latency_split_chain(tmp_path, "channel+uniform", TargetConfig(speedup=1.5, latency_speedup=1.5),
                                   TIMINGS)
    assert learner.first.context.target.latency_speedup is None
    assert learner.searched_targets(TargetConfig(speedup=1.5, latency_speedup=1.5)) == {"speedup": 1.5}
    with pytest.raises(ConfigError, match="the uniform stage alone makes the file 2x faster than the original's"):
        _latency_split_chain(tmp_path, "channel+uniform", TargetConfig(latency_speedup=1.5), TIMINGS)
    # 10x: the int8 file's time left at zero pruning cost (0.3 - 0.4 / 3 = 0.167 ms) is over the 0.1 ms goal
    with pytest.raises(ConfigError, match=r"an overall latency speedup of 10x cannot be met by 'channel\+uniform' "
                       r"here: the uniform file's time falls too little"):
        _latency_split_chain(tmp_path, "channel+uniform", TargetConfig(speedup=1.5, latency_speedup=10.0), TIMINGS)


def test_a_last_stage_whose_file_runs_as_float_leaves_the_latency_target_to_the_pruning(tmp_path):
    """channel+non-uniform ships codebooks rebuilt as a float file: nothing to time, the pruning plans it all."""
    from pocketflow.config import TargetConfig

    target = TargetConfig(speedup=1.5, latency_speedup=1.3, bits=4)
    learner = _latency_split_chain(tmp_path, "channel+non-uniform", target)
    assert learner.latency_split is None and not (tmp_path / "latency_split.json").exists()
    assert learner.first.context.target.latency_speedup == 1.3
    assert learner.searched_targets(target) == {"speedup": 1.5, "latency_speedup": 1.3}
