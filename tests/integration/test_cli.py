"""main.py end to end: help, user errors (exit 2, one line, no traceback), the full-prec job, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pocketflow.cli import FLAG_KEYS, main
from pocketflow.export import load_interpreter, runtime_name
from tests.conftest import ROOT, shared_file
from tests.loading import check_load_line
from tests.verify_run import assert_report_matches_files

pytestmark = pytest.mark.integration


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_explains_every_flag():
    result = run_main("--help")
    assert result.returncode == 0
    for flag in FLAG_KEYS:
        assert f"--{flag.replace('_', '-')}" in result.stdout
    for flag in ("--config", "--set", "--resume"):
        assert flag in result.stdout


def test_learner_help_lists_every_key_of_its_section(capsys):
    """`--learner NAME --help` shows every field of the learner's config class, with its default."""
    import dataclasses

    from learners import LEARNERS

    for name in LEARNERS.names():
        assert main(["--learner", name, "--help"]) == 0
        shown = capsys.readouterr().out
        learner = LEARNERS.get(name)
        if learner.sections and not dataclasses.fields(learner.Config):  # weight-sparse+uniform
            assert f"Options of --learner {name}: none of its own" in shown
            assert all(f"\n{stage}:" in shown for stage in learner.sections)
            continue
        assert f"Options of --learner {name}" in shown and f"\n{name}:" in shown
        section = shown.split(f"\n{name}:", 1)[1].splitlines()
        for field in dataclasses.fields(LEARNERS.get(name).Config):
            if field.init:
                assert any(line.startswith(f"  {field.name}:") for line in section), (name, field.name)
    assert main(["--learner", "chanel", "--help"]) == 2
    assert "unknown learner 'chanel'" in capsys.readouterr().err


DRY_RUN_TARGETS = {"channel": ["--target-speedup", "2"], "weight-sparse": ["--target-sparsity", "0.5"],
                   "uniform": ["--target-bits", "8"], "non-uniform": ["--target-bits", "4"],
                   "product-quant": ["--target-compression", "10"], "full-prec": [],
                   "channel+uniform": ["--target-speedup", "2"],
                   "channel+non-uniform": ["--target-speedup", "2", "--target-compression", "12"],
                   "channel+weight-sparse": ["--target-speedup", "2", "--target-sparsity", "0.75"],
                   "weight-sparse+uniform": ["--target-sparsity", "0.75"]}


def test_dry_run_prints_the_plan_and_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    """Every learner: what would run and the configuration it would record, every value resolved
    (the net's schedule filled in), then exit 0 with no run directory; bad input still fails."""
    import yaml

    from learners import LEARNERS

    assert set(DRY_RUN_TARGETS) == set(LEARNERS.names())
    for name, target in DRY_RUN_TARGETS.items():
        out = tmp_path / name
        assert main(["--learner", name, *target, "--dry-run", "--output-dir", str(out)]) == 0
        shown = capsys.readouterr().out
        plan, configuration = shown.split("configuration (config.yaml of the run", 1)
        assert f"learner:    {name} " in plan and "baseline:   digits_cnn on digits" in plan
        assert ("search:     up to 20 trials" in plan) == LEARNERS.get(name).searches
        recorded = yaml.safe_load(configuration.split("\n", 2)[2])
        assert recorded["learner"] == name and recorded["output_dir"] == str(out)
        assert all(recorded["train"][key] is not None for key in ("epochs", "batch_size", "learning_rate"))
        assert not out.exists()
    assert main(["--learner", "channel", "--target-speedup", "0.5", "--dry-run"]) == 2  # still validated
    assert "target.speedup" in capsys.readouterr().err


def test_a_search_without_a_target_says_so(tmp_path, capsys):
    assert main(["--learner", "channel", "--trials", "1", "--finetune-epochs", "0", "--export", "none",
                 "--output-dir", str(tmp_path / "run"), "-q"]) == 0
    warned = capsys.readouterr().err
    assert "no target given" in warned and "name one with --target-speedup" in warned


def test_user_error_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    result = run_main("--learner", "nope", "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: unknown learner 'nope'; choose one of: " + error_lines[0].split(": ", 2)[2]]
    assert "full-prec" in error_lines[0]


@pytest.mark.parametrize("args, message", [
    (["--net", "resnet1000"], "unknown net 'resnet1000'"),
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--dataset", "cifar10"], "needs its files: pass --data-dir"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--model", "/nonexistent/model.h5"], "model '/nonexistent/model.h5' does not exist"),
    (["--target-speedup", "0.5", "--learner", "channel"], "target.speedup = 0.5 is out of range"),
    (["--set", "train.epochz=3"], "unknown key 'train.epochz'"),
    (["--set", "nonsense"], "needs the form section.key=value"),
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["--target-speedup", "2"], "learner 'full-prec' cannot meet target speedup"),
])
def test_user_errors_exit_2_with_a_clear_line(tmp_path, capsys, args, message):
    code = main([*args, "--output-dir", str(tmp_path / "run"), "-q"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert message in captured.err
    assert len([line for line in captured.err.splitlines() if line.startswith("error:")]) == 1


def test_model_with_the_wrong_input_shape_is_refused(tmp_path, capsys):
    inputs = tf.keras.Input((28, 28, 1))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(inputs)))
    model.save(tmp_path / "m.keras")
    code = main(["--model", str(tmp_path / "m.keras"), "--epochs", "0", "--output-dir", str(tmp_path / "r"), "-q"])
    assert code == 2
    assert "takes inputs of shape (28, 28, 1) but the dataset's images are (8, 8, 1)" in capsys.readouterr().err


def test_corrupt_model_file_is_refused(tmp_path, capsys):
    (tmp_path / "broken.h5").write_bytes(b"not an hdf5 file at all")
    code = main(["--model", str(tmp_path / "broken.h5"), "--output-dir", str(tmp_path / "r"), "-q"])
    assert code == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_full_precision_default_job_trains_exports_and_reports(tmp_path):
    out = tmp_path / "run"
    result = run_main("--learner=full-prec", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("learner", "net", "dataset", "baseline", "best", "target", "trials"):
        assert key in report
    for key in ("accuracy", "macs", "params", "bytes", "tflite_latency_ms"):
        assert report["baseline"][key] is not None
    best = report["best"]
    for key in ("accuracy", "macs", "params", "bytes", "speedup", "compression", "model_path", "tflite_path",
                "tflite_accuracy", "tflite_latency_ms"):
        assert best[key] is not None, key
    assert report["learner"] == "full-prec" and report["net"] == "digits_cnn" and report["dataset"] == "digits"
    assert best["accuracy"] >= 0.95, "the default net must reach 95% on the held-out digits test split"
    assert abs(best["tflite_accuracy"] - best["accuracy"]) <= 0.01
    assert best["speedup"] == 1.0 and best["compression"] == 1.0
    assert report["trials"] == {"completed": 0, "failed": 0, "pruned": 0}
    assert (out / "report.md").read_text().startswith("# PocketFlow-TF2 run")
    model = tf.keras.models.load_model(best["model_path"], compile=False)
    assert model.count_params() == best["params"]
    check_load_line(best["model_path"], model, plain_tf_keras=True)
    assert_report_matches_files(out)
    assert Path(best["tflite_path"]).stat().st_size == best["bytes"]
    assert "learner: full-prec" in (out / "config.yaml").read_text()
    # The same directory again is refused rather than overwritten.
    again = run_main("--learner=full-prec", "--output-dir", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    # show / compare read the report back, without TensorFlow (a fresh process checks that).
    shown = subprocess.run([sys.executable, "-c", "import sys; from pocketflow.cli import main; code = main(sys.argv[1:]);"
                            " assert 'tensorflow' not in sys.modules; sys.exit(code)", "show", str(out)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "learner:  full-prec on digits_cnn (digits), target none; status completed" in shown.stdout
    assert f"ship:     {out / 'ship' / Path(best['tflite_path']).name}" in shown.stdout  # baseline.tflite here
    compared = run_main("compare", str(out), str(out))
    rows = compared.stdout.strip().splitlines()
    assert compared.returncode == 0 and len(rows) == 3 and rows[0].startswith("run ")
    assert f"{100 * best['tflite_accuracy']:.2f}%" in rows[1] and "+0.00" in rows[1]
    missing = run_main("show", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "holds no report.json" in missing.stderr and "Traceback" not in missing.stderr


def test_config_yaml_repeats_the_run(tmp_path, capsys):
    first = tmp_path / "a"
    assert main(["--epochs", "0", "--output-dir", str(first), "-q", "--seed", "5"]) == 0
    second = tmp_path / "b"
    assert main(["--config", str(first / "config.yaml"), "--output-dir", str(second), "-q"]) == 0
    a = json.loads((first / "report.json").read_text())
    b = json.loads((second / "report.json").read_text())
    assert a["baseline"]["accuracy"] == b["baseline"]["accuracy"]
    assert a["baseline"]["macs"] == b["baseline"]["macs"]
    # Every value that ran is written (the net's schedule filled in), and reading it back changes none.
    assert (first / "config.yaml").read_text().replace(str(first), str(second)) == (second / "config.yaml").read_text()
    assert "null" not in (first / "config.yaml").read_text().split("\ntrain:", 1)[1].split("\ntarget:", 1)[0]


def test_quantized_exports_are_measured(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["--epochs", "3", "--quantize-export", "int8", "--output-dir", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    exports = report["best"]["exports"]
    assert set(exports) == {"float", "int8"}
    assert exports["int8"]["input_dtype"] == "int8"
    assert exports["int8"]["bytes"] < exports["float"]["bytes"] / 2
    assert exports["int8"]["runtime"] == runtime_name()
    interpreter, _ = load_interpreter(exports["int8"]["path"])
    kinds = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert "int8" in kinds


def test_pretrained_resnet20_is_evaluated_as_published(tmp_path):
    model = shared_file("pretrained/resnet20_cifar10.h5")
    data = shared_file("cifar10")
    out = tmp_path / "r20"
    result = run_main("--learner=full-prec", "--model", str(model), "--dataset", "cifar10", "--data-dir", str(data),
                      "--epochs", "0", "--output-dir", str(out), "--set", "data.mean=[0.485,0.456,0.406]",
                      "--set", "data.std=[0.229,0.224,0.225]")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["accuracy"] == pytest.approx(0.9173, abs=0.0002)
    assert report["baseline"]["tflite_accuracy"] == pytest.approx(0.9173, abs=0.002)
    assert report["baseline"]["macs"] == pytest.approx(40.8e6, rel=0.02)


def test_a_live_run_holds_its_output_directory(tmp_path, capsys):
    from pocketflow.run_directory import lock_directory

    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.yaml").write_text("learner: full-prec\n")  # the live run's files (no trial finished yet)
    (out / "baseline.keras").write_bytes(b"weights")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(h, fcntl.LOCK_EX); h.write('host:4242'); h.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["--epochs", "0", "--output-dir", str(out), "-q", "--resume"])
        assert code == 2
        assert "is in use by a running job (host:4242)" in capsys.readouterr().err
        # the refused run removed nothing of the live one's, and did not write into its directory
        assert {p.name for p in out.iterdir()} == {".lock", "config.yaml", "baseline.keras"}
        code = main(["--epochs", "0", "--output-dir", str(out), "-q"])  # without --resume: refused as well
        assert code == 2 and {p.name for p in out.iterdir()} == {".lock", "config.yaml", "baseline.keras"}
    finally:
        holder.kill()
        holder.wait()
    handle = lock_directory(out)  # the dead holder's lock is gone
    handle.close()


def test_a_diverging_baseline_stops_with_a_clear_message(tmp_path, capsys):
    code = main(["--epochs", "2", "--learning-rate", "1e12", "--output-dir", str(tmp_path / "nan"), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: training diverged" in err and "lower the learning rate" in err and "Traceback" not in err
