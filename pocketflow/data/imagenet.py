"""ImageNet (ILSVRC-2012) streamed from TFRecords in the tensorflow/models layout.

``config.dir`` holds ``train-*-of-*`` (the training split) and ``validation-*-of-*`` (the
official 50,000 validation images, used here as the *test* split) shards of
``tf.train.Example`` records with ``image/encoded`` (JPEG bytes) and ``image/class/label``
(int64). Nothing is held in memory: every split is a tf.data pipeline that decodes JPEGs on
the fly.

Decisions (stated here because they change what a model sees):

- Labels. tensorflow/models writes labels 1..1000 (0 is reserved for "background"). The
  loader subtracts ``label_offset``: 1 when the smallest label it saw is >= 1, else 0. Small
  datasets (under ``SCAN_LIMIT_BYTES``) are scanned in full; large ones only through their first
  train and test shard, so a 0-based large dataset whose first shards happen to lack class 0
  would be shifted wrongly: pass ``label_offset`` to ``TFRecordImageDataset`` to pin it. Labels
  outside 0..num_classes-1 after the shift stop the pipeline with an error.
- Classes. A fully scanned dataset has ``max label - offset + 1`` classes; a large one has
  1000 (or more, when the scanned shards show a larger label).
- Validation split. Carved from the training shards *record by record*: a record is held out
  when a keyed hash of (shard file name, record index in the shard, run seed) falls below
  ``validation_split``. This is disjoint from training by construction, independent of the
  order, shuffling and Horovod sharding of the files, works with a single shard, and changes
  with the seed like the in-memory datasets. The held-out fraction is ``validation_split`` up to
  sampling noise.
- Counts. Exact (one pass over the labels) for small datasets; for large ones the first shard
  of each split is counted and multiplied by the number of shards (the validation count is
  then ``validation_split`` of that estimate). They set steps per epoch, nothing else.
- Images. Evaluation (validation, test, ``sample_train``, train without augmentation): central
  crop of 87.5% of each side, bilinear resize to ``image_size`` (``data.image_size``, default 224).
  Training with augmentation: Inception-style random crop (8%-100% of the area, aspect ratio
  3/4-4/3), resize to ``image_size``, random horizontal flip. Pixels stay on the 0-255 scale
  until the run's ``Preprocess`` is applied to each batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pocketflow.config import DataConfig
from pocketflow.data.registry import preprocess_from, register_dataset
from pocketflow.data.base import Dataset, Preprocess, missing_files
from pocketflow.data.files import one_line
from pocketflow.errors import DataError

log = logging.getLogger(__name__)

NAME = "imagenet"
TRAIN_PATTERN, TEST_PATTERN = "train-*-of-*", "validation-*-of-*"
DEFAULT_IMAGE_SIZE = 224
IMAGENET_CLASSES = 1000
SCAN_LIMIT_BYTES = 1 << 30  # datasets up to 1 GiB are counted exactly; larger ones are estimated
EVAL_CROP_FRACTION = 0.875
SHUFFLE_BUFFER = 2048  # serialized records (about 110 kB each for ImageNet)
HASH_BUCKETS = 1_000_000
HASH_SALT = 0x9E3779B9
IMAGE_KEY, LABEL_KEY = "image/encoded", "image/class/label"
FEATURES = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string), LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}


@dataclass(frozen=True)
class RecordCounts:
    """What a scan of the shards found (exact, or estimated from the first shard of each split)."""

    num_train: int
    num_validation: int
    num_test: int
    min_label: int
    max_label: int
    exact: bool


class TFRecordImageDataset(Dataset):
    """Train / validation / test tf.data pipelines over JPEG TFRecord shards (see the module doc)."""

    def __init__(self, name: str, train_files: Sequence[str], test_files: Sequence[str], *,
                 preprocess: Preprocess, image_size: int, validation_split: float, seed: int,
                 num_classes: int, label_offset: int, counts: Tuple[int, int, int]) -> None:
        preprocess.check_channels(3)
        self.name = name
        self.train_files, self.test_files = list(train_files), list(test_files)
        self.preprocess = preprocess
        self.image_size = int(image_size)
        self.input_shape = (self.image_size, self.image_size, 3)
        self.num_classes = int(num_classes)
        self.label_offset = int(label_offset)
        self.validation_split = float(validation_split)
        self.seed = int(seed)
        self._counts = tuple(int(count) for count in counts)

    # ------------------------------------------------------------------ sizes
    @property
    def num_train(self) -> int:
        return self._counts[0]

    @property
    def num_validation(self) -> int:
        return self._counts[1]

    @property
    def num_test(self) -> int:
        return self._counts[2]

    # ------------------------------------------------------------------ pipelines
    def train(self, batch_size: int, *, shuffle: bool = True, augment: bool = False, seed: int = 0,
              shard: Tuple[int, int] = (0, 1), repeat: bool = False) -> tf.data.Dataset:
        rank, size = shard
        files, shard_records = self.train_files, False
        if size > 1 and len(files) >= size:
            files = files[rank::size]
        elif size > 1:
            shard_records = True  # too few shards to split by file: split the (deterministic) record stream
        names = tf.data.Dataset.from_tensor_slices(files)
        if shuffle and not shard_records:
            names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        records = keyed_records(names, deterministic=not shuffle or shard_records)
        records = records.filter(lambda key, _: tf.logical_not(self._held_out(key)))
        if shard_records:
            records = records.shard(size, rank)
        records = records.map(lambda _, record: record)
        if shuffle:
            records = records.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            records = records.repeat()
        transform = self._train_image if augment else self._eval_image
        return self._finish(records, transform, batch_size, drop_remainder=repeat)

    def validation(self, batch_size: int) -> tf.data.Dataset:
        records = keyed_records(tf.data.Dataset.from_tensor_slices(self.train_files), deterministic=True)
        records = records.filter(lambda key, _: self._held_out(key)).map(lambda _, record: record)
        return self._finish(records, self._eval_image, batch_size)

    def test(self, batch_size: int) -> tf.data.Dataset:
        records = keyed_records(tf.data.Dataset.from_tensor_slices(self.test_files), deterministic=True)
        return self._finish(records.map(lambda _, record: record), self._eval_image, batch_size)

    def sample_train(self, count: int, seed: int = 0) -> np.ndarray:
        count = min(int(count), self.num_train)
        if count <= 0:
            return np.zeros((0,) + self.input_shape, np.float32)
        batch_size = min(count, 64)
        batches = self.train(batch_size, shuffle=True, augment=False, seed=seed).take(-(-count // batch_size))
        return np.concatenate([images.numpy() for images, _ in batches])[:count]

    # ------------------------------------------------------------------ pieces
    def _held_out(self, key: tf.Tensor) -> tf.Tensor:
        return held_out(key, self.seed, self.validation_split)

    def _finish(self, records: tf.data.Dataset, transform, batch_size: int, *,
                drop_remainder: bool = False) -> tf.data.Dataset:
        def decode(record: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
            features = tf.io.parse_single_example(record, FEATURES)
            image = tf.io.decode_image(features[IMAGE_KEY], channels=3, expand_animations=False)
            label = features[LABEL_KEY] - self.label_offset
            check = tf.debugging.assert_equal(
                tf.logical_and(label >= 0, label < self.num_classes), True,
                message=f"{self.name}: a label minus label_offset={self.label_offset} falls outside "
                        f"0..{self.num_classes - 1}; pass the right label_offset / num_classes")
            with tf.control_dependencies([check]):
                label = tf.identity(label)
            return transform(image), label

        data = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        data = data.batch(batch_size, drop_remainder=drop_remainder)
        return data.map(lambda x, y: (self.preprocess.tensor(x), y),
                        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def _eval_image(self, image: tf.Tensor) -> tf.Tensor:
        cropped = tf.image.central_crop(image, EVAL_CROP_FRACTION)
        resized = tf.image.resize(cropped, [self.image_size, self.image_size], method="bilinear")
        return tf.ensure_shape(resized, self.input_shape)

    def _train_image(self, image: tf.Tensor) -> tf.Tensor:
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.1,
            aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        cropped = tf.slice(image, begin, size)
        resized = tf.image.resize(cropped, [self.image_size, self.image_size], method="bilinear")
        return tf.ensure_shape(tf.image.random_flip_left_right(resized), self.input_shape)


def keyed_records(names: tf.data.Dataset, *, deterministic: bool) -> tf.data.Dataset:
    """(``"<file name>:<index in file>"``, serialized record) for every record of the files in ``names``."""

    def per_file(path: tf.Tensor) -> tf.data.Dataset:
        base = tf.strings.regex_replace(path, r".*[/\\]", "")
        return tf.data.TFRecordDataset(path).enumerate().map(
            lambda index, record: (tf.strings.join([base, tf.strings.as_string(index)], ":"), record))

    return names.interleave(per_file, cycle_length=8, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=deterministic)


def held_out(key: tf.Tensor, seed: int, validation_split: float) -> tf.Tensor:
    """Whether the record named ``key`` belongs to the validation split (keyed hash, see module doc)."""
    bucket = tf.strings.to_hash_bucket_strong(key, HASH_BUCKETS, key=[int(seed) % (1 << 63), HASH_SALT])
    return bucket < int(round(validation_split * HASH_BUCKETS))


def _scan_file(path: str, seed: int, validation_split: float) -> Tuple[int, int, int, int]:
    """(records, held-out records, min label, max label) of one shard; a damaged shard is a DataError."""
    records = keyed_records(tf.data.Dataset.from_tensor_slices([path]), deterministic=True)
    batches = records.batch(4096).map(
        lambda keys, serialized: (held_out(keys, seed, validation_split),
                                  tf.io.parse_example(serialized, FEATURES)[LABEL_KEY]))
    total = held = 0
    low, high = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    try:
        for is_held, labels in batches.as_numpy_iterator():
            total += len(labels)
            held += int(is_held.sum())
            low, high = min(low, int(labels.min())), max(high, int(labels.max()))
    except tf.errors.OpError as error:
        raise DataError(f"{NAME}: cannot read the TFRecord shard '{path}' ({one_line(error, 160)}); it must hold "
                        f"tf.train.Example records with {IMAGE_KEY} (JPEG) and {LABEL_KEY} (int64): check or "
                        f"rebuild the shard") from None
    return total, held, low, high


def count_records(train_files: Sequence[str], test_files: Sequence[str], seed: int,
                  validation_split: float) -> RecordCounts:
    """Count the splits and the label range; exactly below SCAN_LIMIT_BYTES, else from the first shards."""
    total_bytes = sum(tf.io.gfile.stat(path).length for path in [*train_files, *test_files])
    exact = total_bytes <= SCAN_LIMIT_BYTES
    scanned_train = train_files if exact else train_files[:1]
    scanned_test = test_files if exact else test_files[:1]
    train_scans = [_scan_file(path, seed, validation_split) for path in scanned_train]
    test_scans = [_scan_file(path, seed, validation_split) for path in scanned_test]
    scans = [scan for scan in train_scans + test_scans if scan[0] > 0]
    if not scans:
        raise DataError(f"{NAME}: the TFRecord shards in '{_folder(train_files[0])}' hold no records; rebuild "
                        f"them (tensorflow/models build_imagenet_data.py layout)")
    low, high = min(scan[2] for scan in scans), max(scan[3] for scan in scans)
    if exact:
        train_total = sum(scan[0] for scan in train_scans)
        held = sum(scan[1] for scan in train_scans)
        test_total = sum(scan[0] for scan in test_scans)
    else:
        train_total = train_scans[0][0] * len(train_files)
        held = int(round(train_total * validation_split))
        test_total = test_scans[0][0] * len(test_files)
        log.info("%s: %.1f GiB of shards; counts estimated from the first shard of each split", NAME,
                 total_bytes / (1 << 30))
    return RecordCounts(train_total - held, held, test_total, low, high, exact)


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


@register_dataset(NAME, default_net="mobilenet_v1", needs_dir=True,
                  description="ImageNet TFRecords (train-*-of-*, validation-*-of-*; tensorflow/models layout) "
                              "in --data-dir, streamed")
def load_imagenet(config: DataConfig, seed: int) -> TFRecordImageDataset:
    """Find the shards, count them (see the module doc) and build the streaming dataset."""
    expected = f"the folder with the {TRAIN_PATTERN} and {TEST_PATTERN} TFRecord shards"
    if not config.dir:
        raise DataError(f"{NAME}: no data directory given; pass --data-dir pointing at {expected}")
    folder = str(config.dir).rstrip("/") or "/"
    if not tf.io.gfile.isdir(folder):
        state = "is not a folder" if tf.io.gfile.exists(folder) else "does not exist"
        raise DataError(f"{NAME}: data path '{folder}' {state}; pass --data-dir pointing at {expected}")
    train_files = sorted(tf.io.gfile.glob(f"{folder}/{TRAIN_PATTERN}"))
    test_files = sorted(tf.io.gfile.glob(f"{folder}/{TEST_PATTERN}"))
    absent: List[str] = [pattern for pattern, files in ((TRAIN_PATTERN, train_files), (TEST_PATTERN, test_files))
                         if not files]
    if len(absent) == 2:
        raise missing_files(NAME, folder, [f"{TRAIN_PATTERN} + {TEST_PATTERN} TFRecord shards"])
    if absent:
        raise DataError(f"{NAME}: '{folder}' has no {absent[0]} shards (the other split is there); both the "
                        f"train and validation shards are needed, convert the missing split too")
    counts = count_records(train_files, test_files, seed, config.validation_split)
    label_offset = 1 if counts.min_label >= 1 else 0
    if counts.min_label < 0:
        raise DataError(f"{NAME}: the shards in '{folder}' hold label {counts.min_label}; {LABEL_KEY} must be "
                        f">= 0 (tensorflow/models layout: 1..1000)")
    num_classes = counts.max_label - label_offset + 1
    if not counts.exact:
        num_classes = max(num_classes, IMAGENET_CLASSES)
    if counts.num_train < 1 or counts.num_validation < 1 or counts.num_test < 1:
        raise DataError(f"{NAME}: the shards in '{folder}' give {counts.num_train} train, {counts.num_validation} "
                        f"validation and {counts.num_test} test records; each split needs at least one (add "
                        f"records or change data.validation_split)")
    log.info("%s: %d train / %d validation / %d test records%s, labels %d..%d -> offset %d, %d classes",
             NAME, counts.num_train, counts.num_validation, counts.num_test, "" if counts.exact else " (estimated)",
             counts.min_label, counts.max_label, label_offset, num_classes)
    return TFRecordImageDataset(
        NAME, train_files, test_files, preprocess=preprocess_from(config),
        image_size=config.image_size or DEFAULT_IMAGE_SIZE, validation_split=config.validation_split, seed=seed,
        num_classes=num_classes, label_offset=label_offset,
        counts=(counts.num_train, counts.num_validation, counts.num_test))
