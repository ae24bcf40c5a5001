"""The bad-input corpus: every mistake a user can make exits 2 with one line that names the problem
and the fix, shows no traceback, and leaves nothing behind that looks like a run or a result.

Most cases call ``pocketflow.cli.main`` in this process (TensorFlow is imported once); a few run
``main.py`` in a subprocess to check what a user actually sees on the terminal.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import tensorflow as tf

from pocketflow.cli import main
from pocketflow.data import cifar10
from tests.reliability.common import assert_no_run_left, expect_user_error, run_main

pytestmark = pytest.mark.reliability


# --------------------------------------------------------------------------- configuration files

YAML_CASES = {
    # name: (YAML text, fragments of the one error line)
    "malformed": ("learner: channel\ntarget: {speedup: 2\n", ["is not valid YAML at line", "fix the syntax"]),
    "tab-indented": ("train:\n\tepochs: 3\n", ["is not valid YAML"]),
    "not-a-mapping": ("- learner\n- channel\n", ["must hold a mapping of keys", "not a list"]),
    "duplicate-key": ("learner: channel\ntarget: {speedup: 2}\nlearner: full-prec\n",
                      ["the key 'learner' appears twice", "line 3"]),
    "unknown-top-key": ("lerner: channel\n", ["unknown key 'lerner'", "known keys:", "learner"]),
    "unknown-data-key": ("data: {nmae: digits}\n", ["unknown key 'data.nmae'", "known keys in 'data'"]),
    "unknown-train-key": ("train: {epoch: 3}\n", ["unknown key 'train.epoch'", "epochs"]),
    "unknown-target-key": ("target: {speed: 2}\n", ["unknown key 'target.speed'", "speedup"]),
    "unknown-hpo-key": ("hpo: {trails: 3}\n", ["unknown key 'hpo.trails'", "trials"]),
    "unknown-export-key": ("export: {tflit: true}\n", ["unknown key 'export.tflit'", "tflite"]),
    "unknown-learner-key": ("learner: channel\ntarget: {speedup: 2}\nchannel: {ratio: 0.5}\n",
                            ["unknown key 'channel.ratio'", "known keys in 'channel'"]),
    "unknown-key-other-learner": ("weight-sparse: {sparsty: 0.5}\n", ["unknown key 'weight-sparse.sparsty'"]),
    "section-is-a-value": ("data: 5\n", ["'data'", "must be a section"]),
    "learner-section-is-a-value": ("channel: fast\n", ["'channel'", "must be a section"]),
    "wrong-type-number": ("train: {epochs: three}\n", ["train.epochs = 'three'", "must be a number"]),
    "wrong-type-whole": ("hpo: {trials: 2.5}\n", ["hpo.trials = 2.5", "must be a whole number"]),
    "wrong-type-bool": ("export: {tflite: maybe}\n", ["export.tflite = 'maybe'", "must be true or false"]),
    "wrong-type-list": ("data: {mean: 0.5}\n", ["data.mean = 0.5", "must be a list"]),
    "wrong-type-seed": ("seed: abc\n", ["seed = 'abc'", "whole number"]),
    "wrong-type-learner-option": ("learner: channel\ntarget: {speedup: 2}\nchannel: {min_ratio: half}\n",
                                  ["channel.min_ratio = 'half'", "must be a number"]),
    "unknown-learner": ("learner: prune-everything\n", ["unknown learner 'prune-everything'", "choose one of"]),
    "unknown-net": ("net: resnet7\n", ["unknown net 'resnet7'"]),
    "unknown-sampler": ("learner: channel\ntarget: {speedup: 2}\nhpo: {sampler: annealing}\n",
                        ["hpo.sampler = 'annealing'", "choose one of", "tpe"]),
    "unknown-criterion": ("learner: channel\ntarget: {speedup: 2}\nchannel: {criterion: magic}\n",
                          ["channel.criterion = 'magic'", "choose one of", "lasso"]),
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_bad_config_files(tmp_path, capsys, name):
    text, fragments = YAML_CASES[name]
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    line = expect_user_error(capsys, ["--config", str(config), "--output-dir", str(out)], *fragments)
    if name not in ("malformed", "tab-indented", "not-a-mapping", "duplicate-key"):
        assert str(config) in line or "unknown learner" in line or "unknown net" in line or "'channel" in line
    assert not out.exists()


def test_a_config_that_is_not_text_or_not_a_file(tmp_path, capsys):
    binary = tmp_path / "model.h5"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    expect_user_error(capsys, ["--config", str(binary), "--output-dir", str(tmp_path / "r")],
                      f"config file '{binary}' cannot be read (not UTF-8 text)", "YAML text file")
    expect_user_error(capsys, ["--config", str(tmp_path), "--output-dir", str(tmp_path / "r")],
                      f"config file '{tmp_path}' is a directory")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- flags and --set

FLAG_CASES = {
    # out-of-range targets, bits and sparsities
    "speedup-one": (["--learner", "channel", "--target-speedup", "1"], ["target.speedup = 1.0 is out of range"]),
    "latency-speedup-one": (["--learner", "channel", "--target-latency-speedup", "0.9"],
                            ["target.latency_speedup = 0.9 is out of range", "half the baseline's time"]),
    "latency-ms-zero": (["--learner", "channel", "--target-latency-ms", "0"],
                        ["target.latency_ms = 0.0 is out of range", "milliseconds"]),
    "latency-target-for-wrong-learner": (["--learner", "uniform", "--target-latency-speedup", "2"],
                                         ["cannot meet target latency_speedup", "it accepts --target-bits"]),
    "compression-below-one": (["--learner", "weight-sparse", "--target-compression", "0.5"],
                              ["target.compression = 0.5 is out of range"]),
    "sparsity-above-one": (["--learner", "weight-sparse", "--target-sparsity", "1.2"],
                           ["target.sparsity = 1.2 is out of range", "(0, 1)"]),
    "sparsity-zero": (["--learner", "weight-sparse", "--target-sparsity", "0"], ["target.sparsity = 0.0"]),
    "bits-zero": (["--learner", "uniform", "--target-bits", "0"], ["target.bits = 0.0 is out of range"]),
    "bits-flag": (["--learner", "weight-sparse", "--target-sparsity", "0.5", "--bits", "3"],
                  ["bits = 3"]),
    "removed-uniform-threads": (["--learner", "uniform", "--target-bits", "8", "--set", "uniform.threads=2"],
                                ["'uniform.threads'", "no longer an option", "export.threads"]),
    "pattern-for-wrong-learner": (["--learner", "channel", "--target-speedup", "2", "--sparsity-pattern", "2:4"],
                                  ["--sparsity-pattern", "learner 'channel' has no 'pattern'", "weight-sparse"]),
    "sparse-bits-set": (["--learner", "weight-sparse", "--target-sparsity", "0.5", "--set", "weight-sparse.bits=3"],
                        ["weight-sparse.bits = 3 is out of range"]),
    "target-for-wrong-learner": (["--learner", "channel", "--target-sparsity", "0.5"],
                                 ["learner 'channel' cannot meet target sparsity", "--target-speedup"]),
    "trials-zero": (["--learner", "channel", "--target-speedup", "2", "--trials", "0"], ["hpo.trials = 0"]),
    "negative-timeout": (["--learner", "channel", "--target-speedup", "2", "--timeout", "-5"], ["hpo.timeout = -5.0"]),
    "validation-split": (["--validation-split", "0.95"], ["data.validation_split = 0.95 is out of range"]),
    "batch-size-zero": (["--batch-size", "0"], ["train.batch_size = 0 is out of range"]),
    "negative-learning-rate": (["--learning-rate", "-0.1"], ["train.learning_rate = -0.1 is out of range"]),
    "negative-epochs": (["--epochs", "-1"], ["train.epochs = -1.0 is out of range"]),
    "zero-std": (["--set", "data.std=[0, 1, 1]"], ["data.std", "every entry must be > 0"]),
    # Another learner's settings are not silently ignored (a whole template at its defaults is fine).
    "other-learners-setting": (["--learner", "uniform", "--set", "channel.criterion=l1"],
                               ["channel.criterion would be ignored", "--learner uniform reads only the 'uniform'"]),
    "channel-min-ratio": (["--learner", "channel", "--target-speedup", "2", "--set", "channel.min_ratio=0"],
                          ["channel.min_ratio = 0"]),
    # wrong types and malformed flags
    "epochs-not-a-number": (["--epochs", "abc"], ["argument --epochs: invalid float value: 'abc'"]),
    "trials-not-whole": (["--trials", "2.5"], ["argument --trials: invalid int value: '2.5'"]),
    "unknown-flag": (["--target-sped", "2"], ["unrecognized arguments: --target-sped 2",
                                             "did you mean: --target-sped -> --target-speedup?"]),
    # No abbreviations: a prefix of a flag is not that flag (it would change what a typo means).
    "abbreviated-flag": (["--target-speed=2.5"], ["unrecognized arguments: --target-speed=2.5",
                                                  "did you mean: --target-speed -> --target-speedup?"]),
    "set-wrong-type": (["--set", "export.threads=many"], ["export.threads = 'many'", "whole number"]),
    "set-into-a-value": (["--set", "seed=3", "--set", "seed.value=3"], ["cannot set 'seed.value'",
                                                                      "not a section"]),
    "set-a-section-to-a-value": (["--set", "seed.value=3"], ["seed = {'value': 3}", "whole number"]),
    "set-bad-yaml": (["--set", "data.mean=[0.5,"], ["not valid YAML", "quote it"]),
    # unknown names
    "unknown-sampler-flag": (["--learner", "channel", "--target-speedup", "2", "--sampler", "annealing"],
                             ["argument --sampler: invalid choice: 'annealing'", "tpe"]),
    "unknown-export-flag": (["--export", "onnx"], ["argument --export: invalid choice: 'onnx'"]),
    "unknown-learner-flag": (["--learner", "quantum"], ["unknown learner 'quantum'", "full-prec"]),
    "unknown-dataset-via-set": (["--set", "data.name=imagenet22k"], ["unknown dataset 'imagenet22k'"]),
    "dataset-without-net": (["--dataset", "npz", "--data-dir", "/tmp"], ["dataset 'npz' has no default net",
                                                                          "--net"]),
    # storage
    "unreachable-storage": (["--learner", "channel", "--target-speedup", "2", "--storage",
                             "postgresql://nobody@127.0.0.1:1/none"], ["cannot open the study storage",
                                                                       "127.0.0.1:1", "check --storage"]),
    "malformed-storage": (["--learner", "channel", "--target-speedup", "2", "--storage", "not a url"],
                          ["cannot open the study storage 'not a url'", "check --storage"]),
    "storage-in-missing-folder": (["--learner", "channel", "--target-speedup", "2", "--storage",
                                   "sqlite:////nonexistent-folder/study.db"], ["cannot open the study storage"]),
}


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_bad_flags_and_values(tmp_path, capsys, name):
    args, fragments = FLAG_CASES[name]
    out = tmp_path / "run"
    expect_user_error(capsys, [*args, "--output-dir", str(out)], *fragments)
    assert not out.exists()


# --------------------------------------------------------------------------- model files


def _tiny_model(input_shape=(8, 8, 1), classes=10) -> tf.keras.Model:
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(classes)(x))


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_h5(tmp: Path) -> Path:
    path = tmp / "model.h5"
    _tiny_model().save(path)
    return _truncated(path)


def _truncated_keras(tmp: Path) -> Path:
    path = tmp / "model.keras"
    _tiny_model().save(path)
    return _truncated(path)


def _keras_zip_without_config(tmp: Path) -> Path:
    import zipfile

    path = tmp / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
    return path


def _empty_keras(tmp: Path) -> Path:
    path = tmp / "empty.keras"
    path.write_bytes(b"")
    return path


def _corrupt_saved_model(tmp: Path) -> Path:
    path = tmp / "saved"
    path.mkdir()
    (path / "saved_model.pb").write_bytes(os.urandom(300))
    (path / "variables").mkdir()
    return path


def _directory_without_saved_model(tmp: Path) -> Path:
    path = tmp / "not_a_model"
    path.mkdir()
    (path / "weights.bin").write_bytes(b"\0" * 16)
    return path


def _wrong_class_count(tmp: Path) -> Path:
    path = tmp / "three_classes.keras"
    _tiny_model(classes=3).save(path)
    return path


def _wrong_input_rank(tmp: Path) -> Path:
    inputs = tf.keras.Input((64,))
    path = tmp / "flat.keras"
    tf.keras.Model(inputs, tf.keras.layers.Dense(10)(inputs)).save(path)
    return path


def _save(tmp: Path, name: str, inputs, outputs) -> Path:
    path = tmp / name
    tf.keras.Model(inputs, outputs).save(path)
    return path


def _two_inputs(tmp: Path) -> Path:
    first, second = tf.keras.Input((8, 8, 1)), tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Add()([first, second]))
    return _save(tmp, "two_inputs.keras", [first, second], tf.keras.layers.Dense(10)(x))


def _two_outputs(tmp: Path) -> Path:
    inputs = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    return _save(tmp, "two_outputs.keras", inputs, [tf.keras.layers.Dense(10)(x), tf.keras.layers.Dense(1)(x)])


def _segmentation_output(tmp: Path) -> Path:
    inputs = tf.keras.Input((8, 8, 1))
    return _save(tmp, "segmenter.keras", inputs, tf.keras.layers.Conv2D(10, 1)(inputs))


def _integer_input(tmp: Path) -> Path:
    inputs = tf.keras.Input((8, 8, 1), dtype="int32")
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Rescaling(1 / 255)(inputs))
    return _save(tmp, "int_input.keras", inputs, tf.keras.layers.Dense(10)(x))


def _lambda_layer(tmp: Path, suffix: str) -> Path:
    inputs = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    return _save(tmp, f"lambda{suffix}", inputs, tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(x)))


MODEL_CASES = {
    "two-inputs": (_two_inputs, ["has 2 inputs", "one image input"]),
    "two-outputs": (_two_outputs, ["has 2 outputs", "one output of class scores"]),
    "output-not-class-scores": (_segmentation_output, ["outputs shape (None, 8, 8, 10)", "not class scores"]),
    "integer-input": (_integer_input, ["takes int32 inputs", "float32 input"]),
    "lambda-layer-h5": (lambda tmp: _lambda_layer(tmp, ".h5"), ["holds a Lambda layer with Python code",
                                                                "--trust-model"]),
    "lambda-layer-keras": (lambda tmp: _lambda_layer(tmp, ".keras"), ["holds a Lambda layer", "--trust-model"]),
    "truncated-h5": (_truncated_h5, ["could not be loaded", "saved with model.save()"]),
    "truncated-keras": (_truncated_keras, ["could not be loaded"]),
    "keras-zip-without-config": (_keras_zip_without_config, ["could not be loaded"]),
    "empty-keras": (_empty_keras, ["could not be loaded"]),
    "corrupt-saved-model": (_corrupt_saved_model, ["could not be loaded"]),
    "directory-without-saved-model": (_directory_without_saved_model, ["without saved_model.pb"]),
    "wrong-class-count": (_wrong_class_count, ["predicts 3 classes but the dataset has 10", "--dataset"]),
    "wrong-input-rank": (_wrong_input_rank, ["takes inputs of shape (64,)", "(8, 8, 1)"]),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_bad_model_files(tmp_path, capsys, name):
    make, fragments = MODEL_CASES[name]
    model = make(tmp_path)
    capsys.readouterr()  # what saving the test's own files printed
    out = tmp_path / "run"
    line = expect_user_error(capsys, ["--model", str(model), "--epochs", "0", "--output-dir", str(out)], *fragments)
    assert str(model) in line
    assert_no_run_left(out)


def test_a_trusted_lambda_model_loads(tmp_path, capsys):
    """--trust-model lets a Lambda layer's code run: the same file as above then evaluates."""
    path = _lambda_layer(tmp_path, ".h5")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["--model", str(path), "--trust-model", "--epochs", "0", "--export", "none", "--output-dir", str(out),
                 "-q"]) == 0


def test_bare_saved_model_is_not_a_keras_model(tmp_path, capsys):
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "bare"))
    capsys.readouterr()
    out = tmp_path / "run"
    expect_user_error(capsys, ["--model", str(tmp_path / "bare"), "--epochs", "0", "--output-dir", str(out)],
                      "not a Keras model", "model.save()")
    assert_no_run_left(out)


# --------------------------------------------------------------------------- dataset files

RECORDS = 6  # records per synthetic CIFAR-10 batch (the loader's constant is patched to match)


def _cifar_folder(root: Path, damage: Callable[[Path], None]) -> Path:
    folder = root / cifar10.BINARY_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in cifar10.BATCHES:
        records = rng.integers(0, 256, (RECORDS, cifar10.RECORD_BYTES), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    damage(folder)
    return root


def _truncate_batch(folder: Path) -> None:
    victim = folder / "data_batch_2.bin"
    victim.write_bytes(victim.read_bytes()[:-77])


def _bad_label(folder: Path) -> None:
    victim = folder / "test_batch.bin"
    data = bytearray(victim.read_bytes())
    data[0] = 200
    victim.write_bytes(bytes(data))


def _missing_batch(folder: Path) -> None:
    (folder / "data_batch_5.bin").unlink()


def _cifar_truncated_tarball(root: Path) -> Path:
    root.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in cifar10.BATCHES:
            data = os.urandom(cifar10.RECORD_BYTES * RECORDS)
            info = tarfile.TarInfo(f"{cifar10.BINARY_DIR}/{name}.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    payload = buffer.getvalue()
    (root / cifar10.BINARY_TAR).write_bytes(payload[: len(payload) // 2])
    return root


def _idx(magic: int, shape: tuple, payload: bytes) -> bytes:
    return np.array([magic, *shape], ">u4").tobytes() + payload


def _mnist_folder(root: Path, wrong_magic: bool = False, truncated_gzip: bool = False) -> Path:
    root.mkdir(parents=True)
    images = _idx(2049 if wrong_magic else 2051, (5, 28, 28), bytes(5 * 28 * 28))
    labels = _idx(2049, (5,), bytes(5))
    files = {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
             "t10k-images-idx3-ubyte": _idx(2051, (5, 28, 28), bytes(5 * 28 * 28)),
             "t10k-labels-idx1-ubyte": labels}
    for stem, data in files.items():
        packed = gzip.compress(data)
        if truncated_gzip and stem == "t10k-images-idx3-ubyte":
            packed = packed[: len(packed) // 2]
        (root / f"{stem}.gz").write_bytes(packed)
    return root


def _corrupt_npz(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "data.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    return root / "data.npz"


def _npz_missing_arrays(root: Path) -> Path:
    root.mkdir(parents=True)
    np.savez(root / "data.npz", x_train=np.zeros((4, 8, 8)), y_train=np.zeros(4))
    return root / "data.npz"


def _npz(root: Path, **damage) -> Path:
    """A valid digits-shaped .npz (8x8 images, 10 classes) with some arrays replaced."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.uniform(0, 255, (40, 8, 8)), "y_train": np.arange(40) % 10,
              "x_test": rng.uniform(0, 255, (20, 8, 8)), "y_test": np.arange(20) % 10}
    for key, change in damage.items():
        arrays[key] = change(arrays[key].copy())
    np.savez(root / "data.npz", **arrays)
    return root / "data.npz"


def _with(values, positions):
    def change(array):
        array.reshape(-1)[list(positions)] = values
        return array
    return change


DATA_CASES = {
    "npz-nan-images": ("npz", lambda root: _npz(root, x_train=_with(np.nan, (0, 1, 70))), ["--net", "digits_cnn"],
                       ["data.npz", "x_train holds 3 NaN or infinite value(s) in 2 image(s)"]),
    "npz-infinite-test-images": ("npz", lambda root: _npz(root, x_test=_with(np.inf, (5,))), ["--net", "digits_cnn"],
                                 ["data.npz", "x_test holds 1 NaN or infinite value(s) in 1 image(s)"]),
    "npz-fractional-labels": ("npz", lambda root: _npz(root, y_train=lambda y: y + np.where(np.arange(40) < 4, 0.5, 0)),
                              ["--net", "digits_cnn"], ["data.npz", "y_train holds 4 label(s) that are not class"]),
    "npz-nan-labels": ("npz", lambda root: _npz(root, y_test=lambda y: np.where(np.arange(20) < 2, np.nan, y)),
                       ["--net", "digits_cnn"], ["data.npz", "y_test holds 2 label(s)"]),
    "npz-negative-labels": ("npz", lambda root: _npz(root, y_test=lambda y: y - 1), ["--net", "digits_cnn"],
                            ["data.npz", "y_test holds 2 label(s)", "(the first: -1)"]),
    "cifar10-truncated-batch": ("cifar10", lambda root: _cifar_folder(root, _truncate_batch), [],
                                ["data_batch_2.bin", "truncated or corrupt", "download CIFAR-10 again"]),
    "cifar10-bad-label": ("cifar10", lambda root: _cifar_folder(root, _bad_label), [],
                          ["test_batch.bin", "labels range"]),
    "cifar10-missing-batch": ("cifar10", lambda root: _cifar_folder(root, _missing_batch), [],
                              ["lacks data_batch_5.bin", "extract the full archive again"]),
    "cifar10-truncated-tarball": ("cifar10", _cifar_truncated_tarball, [],
                                  ["cifar-10-binary.tar.gz", "truncated or corrupt"]),
    "mnist-wrong-magic": ("mnist", lambda root: _mnist_folder(root, wrong_magic=True), [],
                          ["train-images-idx3-ubyte.gz", "magic number 2049", "2051"]),
    "mnist-truncated-gzip": ("mnist", lambda root: _mnist_folder(root, truncated_gzip=True), [],
                             ["t10k-images-idx3-ubyte.gz", "truncated or corrupt", "download it again"]),
    "npz-corrupt": ("npz", _corrupt_npz, ["--net", "digits_cnn"], ["data.npz", "cannot read"]),
    "npz-missing-arrays": ("npz", _npz_missing_arrays, ["--net", "digits_cnn"], ["lacks x_test, y_test"]),
    "data-dir-missing": ("mnist", lambda root: root / "nowhere", [], ["does not exist", "--data-dir"]),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_corrupt_dataset_files(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", RECORDS)
    dataset, make, extra, fragments = DATA_CASES[name]
    data_dir = make(tmp_path / "data")
    out = tmp_path / "run"
    expect_user_error(capsys, ["--dataset", dataset, "--data-dir", str(data_dir), *extra, "--epochs", "0",
                               "--output-dir", str(out)], *fragments)
    assert_no_run_left(out)
    # The corrected command is not refused: the failed start left no run in the directory.
    assert not (out / "config.yaml").exists()


def test_labels_beyond_the_models_classes_are_counted(tmp_path, capsys):
    """A user's 10-class model and data whose labels reach 12: refused, with how many labels do not fit."""
    data = _npz(tmp_path / "data", y_train=lambda y: np.where(np.arange(40) < 3, 12, y))
    model = tmp_path / "ten.keras"
    _tiny_model().save(model)
    capsys.readouterr()
    out = tmp_path / "run"
    expect_user_error(capsys, ["--dataset", "npz", "--data-dir", str(data), "--model", str(model), "--epochs", "0",
                               "--output-dir", str(out)],
                      "predicts 10 classes but the dataset has 13", "(3 of its labels are 10 or more)")
    assert_no_run_left(out)


# --------------------------------------------------------------------------- output directory


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("mine")
    expect_user_error(capsys, ["--output-dir", str(target)], "is a file", "directory")
    assert target.read_text() == "mine"


def test_output_dir_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    expect_user_error(capsys, ["--output-dir", str(tmp_path / "file" / "run")], "cannot write to --output-dir",
                      "writable directory")


def test_read_only_output_dir(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system instead
        target = Path("/sys/pocketflow-test-run")
        if os.access("/sys", os.W_OK) and Path("/sys").stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no read-only location for root on this machine")
    else:
        target = tmp_path / "locked"
        target.mkdir()
        target.chmod(0o555)
    try:
        expect_user_error(capsys, ["--output-dir", str(target)], "cannot write to --output-dir", str(target),
                          "writable directory")
    finally:
        if target.is_relative_to(tmp_path):
            target.chmod(0o755)
    assert not (target / "config.yaml").exists()


def test_a_directory_holding_someone_elses_files_keeps_them_after_a_failed_start(tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    expect_user_error(capsys, ["--model", str(tmp_path / "absent.keras"), "--output-dir", str(out)],
                      "does not exist")
    assert (out / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- a diverging baseline


def test_a_diverging_baseline_leaves_no_run_so_the_fixed_command_runs_there(tmp_path, capsys):
    out = tmp_path / "nan"
    out.mkdir()  # an empty directory is a fine place for a run
    expect_user_error(capsys, ["--epochs", "1", "--learning-rate", "1e12", "--export", "none",
                               "--output-dir", str(out)],
                      "training diverged", "baseline", "lower the learning rate")
    assert_no_run_left(out)
    assert main(["--epochs", "0", "--export", "none", "--output-dir", str(out), "-q"]) == 0
    assert (out / "report.json").is_file() and (out / "config.yaml").is_file()


# --------------------------------------------------------------------------- what a user sees


def test_a_terminal_sees_one_line_for_a_config_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learner: channel\ntarget: {speedup: 2}\nhpo: {trials: many}\n")
    result = run_main("--config", str(config), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: hpo.trials = 'many' in '{config}' must be a whole number"], result.stderr
    assert result.stdout == ""


def test_a_terminal_sees_one_line_for_a_corrupt_model(tmp_path):
    model = tmp_path / "m.h5"
    model.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    result = run_main("--model", str(model), "--output-dir", str(tmp_path / "r"), "-q")
    assert result.returncode == 2
    lines: List[str] = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model '{model}' could not be loaded"), result.stderr
    assert_no_run_left(tmp_path / "r")
