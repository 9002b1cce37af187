"""IDX reading (built byte by byte from the format spec with struct) and load_mnist."""

import gzip
import re
import struct

import numpy as np
import pytest

from funtrain.data import IDXFormatError, load_mnist, parse_idx, read_idx

# IDX type code -> (struct format char, numpy dtype of the parsed, native-order result)
CODES = {
    0x08: ("B", np.uint8),
    0x09: ("b", np.int8),
    0x0B: ("h", np.int16),
    0x0C: ("i", np.int32),
    0x0D: ("f", np.float32),
    0x0E: ("d", np.float64),
}


def idx_header(code, shape):
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def idx_bytes(code, shape, values):
    """Header, then the values big-endian, as the IDX spec lays them out."""
    fmt = CODES[code][0]
    return idx_header(code, shape) + struct.pack(f">{len(values)}{fmt}", *values)


def write(path, data, *, compress=False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


ROUND_TRIPS = {
    0x08: ((3, 4), list(range(0, 240, 20))),
    0x09: ((2, 3), [-128, -1, 0, 1, 64, 127]),
    0x0B: ((2, 2, 2), [-32768, -300, -1, 0, 1, 258, 4096, 32767]),
    0x0C: ((4,), [-(2**31), -70000, 70000, 2**31 - 1]),
    0x0D: ((2, 3), [-1.5, 0.0, 0.25, 3.0e8, -7.125, 1e-3]),
    0x0E: ((1, 2), [np.pi, -1e300]),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("code", sorted(ROUND_TRIPS))
def test_read_idx_round_trip(tmp_path, code, compress):
    shape, values = ROUND_TRIPS[code]
    path = write(tmp_path / "data-idx", idx_bytes(code, shape, values), compress=compress)
    arr = read_idx(path)
    dtype = CODES[code][1]
    assert arr.dtype == np.dtype(dtype)  # native byte order
    assert arr.shape == shape
    np.testing.assert_array_equal(arr, np.array(values, dtype).reshape(shape))


def test_big_endian_float32_bytes_exactly():
    raw = b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x02" + b"\x3f\x80\x00\x00" + b"\xc0\x20\x00\x00"
    arr = parse_idx(raw)
    assert arr.dtype == np.float32 and arr.tolist() == [1.0, -2.5]


def test_big_endian_int16_bytes_exactly():
    raw = b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x03" + b"\x01\x02\xff\xfe\x80\x00"
    assert parse_idx(raw).tolist() == [258, -2, -32768]


def test_parsed_array_is_writable_and_owned():
    arr = parse_idx(idx_bytes(0x0D, (2,), [1.0, 2.0]))
    arr[0] = 5.0
    assert arr.tolist() == [5.0, 2.0]


def test_gzip_detected_by_content_not_name(tmp_path):
    data = idx_bytes(0x08, (2, 2), [1, 2, 3, 4])
    plain_named_gz = write(tmp_path / "x.gz", data)
    gz_named_plain = write(tmp_path / "x-idx1-ubyte", data, compress=True)
    for path in (plain_named_gz, gz_named_plain):
        assert read_idx(path).tolist() == [[1, 2], [3, 4]]


def test_idx_error_is_value_error():
    assert issubclass(IDXFormatError, ValueError)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01"])
def test_wrong_magic(tmp_path, magic):
    path = write(tmp_path / "f", magic + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IDXFormatError, match=f"wrong IDX magic {magic.hex()}") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("code", [0x00, 0x0A, 0x0F, 0xFF])
def test_unknown_type_code(code):
    raw = bytes([0, 0, code, 1]) + struct.pack(">I", 1) + b"\x00" * 8
    with pytest.raises(IDXFormatError, match=rf"wrong IDX magic 0000{code:02x}01.*type code in "
                                             r"\{08, 09, 0b, 0c, 0d, 0e\}"):
        parse_idx(raw, source="thefile")


def test_rank_zero_rejected():
    with pytest.raises(IDXFormatError, match=r"wrong IDX magic 00000800.*rank >= 1"):
        parse_idx(b"\x00\x00\x08\x00")


@pytest.mark.parametrize("n", [0, 2, 3])
def test_truncated_magic(tmp_path, n):
    path = write(tmp_path / "f", b"\x00\x00\x08\x03"[:n])
    msg = re.escape(f"truncated IDX header: need 4 magic bytes, file has {n}")
    with pytest.raises(IDXFormatError, match=msg):
        read_idx(path)


def test_truncated_dimensions():
    raw = idx_header(0x08, (5, 28, 28))[:10]
    msg = re.escape("truncated IDX header: rank 3 needs 16 bytes, file has 10")
    with pytest.raises(IDXFormatError, match=msg):
        parse_idx(raw, source="imgs")


def test_truncated_data_mentions_needed_and_actual_bytes(tmp_path):
    raw = idx_bytes(0x0D, (2, 3), [0.0] * 6)[:-4]
    path = write(tmp_path / "f", raw)
    msg = re.escape("truncated IDX data: shape (2, 3) of float32 needs 24 bytes, file has 20")
    with pytest.raises(IDXFormatError, match=msg):
        read_idx(path)


def test_trailing_bytes(tmp_path):
    path = write(tmp_path / "f", idx_bytes(0x08, (2,), [1, 2]) + b"xyz", compress=True)
    msg = re.escape("3 unexpected bytes after the IDX data of shape (2,)")
    with pytest.raises(IDXFormatError, match=msg):
        read_idx(path)


def _gzipped():
    return bytearray(gzip.compress(idx_bytes(0x08, (200,), list(range(200)))))


@pytest.mark.parametrize("corrupt", [
    lambda gz: gz[:-12],                        # truncated stream
    lambda gz: gz[:-8] + b"\x00" * 8,           # wrong CRC and size
    lambda gz: gz[:2] + b"\x07" + gz[3:],       # unknown compression method
    lambda gz: gz[:12],                         # only the header
], ids=["truncated", "bad-crc", "bad-method", "header-only"])
def test_corrupt_gzip(tmp_path, corrupt):
    path = write(tmp_path / "f.gz", bytes(corrupt(_gzipped())))
    with pytest.raises(IDXFormatError, match="corrupt or truncated gzip stream"):
        read_idx(path)


def test_corrupt_gzip_deflate_body(tmp_path):
    gz = _gzipped()
    gz[10] ^= 0xFF  # first byte of the deflate data: invalid block type
    path = write(tmp_path / "f.gz", bytes(gz))
    with pytest.raises(IDXFormatError, match="corrupt or truncated gzip stream"):
        read_idx(path)


# ----------------------------------------------------------------------------- load_mnist

STEMS = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def fake_mnist(directory, n_train=5, n_test=3, *, compress=False, names=None, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28)),
        "train_y": rng.integers(0, 10, n_train),
        "test_x": rng.integers(0, 256, (n_test, 28, 28)),
        "test_y": rng.integers(0, 10, n_test),
    }
    arrays["train_x"][0, 0, :2] = [0, 255]  # make sure both extremes are present
    for key, arr in arrays.items():
        name = (names or STEMS)[key]
        write(directory / name, idx_bytes(0x08, arr.shape, arr.ravel().tolist()),
              compress=compress)
    return arrays


def test_load_mnist(tmp_path):
    raw = fake_mnist(tmp_path)
    train, test = load_mnist(tmp_path)
    for ds, split, n in ((train, "train", 5), (test, "test", 3)):
        x, y = ds.arrays["x"], ds.arrays["y"]
        assert x.dtype == np.float32 and x.shape == (n, 784)
        assert y.dtype == np.int32 and y.shape == (n,)
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_allclose(x, raw[f"{split}_x"].reshape(n, 784) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y, raw[f"{split}_y"])
    assert train.arrays["x"][0, 0] == 0.0 and train.arrays["x"][0, 1] == 1.0


def test_load_mnist_unflattened(tmp_path):
    raw = fake_mnist(tmp_path)
    train, test = load_mnist(tmp_path, flatten=False)
    assert train.arrays["x"].shape == (5, 28, 28, 1) and test.arrays["x"].shape == (3, 28, 28, 1)
    assert train.arrays["x"].dtype == np.float32
    np.testing.assert_allclose(train.arrays["x"][..., 0], raw["train_x"] / 255.0, rtol=1e-6)


def test_load_mnist_gzip_and_dotted_names(tmp_path):
    names = {k: v.replace("-idx", ".idx") + ".gz" for k, v in STEMS.items()}
    raw = fake_mnist(tmp_path, compress=True, names=names)
    train, test = load_mnist(str(tmp_path))
    np.testing.assert_array_equal(test.arrays["y"], raw["test_y"])
    assert len(train) == 5 and len(test) == 3


def test_load_mnist_missing_file(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / STEMS["test_y"]).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("no t10k-labels-idx1-ubyte[.gz] in")):
        load_mnist(tmp_path)


def test_load_mnist_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_images_and_labels_must_pair(tmp_path):
    fake_mnist(tmp_path)
    write(tmp_path / STEMS["train_y"], idx_bytes(0x08, (4,), [1, 2, 3, 4]))
    msg = re.escape("train images (5, 28, 28) and labels (4,) do not pair up")
    with pytest.raises(IDXFormatError, match=msg):
        load_mnist(tmp_path)
