"""Dataset loaders: every on-disk layout round-trips, damaged or missing files give one-line
DataErrors that name the file, validation is disjoint from training, test never moves with the seed."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import tensorflow as tf

from pocketflow.config import DataConfig
from pocketflow.data import DATASETS, cifar10, imagenet
from pocketflow.errors import DataError
from tests.conftest import shared_file

CIFAR_RECORDS = 20  # records per synthetic batch (the real files hold 10,000)


def _load(name: str, directory, seed: int = 0, **options):
    config = DataConfig(name=name, dir=None if directory is None else str(directory), **options)
    return DATASETS.get(name).load(config, seed)


def _assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_registry_entries():
    expected = {"cifar10": "resnet20", "mnist": "lenet", "fashion-mnist": "lenet", "npz": None,
                "imagenet": "mobilenet_v1"}
    for name, net in expected.items():
        spec = DATASETS.get(name)
        assert spec.default_net == net and spec.needs_dir and spec.description


# ---------------------------------------------------------------------------------------- CIFAR-10
def _cifar_images(rng: np.random.Generator, batch_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """HWC uint8 images whose pixel (0, 0, red) holds a unique id, and labels 0..9."""
    images = rng.integers(0, 256, size=(CIFAR_RECORDS, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(CIFAR_RECORDS) + batch_index * CIFAR_RECORDS
    labels = rng.integers(0, 10, size=CIFAR_RECORDS).astype(np.uint8)
    return images, labels


def _binary_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R, G, B planes per record
    return np.concatenate([labels[:, None], planes], axis=1).astype(np.uint8).tobytes()


def _pickle_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    batch = {b"batch_label": b"synthetic", b"labels": [int(v) for v in labels],
             b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"filenames": []}
    return pickle.dumps(batch, protocol=2)


def _write_cifar(root: Path, layout: str, rng) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Write synthetic batches in one official layout; return the HWC arrays written."""
    batches = {name: _cifar_images(rng, index) for index, name in enumerate(cifar10.BATCHES)}
    binary = layout in ("bin", "bin-direct", "bin-tar")
    members = {(f"{name}.bin" if binary else name): (_binary_bytes if binary else _pickle_bytes)(*arrays)
               for name, arrays in batches.items()}
    folder_name = cifar10.BINARY_DIR if binary else cifar10.PYTHON_DIR
    if layout.endswith("tar"):
        tar_name = cifar10.BINARY_TAR if binary else cifar10.PYTHON_TAR
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / tar_name, "w:gz") as archive:
            for member, data in members.items():
                info = tarfile.TarInfo(f"{folder_name}/{member}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    else:
        folder = root / folder_name
        folder.mkdir(parents=True)
        for member, data in members.items():
            (folder / member).write_bytes(data)
    return batches


@pytest.mark.parametrize("layout", ["bin", "bin-direct", "py", "bin-tar", "py-tar"])
def test_cifar10_layouts_round_trip(tmp_path, monkeypatch, rng, layout):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", CIFAR_RECORDS)
    written = _write_cifar(tmp_path, layout, rng)
    directory = tmp_path / cifar10.BINARY_DIR if layout == "bin-direct" else tmp_path
    data = _load("cifar10", directory, validation_split=0.2, scale=1.0)
    assert (data.num_train, data.num_validation, data.num_test) == (80, 20, CIFAR_RECORDS)
    assert data.input_shape == (32, 32, 3) and data.num_classes == 10

    x_test, y_test = data.test_arrays()
    np.testing.assert_array_equal(x_test, written["test_batch"][0].astype(np.float32))
    np.testing.assert_array_equal(y_test, written["test_batch"][1])
    assert y_test.dtype == np.int64

    # every training image comes back exactly once, with its label, in train or validation
    originals = {int(image[0, 0, 0]): (image, int(label)) for name in cifar10.TRAIN_BATCHES
                 for image, label in zip(*written[name])}
    x_val, y_val = data.validation_arrays()  # scale=1.0: the raw pixels as float32
    x_train, y_train = (np.concatenate(parts) for parts in zip(*(
        (x.numpy(), y.numpy()) for x, y in data.train(32, shuffle=False))))
    seen = []
    for images, labels in ((x_train, y_train), (x_val, y_val)):
        for image, label in zip(images, labels):
            identity = int(image[0, 0, 0])
            np.testing.assert_array_equal(image, originals[identity][0])
            assert label == originals[identity][1]
            seen.append(identity)
    assert sorted(seen) == sorted(originals)


def test_cifar10_truncated_batch(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", CIFAR_RECORDS)
    _write_cifar(tmp_path, "bin", rng)
    victim = tmp_path / cifar10.BINARY_DIR / "data_batch_3.bin"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*truncated or corrupt.*download") as error:
        _load("cifar10", tmp_path)
    _assert_one_line(error)
    # a whole number of records, but not the 10,000 (here 20) a batch holds, is also damage
    victim.write_bytes(victim.read_bytes()[: cifar10.RECORD_BYTES * (CIFAR_RECORDS - 1)])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*truncated or corrupt"):
        _load("cifar10", tmp_path)


def test_cifar10_truncated_tarball_and_missing_batch(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", CIFAR_RECORDS)
    _write_cifar(tmp_path / "tar", "bin-tar", rng)
    tarball = tmp_path / "tar" / cifar10.BINARY_TAR
    tarball.write_bytes(tarball.read_bytes()[:-400])
    with pytest.raises(DataError, match=r"cifar-10-binary\.tar\.gz.*(truncated|corrupt)") as error:
        _load("cifar10", tmp_path / "tar")
    _assert_one_line(error)

    _write_cifar(tmp_path / "folder", "py", rng)
    (tmp_path / "folder" / cifar10.PYTHON_DIR / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        _load("cifar10", tmp_path / "folder")


def test_cifar10_pickle_refuses_code(tmp_path, monkeypatch):
    """The python layout is pickled: only arrays, dicts, lists and bytes are unpickled, never callables."""
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", CIFAR_RECORDS)
    folder = tmp_path / cifar10.PYTHON_DIR
    folder.mkdir()
    for name in cifar10.BATCHES:
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros(3), "call": print}))
    with pytest.raises(DataError, match=r"data_batch_1.*cannot unpickle"):
        _load("cifar10", tmp_path)
    with pytest.raises(DataError, match="is a file but not a CIFAR-10 tarball"):
        _load("cifar10", folder / "test_batch")


def test_cifar10_real_tarball():
    tarball = shared_file("cifar10/cifar-10-binary.tar.gz")
    data = _load("cifar10", tarball.parent, seed=0, validation_split=0.1)
    assert (data.num_train, data.num_validation, data.num_test) == (45000, 5000, 10000)
    assert data.input_shape == (32, 32, 3) and data.num_classes == 10
    x_test, y_test = data.test_arrays(limit=500)
    assert x_test.shape == (500, 32, 32, 3) and x_test.dtype == np.float32
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0 and x_test.std() > 0.1
    _, y_test = data.test_arrays()
    assert y_test.dtype == np.int64 and np.array_equal(np.bincount(y_test, minlength=10), np.full(10, 1000))
    _, y_val = data.validation_arrays()
    assert len(y_val) == 5000 and y_val.min() == 0 and y_val.max() == 9
    images, labels = next(iter(data.train(256, augment=True)))
    assert images.shape == (256, 32, 32, 3) and 0 <= labels.numpy().min() and labels.numpy().max() <= 9
    # the tarball named directly, with another seed: the same test split, another validation split
    again = _load("cifar10", tarball, seed=1, validation_split=0.1)
    np.testing.assert_array_equal(again.test_arrays()[1], y_test)
    assert not np.array_equal(again.validation_arrays()[1], y_val)


# ---------------------------------------------------------------------------------------- MNIST
def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_idx(folder: Path, rng, *, gz: bool = True, n_train: int = 50, n_test: int = 12):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train)),
              "t10k": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test))}
    for prefix, (images, labels) in arrays.items():
        for stem, data in ((f"{prefix}-images-idx3-ubyte", _idx_images(images)),
                           (f"{prefix}-labels-idx1-ubyte", _idx_labels(labels))):
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("name,gz", [("mnist", True), ("fashion-mnist", False)])
def test_idx_round_trip(tmp_path, rng, name, gz):
    written = _write_idx(tmp_path, rng, gz=gz)
    data = _load(name, tmp_path, validation_split=0.2, scale=1.0)
    assert (data.num_train, data.num_validation, data.num_test) == (40, 10, 12)
    assert data.input_shape == (28, 28, 1) and data.num_classes == 10 and data.name == name
    x_test, y_test = data.test_arrays()
    np.testing.assert_array_equal(x_test[..., 0], written["t10k"][0])
    np.testing.assert_array_equal(y_test, written["t10k"][1])
    train_images = np.concatenate([x.numpy() for x, _ in data.train(16, shuffle=False)]
                                  + [data.validation_arrays()[0]])[..., 0].astype(np.uint8)
    assert sorted(map(bytes, train_images)) == sorted(map(bytes, written["train"][0]))
    images, labels = next(iter(data.train(8, augment=False)))
    assert images.dtype == tf.float32 and labels.dtype == tf.int64 and images.shape == (8, 28, 28, 1)


def test_idx_wrong_magic_and_truncation(tmp_path, rng):
    _write_idx(tmp_path, rng)
    images_file = tmp_path / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(gzip.compress(_idx_images(np.zeros((5, 28, 28), np.uint8), magic=2049)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*magic number 2049.*2051") as error:
        _load("mnist", tmp_path)
    _assert_one_line(error)

    _write_idx(tmp_path, rng)
    labels_file = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels_file.write_bytes(gzip.compress(_idx_labels(np.zeros(12, np.uint8))[:-3]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated"):
        _load("mnist", tmp_path)

    labels_file.write_bytes(gzip.compress(_idx_labels(np.zeros(12, np.uint8)))[:-6])  # a cut gzip stream
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated or corrupt"):
        _load("mnist", tmp_path)

    labels_file.write_bytes(gzip.compress(_idx_labels(np.zeros(7, np.uint8))))  # 12 images, 7 labels
    with pytest.raises(DataError, match="12 images but .* 7 labels"):
        _load("mnist", tmp_path)

    labels_file.unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte \(gzipped or not\)"):
        _load("mnist", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_real_files(name):
    folder = shared_file(f"{name}/train-images-idx3-ubyte.gz").parent
    data = _load(name, folder, validation_split=0.1)
    assert (data.num_train, data.num_validation, data.num_test) == (54000, 6000, 10000)
    assert data.input_shape == (28, 28, 1)
    assert set(np.unique(data.test_arrays()[1])) == set(range(10))


# ---------------------------------------------------------------------------------------- npz
@pytest.mark.parametrize("label_form", ["index", "column", "one-hot"])
def test_npz_round_trip(tmp_path, rng, label_form):
    x_train = rng.integers(0, 256, (30, 12, 10), dtype=np.uint8)  # grey (N, H, W)
    x_test = rng.integers(0, 256, (8, 12, 10), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 4, 30), rng.integers(0, 4, 8)
    y_train[0] = 3

    def encode(labels):
        if label_form == "column":
            return labels[:, None]
        if label_form == "one-hot":
            return np.eye(6, dtype=np.float32)[labels]  # 6 classes, two never used
        return labels

    np.savez(tmp_path / "mine.npz", x_train=x_train, y_train=encode(y_train), x_test=x_test, y_test=encode(y_test))
    data = _load("npz", tmp_path, validation_split=0.2, scale=1.0)  # the folder's only .npz
    assert (data.num_train, data.num_validation, data.num_test) == (24, 6, 8)
    assert data.input_shape == (12, 10, 1)
    assert data.num_classes == (6 if label_form == "one-hot" else 4)
    x, y = data.test_arrays()
    np.testing.assert_array_equal(x[..., 0], x_test)
    np.testing.assert_array_equal(y, y_test)
    assert y.dtype == np.int64
    direct = _load("npz", tmp_path / "mine.npz", validation_split=0.2)
    assert direct.num_test == 8


def test_npz_errors(tmp_path, rng):
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x_train=images, y_train=np.arange(4), images=images)
    with pytest.raises(DataError, match=r"data\.npz' lacks x_test, y_test \(it has: .*x_train.*images") as error:
        _load("npz", tmp_path)
    _assert_one_line(error)

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.npz", "b.npz"):
        np.savez(two / name, x_train=images)
    with pytest.raises(DataError, match=r"2 \.npz files \(a\.npz, b\.npz\)"):
        _load("npz", two)

    np.savez(tmp_path / "bad.npz", x_train=images, y_train=np.array([0.0, 1.5, 2.0, 1.0]), x_test=images,
             y_test=np.arange(4))
    with pytest.raises(DataError, match=r"y_train holds 1 label\(s\) that are not class indices \(the first: 1\.5\)"):
        _load("npz", tmp_path / "bad.npz")

    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"cannot read .*junk\.npz"):
        _load("npz", tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion-mnist", "npz", "imagenet"])
def test_missing_data_dir(tmp_path, name):
    with pytest.raises(DataError, match="no data directory given"):
        _load(name, None)
    with pytest.raises(DataError, match="does not exist") as error:
        _load(name, tmp_path / "absent")
    _assert_one_line(error)
    empty = tmp_path / "empty"
    empty.mkdir()
    looked_for = {"cifar10": r"cifar-10-binary\.tar\.gz.*cifar-10-batches-bin.*cifar-10-batches-py",
                  "mnist": r"train-images-idx3-ubyte.*t10k-labels-idx1-ubyte",
                  "fashion-mnist": r"train-images-idx3-ubyte.*t10k-labels-idx1-ubyte",
                  "npz": r"data\.npz", "imagenet": r"train-\*-of-\*.*validation-\*-of-\*"}[name]
    with pytest.raises(DataError, match=f"looked in '{empty}' for .*{looked_for}.*--data-dir") as error:
        _load(name, empty)
    _assert_one_line(error)


# ---------------------------------------------------------------------------------------- ImageNet TFRecords
STEP = 6  # image k is a constant colour k * STEP, so its id survives JPEG, crop and resize


def _example(identity: int, label: int, rng) -> bytes:
    height, width = (int(v) for v in rng.integers(24, 48, size=2))
    image = tf.fill([height, width, 3], tf.constant(identity * STEP, tf.uint8))
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_jpeg(image).numpy()])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"JPEG"])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_shards(folder: Path, rng, *, first_label: int = 1, train_shards: int = 3, per_shard: int = 10,
                  test_records: int = 6) -> Dict[str, Dict[int, int]]:
    """tensorflow/models-style shards; returns {split: {id: label as stored}}."""
    folder.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Dict[int, int]] = {"train": {}, "test": {}}
    identity = 0
    plan = [(f"train-{i:05d}-of-{train_shards:05d}", "train", per_shard) for i in range(train_shards)]
    plan.append(("validation-00000-of-00001", "test", test_records))
    for file_name, split, count in plan:
        with tf.io.TFRecordWriter(str(folder / file_name)) as writer:
            for _ in range(count):
                label = first_label + identity % 5
                writer.write(_example(identity, label, rng))
                written[split][identity] = label
                identity += 1
    return written


def _ids_and_labels(batches) -> Tuple[List[int], List[int]]:
    ids, labels = [], []
    for images, batch_labels in batches:
        assert images.dtype == tf.float32 and batch_labels.dtype == tf.int64
        ids += [int(round(float(v) / STEP)) for v in tf.reduce_mean(images, axis=[1, 2, 3]).numpy()]
        labels += [int(v) for v in batch_labels.numpy()]
    return ids, labels


def test_imagenet_tfrecord_round_trip(tmp_path, rng):
    written = _write_shards(tmp_path, rng)
    data = _load("imagenet", tmp_path, seed=0, image_size=16, scale=1.0, validation_split=0.3)
    assert isinstance(data, imagenet.TFRecordImageDataset)
    assert data.input_shape == (16, 16, 3) and data.num_classes == 5 and data.label_offset == 1
    assert data.num_train + data.num_validation == 30 and data.num_test == 6
    assert 1 <= data.num_validation <= 20

    batch_images, batch_labels = next(iter(data.train(4, augment=True, seed=3)))
    assert batch_images.shape == (4, 16, 16, 3) and batch_images.dtype == tf.float32
    assert batch_labels.dtype == tf.int64

    train_ids, train_labels = _ids_and_labels(data.train(7, shuffle=False))
    val_ids, val_labels = _ids_and_labels(data.validation(7))
    test_ids, test_labels = _ids_and_labels(data.test(4))
    assert (len(train_ids), len(val_ids), len(test_ids)) == (data.num_train, data.num_validation, 6)
    assert not set(train_ids) & set(val_ids)  # validation is carved out of training, disjointly
    assert sorted(train_ids + val_ids) == sorted(written["train"])
    assert sorted(test_ids) == sorted(written["test"])
    for ids, labels, split in ((train_ids, train_labels, "train"), (val_ids, val_labels, "train"),
                               (test_ids, test_labels, "test")):
        assert labels == [written[split][i] - 1 for i in ids]  # stored 1..5, delivered 0..4

    # Horovod shards partition the training split; shuffling keeps the same records
    shard_ids = [_ids_and_labels(data.train(5, shuffle=False, shard=(rank, 2)))[0] for rank in range(2)]
    assert sorted(shard_ids[0] + shard_ids[1]) == sorted(train_ids) and not set(shard_ids[0]) & set(shard_ids[1])
    assert sorted(_ids_and_labels(data.train(5, shuffle=True, seed=1))[0]) == sorted(train_ids)

    sample = data.sample_train(9, seed=2)
    assert sample.shape == (9, 16, 16, 3) and sample.dtype == np.float32
    assert {int(round(v / STEP)) for v in sample.mean(axis=(1, 2, 3))} <= set(train_ids)

    # another seed moves the validation split, never the test split
    other = _load("imagenet", tmp_path, seed=1, image_size=16, scale=1.0, validation_split=0.3)
    other_val = _ids_and_labels(other.validation(8))[0]
    assert _ids_and_labels(other.test(4))[0] == test_ids
    assert sorted(other_val) != sorted(val_ids)


def test_imagenet_zero_based_labels_and_damage(tmp_path, rng):
    _write_shards(tmp_path, rng, first_label=0, train_shards=1, per_shard=12, test_records=3)
    data = _load("imagenet", tmp_path, image_size=8, validation_split=0.3)
    assert data.label_offset == 0 and data.num_classes == 5
    assert data.num_train + data.num_validation == 12 and data.input_shape == (8, 8, 3)

    shard = tmp_path / "train-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"train-00000-of-00001.*rebuild the shard") as error:
        _load("imagenet", tmp_path, image_size=8)
    _assert_one_line(error)

    (tmp_path / "validation-00000-of-00001").unlink()
    with pytest.raises(DataError, match=r"no validation-\*-of-\* shards"):
        _load("imagenet", tmp_path, image_size=8)


def test_imagenet_large_data_is_estimated(tmp_path, rng, monkeypatch):
    """Above SCAN_LIMIT_BYTES only the first shard of each split is read; ImageNet's 1000 classes are assumed."""
    _write_shards(tmp_path, rng, train_shards=3, per_shard=10, test_records=6)
    monkeypatch.setattr(imagenet, "SCAN_LIMIT_BYTES", 0)
    data = _load("imagenet", tmp_path, image_size=8, validation_split=0.3)
    assert (data.num_train, data.num_validation, data.num_test) == (21, 9, 6)
    assert data.num_classes == imagenet.IMAGENET_CLASSES and data.label_offset == 1
    labels = np.concatenate([y.numpy() for _, y in data.test(4)])
    assert labels.min() >= 0 and labels.max() <= 4
