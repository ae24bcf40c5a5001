"""Known answers for the packed low-bit file: bit packing, decoders, and the round trip through Keras."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from learners.packing import (PackedTensor, distinct_values, load_packed, pack_codes, packed_size, read_packed,
                              unpack_codes, write_packed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_pack_round_trip_and_size(bits, rng):
    codes = rng.integers(0, 1 << bits, size=1001)
    data = pack_codes(codes, bits)
    assert len(data) == packed_size(1001, bits) == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(data, bits, 1001), codes)


def test_pack_known_bytes():
    # little-endian bit order: codes 1, 2, 3 at 2 bits -> bits 10 01 11 -> 0b00111001
    assert pack_codes(np.array([1, 2, 3]), 2) == bytes([0b00111001])


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(b"\x00", 4, 3)


def _model():
    inputs = tf.keras.Input((6, 6, 2))
    x = tf.keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(3, name="dense")(x)
    return tf.keras.Model(inputs, outputs)


def test_file_round_trip_affine_and_codebook(tmp_path, rng):
    model = _model()
    conv, dense = model.get_layer("conv").kernel, model.get_layer("dense").kernel
    conv_codes = rng.integers(0, 16, size=conv.shape)
    scales, zeros = rng.uniform(0.01, 0.1, 8).astype(np.float32), np.full(8, 7.5, np.float32)
    book = np.array([-0.5, -0.1, 0.1, 0.5], np.float32)
    dense_codes = rng.integers(0, 4, size=dense.shape)
    packed = {conv.name: PackedTensor(conv_codes, 4, np.concatenate([scales, zeros]), "affine"),
              dense.name: PackedTensor(dense_codes, 2, book, "codebook")}
    size = write_packed(model, packed, tmp_path / "m.npz")
    assert size == (tmp_path / "m.npz").stat().st_size
    rebuilt = load_packed(tmp_path / "m.npz")
    np.testing.assert_allclose(rebuilt.get_layer("conv").kernel.numpy(), (conv_codes - 7.5) * scales, rtol=1e-6)
    np.testing.assert_array_equal(rebuilt.get_layer("dense").kernel.numpy(), book[dense_codes])
    np.testing.assert_array_equal(rebuilt.get_layer("bn").gamma.numpy(), model.get_layer("bn").gamma.numpy())
    assert distinct_values([rebuilt.get_layer("dense").kernel.numpy()]) == [4]
    _, _, entries = read_packed(tmp_path / "m.npz")
    assert [e["encoding"] for e in entries].count("packed") == 2
    # 144 conv weights at 4 bits -> 72 bytes, 24 dense weights at 2 bits -> 6 bytes
    with np.load(tmp_path / "m.npz") as data:
        assert data["codes"].size == 78


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable pocketflow-packed file"):
        read_packed(path)
