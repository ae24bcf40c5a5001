"""Chains (learners/chain.py): channel pruning then int8 in one run, as a user runs it from main.py."""

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
from pocketflow.export import TFLiteModel, tflite_accuracy
from pocketflow.metrics import count_macs
from tests.verify_run import assert_report_matches_files

pytestmark = pytest.mark.integration

CHAIN = ["--learner", "channel+uniform", "--target-speedup", "2.0", "--trials", "4", "--finetune-epochs", "2",
         "--set", "uniform.representative_samples=64", "--set", "uniform.compare_dynamic=false", "-q"]


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    assert main([*CHAIN, "--output-dir", str(run_dir)]) == 0
    return run_dir


def test_channel_then_int8_ships_a_pruned_int8_file_measured_per_stage(chain_run):
    report = json.loads((chain_run / "report.json").read_text())
    best = report["best"]
    assert report["status"] == "completed" and report["learner"] == "channel+uniform"
    assert best["shipped_format"] == "int8 TFLite"
    # QAT's file, or the post-training one where QAT scored lower on validation (never chosen on test)
    assert Path(best["artifact_path"]).name == {"qat": "model_int8.tflite", "ptq": "ptq_int8.tflite"}[
        best["shipped_method"]]
    assert best["speedup"] >= 2.0 and best["target_check"]["speedup"]["met"] is True
    first, last = best["stages"]
    assert (first["learner"], last["learner"]) == ("channel", "uniform")
    assert last["shipped_method"] == best["shipped_method"] and last["tflite_path"] == best["artifact_path"]
    assert first["finetune_epochs"] + last["finetune_epochs"] == pytest.approx(2.0)
    assert last["finetune_epochs"] == pytest.approx(0.4)  # last_stage_share 0.2 by default
    assert first["macs"] == best["macs"]  # int8 keeps the pruned architecture

    # Each stage's file, measured again from the file: the pruned float model and the shipped int8 one.
    config = build_run_config(yaml.safe_load((chain_run / "config.yaml").read_text()), LEARNERS.names(), "config")
    images, labels = load_dataset(config.data, config.seed).test_arrays()
    pruned_float = TFLiteModel(first["tflite_path"])
    assert tflite_accuracy(pruned_float, images, labels) == pytest.approx(first["tflite_accuracy"], abs=1e-9)
    assert pruned_float.interpreter.get_input_details()[0]["dtype"] == np.float32
    shipped = TFLiteModel(best["artifact_path"])
    assert shipped.interpreter.get_input_details()[0]["dtype"] == np.int8  # full-integer int8
    assert tflite_accuracy(shipped, images, labels) == pytest.approx(last["tflite_accuracy"], abs=1e-9)
    # int8 of a 2x-pruned model: smaller than int8 (about 4x) or pruning (about 2x) alone
    assert best["compression"] > 5.0
    assert Path(first["tflite_path"]).stat().st_size > 2.5 * best["artifact_bytes"]
    assert "Stages of channel+uniform" in (chain_run / "report.md").read_text()
    assert_report_matches_files(chain_run)  # every file the report names, delegation included
    assert str(Path(first["tflite_path"]).relative_to(chain_run)) in best["delegation"]


def test_the_recorded_config_and_the_yaml_list_form_repeat_the_chain(chain_run, tmp_path, capsys):
    recorded = yaml.safe_load((chain_run / "config.yaml").read_text())
    assert recorded["learner"] == "channel+uniform"
    assert recorded["channel+uniform"] == {"last_stage_share": 0.2, "search": "staged"}
    assert recorded["uniform"]["representative_samples"] == 64 and "criterion" in recorded["channel"]
    assert main(["--config", str(chain_run / "config.yaml"), "--dry-run", "--output-dir", str(tmp_path / "a")]) == 0
    assert "learner:    channel+uniform" in capsys.readouterr().out

    listed = tmp_path / "chain.yaml"
    listed.write_text("learner: [channel, uniform]\ntarget: {speedup: 2.0}\nchannel+uniform: {last_stage_share: 0.5}\n")
    assert main(["--config", str(listed), "--dry-run", "--output-dir", str(tmp_path / "b")]) == 0
    plan = capsys.readouterr().out
    assert "learner:    channel+uniform" in plan and "last_stage_share: 0.5" in plan
    assert "stages:     channel (searched; its winner fine-tuned 3 epochs), then uniform on that model (3 epochs" in plan


@pytest.mark.parametrize("args, message", [
    (["--learner", "uniform+channel"],
     "unknown learner 'uniform+channel'; choose one of: channel, channel+non-uniform, channel+uniform, "
     "channel+weight-sparse"),
    (["--learner", "weight-sparse+uniform", "--target-sparsity", "0.8", "--set", "uniform.bits=4"],
     "uniform.bits would be ignored: --learner weight-sparse+uniform reads only the 'weight-sparse' and "
     "'weight-sparse+uniform' sections"),
    (["--learner", "weight-sparse+uniform", "--target-sparsity", "0.8", "--set", "weight-sparse+uniform.bits=8"],
     "learner 'weight-sparse+uniform' has no options of its own; set them in the 'weight-sparse' section"),
    (["--learner", "weight-sparse+uniform", "--target-bits", "8"],
     "learner 'weight-sparse+uniform' cannot meet target bits; it accepts --target-sparsity, --target-compression"),
    (["--learner", "channel+uniform", "--target-speedup", "2", "--target-sparsity", "0.5"],
     "learner 'channel+uniform' cannot meet target sparsity; its stages take channel: --target-speedup, "
     "--target-compression, --target-latency-speedup, --target-latency-ms; uniform: --target-bits, "
     "--target-compression"),
    (["--learner", "channel+non-uniform", "--target-speedup", "2"],
     "the non-uniform stage of 'channel+non-uniform': learner 'non-uniform' needs a target: pass --target-bits"),
    (["--learner", "channel+uniform", "--target-speedup", "2", "--set", "channel+uniform.last_stage_share=2"],
     "channel+uniform.last_stage_share = 2"),
    (["--learner", "channel+uniform", "--target-speedup", "2", "--set", "weight-sparse.pattern=2:4"],
     "reads only the 'channel' and 'channel+uniform' and 'uniform' sections"),
])
def test_chain_errors_are_one_clear_line(args, message, tmp_path, capsys):
    assert main([*args, "--dry-run", "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_stage_flags_reach_their_stage(tmp_path, capsys):
    """--bits belongs to the uniform stage, --set channel.* to the channel stage: neither is an error."""
    assert main(["--learner", "channel+uniform", "--target-speedup", "2", "--bits", "8", "--set",
                 "channel.criterion=lasso", "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    recorded = yaml.safe_load(capsys.readouterr().out.split("configuration (config.yaml of the run", 1)[1]
                              .split("\n", 2)[2])
    assert recorded["uniform"]["bits"] == 8 and recorded["channel"]["criterion"] == "lasso"


def test_the_pruned_model_is_the_int8_stage_baseline(chain_run):
    """The int8 file holds the pruned architecture: its weight tensors have the pruned widths."""
    report = json.loads((chain_run / "report.json").read_text())
    kept = {name: counts["after"] for name, counts in report["best"]["stages"][0]["channels"].items()}
    import tensorflow as tf

    model = tf.keras.models.load_model(report["best"]["model_path"], compile=False)
    assert count_macs(model) == report["best"]["macs"]
    widths = {layer.name: layer.filters for layer in model.layers if hasattr(layer, "filters")}
    assert all(widths[name] == count for name, count in kept.items() if name in widths)


def test_the_first_stage_chooses_by_its_own_share_of_the_fine_tuning():
    """channel's criterion 'auto' picks L1 from 3 epochs: in a chain it sees the epochs it gets, not the total."""
    from learners.base import LearnerContext
    from pocketflow.config import DataConfig, TargetConfig
    from pocketflow.distributed import SingleProcess
    from pocketflow.training import TrainSchedule

    chain = LEARNERS.get("channel+uniform")
    context = LearnerContext(dataset=load_dataset(DataConfig(name="digits"), seed=0),
                             schedule=TrainSchedule(1, 32, 0.01, "cosine", "sgd", 5e-4, False),
                             target=TargetConfig(speedup=2.0), distributed=SingleProcess(), finetune_epochs=3.5)
    learner = chain(chain.parse_options({}, "the test"), context)
    assert learner.first.context.finetune_epochs == pytest.approx(2.8)  # 3.5 less the last stage's 20%
    assert learner.first.criterion == "lasso"
    learner = chain(chain.parse_options({"last_stage_share": 0.0}, "the test"), context)
    assert learner.first.criterion == "l1"


def test_a_pareto_front_of_pruned_int8_models(tmp_path):
    """--objective pareto: every front model goes through both stages and ships its own int8 file (post-training
    int8 here, to keep the test short: QAT in a chain is tested above)."""
    import csv

    run_dir = tmp_path / "run"
    assert main(["--learner", "channel+uniform", "--objective", "pareto", "--trials", "4", "--finetune-epochs", "0.5",
                 "--set", "uniform.method=ptq",
                 "--set", "uniform.representative_samples=32", "--set", "uniform.compare_dynamic=false", "-q",
                 "--output-dir", str(run_dir)]) == 0
    rows = list(csv.DictReader(open(run_dir / "pareto.csv")))
    assert rows
    for row in rows:
        shipped = TFLiteModel(row["tflite_path"])
        assert shipped.interpreter.get_input_details()[0]["dtype"] == np.int8
        assert (Path(row["tflite_path"]).parent / "stage1_float.tflite").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["best"]["shipped_format"] == "int8 TFLite" and len(report["best"]["stages"]) == 2
