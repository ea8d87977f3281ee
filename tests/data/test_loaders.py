"""File loaders, exercised on small files written here, plus the real MNIST test set when it is present."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.data import load_cifar10, load_csv, load_data, load_mnist, load_npy, load_npz
from bastion.errors import DataError

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------ file writers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: big-endian magic (0x0000 08 ndim), big-endian dims, then the unsigned bytes."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(
    directory: Path, prefix: str = "t10k", n: int = 6, gz: bool = False, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
    for kind, arr, ndim in (("images", images, 3), ("labels", labels, 1)):
        path = directory / f"{prefix}-{kind}-idx{ndim}-ubyte"
        data = idx_bytes(arr)
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
        else:
            path.write_bytes(data)
    return images, labels


def write_cifar(path: Path, n: int = 4, first_label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) + first_label) % 10
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(n, -1)], axis=1)
    path.write_bytes(records.tobytes())
    return images, labels


# ------------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.x.shape == (6, 1, 28, 28) and ds.x.dtype == torch.float32
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(images).float() / 255)
    assert ds.y.tolist() == labels.tolist()
    assert ds.num_classes == 10
    assert ds.name == f"mnist:{tmp_path} (test)"


def test_mnist_train_split_and_limit(tmp_path: Path) -> None:
    write_mnist(tmp_path, prefix="train", n=8)
    write_mnist(tmp_path, prefix="t10k", n=3)
    assert len(load_mnist(tmp_path, "train")) == 8
    assert len(load_mnist(tmp_path, "train", limit=5)) == 5
    assert len(load_data(f"mnist:{tmp_path}:train")) == 8
    assert len(load_data(f"mnist:{tmp_path}")) == 3
    with pytest.raises(ValueError, match="split must be"):
        load_mnist(tmp_path, "validation")
    with pytest.raises(ValueError, match="limit"):
        load_mnist(tmp_path, limit=0)


def test_mnist_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: no such directory"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no MNIST file t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    # Swapped files: the label file where the images should be.
    images.write_bytes(labels.read_bytes())
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: bad magic number 0x00000801.*0x00000803.*swapped"):
        load_mnist(tmp_path)
    images.write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DataError, match="bad magic number 0x12345678"):
        load_mnist(tmp_path)
    # A compressed file without the .gz suffix.
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((6, 28, 28)))))
    with pytest.raises(DataError, match="gzip-compressed"):
        load_mnist(tmp_path)


def test_mnist_truncated_and_trailing(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    full = images.read_bytes()
    images.write_bytes(full[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: .*but only 4604 bytes follow; the file is truncated"):
        load_mnist(tmp_path)
    images.write_bytes(full[:10])
    with pytest.raises(DataError, match="shorter than the 16-byte IDX header"):
        load_mnist(tmp_path)
    images.write_bytes(full + b"\x00\x00")
    with pytest.raises(DataError, match="2 unexpected bytes"):
        load_mnist(tmp_path)


def test_mnist_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: the gzip stream is corrupt or truncated"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch_and_bad_labels(tmp_path: Path) -> None:
    write_mnist(tmp_path, n=6)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5)))
    with pytest.raises(DataError, match=r"holds 6 images but .*t10k-labels-idx1-ubyte holds 5 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 12, 3, 4])))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 12 of record 3 is outside the 10 classes"):
        load_mnist(tmp_path)


def test_real_mnist_test_set() -> None:
    directory = Path(__file__).resolve().parents[3] / "shared/data/mnist"
    if not directory.is_dir():
        pytest.skip(f"no MNIST files at {directory}")
    ds = load_mnist(directory, "test")
    assert ds.x.shape == (10000, 1, 28, 28)
    assert ds.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0


# ---------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_test_split_from_directory_or_parent(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    images, labels = write_cifar(folder / "test_batch.bin", n=3)
    for where in (folder, tmp_path):
        ds = load_cifar10(where)
        assert ds.x.shape == (3, 3, 32, 32)
        assert torch.allclose(ds.x, torch.from_numpy(images).float() / 255)
        assert ds.y.tolist() == labels.tolist()
        assert ds.name == f"cifar10:{folder} (test)"
    assert len(load_data(f"cifar10:{tmp_path}")) == 3


def test_cifar_train_split_and_limit(tmp_path: Path) -> None:
    parts = [write_cifar(tmp_path / f"data_batch_{i}.bin", n=2, first_label=i) for i in range(1, 6)]
    ds = load_cifar10(tmp_path, "train")
    assert len(ds) == 10
    assert ds.y.tolist() == np.concatenate([lab for _, lab in parts]).tolist()
    assert torch.equal(ds.x[4], torch.from_numpy(parts[2][0][0]).float() / 255)
    assert len(load_cifar10(tmp_path, "train", limit=3)) == 3
    assert len(load_data(f"cifar10:{tmp_path}:train")) == 10


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_cifar10(tmp_path / "missing")
    with pytest.raises(DataError, match=r"missing CIFAR-10 binary file\(s\) test_batch\.bin"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path / "data_batch_1.bin", n=1)
    with pytest.raises(DataError, match=r"data_batch_2\.bin, data_batch_3\.bin"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match=r"Python \(pickle\) version"):
        load_cifar10(tmp_path)

    path = tmp_path / "test_batch.bin"
    write_cifar(path, n=2)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"test_batch\.bin: 6139 bytes is not a whole number of CIFAR-10 records"):
        load_cifar10(tmp_path)
    records = np.zeros((2, 3073), dtype=np.uint8)
    records[1, 0] = 10
    path.write_bytes(records.tobytes())
    with pytest.raises(DataError, match=r"test_batch\.bin: label 10 of record 1 is outside the 10 classes"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------------- npz and npy


def test_npz_uint8_images_get_a_channel_axis(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(5, 6, 7), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "imgs.npz", x=x, y=y)
    ds = load_npz(tmp_path / "imgs.npz")
    assert ds.x.shape == (5, 1, 6, 7)
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(x).float() / 255)
    assert ds.y.tolist() == y.tolist() and ds.num_classes == 3 and ds.name == "imgs.npz"
    assert load_npz(tmp_path / "imgs.npz", num_classes=10).num_classes == 10


def test_npz_float_vectors_and_nchw(tmp_path: Path) -> None:
    np.savez(tmp_path / "v.npz", x=RNG.random((4, 9)), y=np.array([1, 1, 0, 3]))
    ds = load_data(str(tmp_path / "v.npz"))
    assert ds.x.shape == (4, 9) and ds.num_classes == 4
    np.savez(tmp_path / "c.npz", x=RNG.random((2, 3, 4, 4)).astype(np.float32), y=np.array([0, 1]))
    assert load_npz(tmp_path / "c.npz").feature_shape == (3, 4, 4)


def test_npz_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    with pytest.raises(DataError, match=f"{p}: no such file"):
        load_npz(p)
    np.savez(p, x=RNG.random((3, 2)), labels=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"d\.npz: no array named 'y'; the archive holds \['x', 'labels'\]"):
        load_npz(p)
    np.savez(p, x=RNG.random((3, 2)) * 255, y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"d\.npz: x values must lie in the input domain \[0, 1\].*Scale"):
        load_npz(p)
    x = RNG.random((3, 2))
    x[1, 0] = np.nan
    np.savez(p, x=x, y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"d\.npz: x contains 1 NaN"):
        load_npz(p)
    np.savez(p, x=RNG.random(3), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"d\.npz: x has shape \(3,\); expected \(N, D\)"):
        load_npz(p)
    np.savez(p, x=RNG.random((3, 1, 2, 2, 2)), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match="x has shape"):
        load_npz(p)
    np.savez(p, x=RNG.random((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="x holds 3 samples but y holds 2 labels"):
        load_npz(p)
    np.savez(p, x=RNG.random((3, 2)), y=np.array([0, -1, 1]))
    with pytest.raises(DataError, match=r"y\[1\] = -1"):
        load_npz(p)
    np.savez(p, x=np.array([[{}], [{}]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"d\.npz: an array in the archive cannot be read"):
        load_npz(p)
    p.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"d\.npz: cannot read it as a \.npz archive"):
        load_npz(p)
    np.save(tmp_path / "single.npy", np.zeros((2, 2)))
    (tmp_path / "single.npy").rename(p)
    with pytest.raises(DataError, match="holds a single array"):
        load_npz(p)


def test_npy_pair(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "Y.npy", np.array([2, 0, 1]))
    ds = load_npy(tmp_path / "X.npy", tmp_path / "Y.npy")
    assert ds.x.shape == (3, 1, 4, 4) and ds.name == "X.npy,Y.npy"
    assert load_data(f"{tmp_path / 'X.npy'}, {tmp_path / 'Y.npy'}").fingerprint() == ds.fingerprint()

    np.save(tmp_path / "Y.npy", np.array([2, 0]))
    with pytest.raises(DataError, match=r"X\.npy \+ .*Y\.npy: x holds 3 samples but y holds 2 labels"):
        load_npy(tmp_path / "X.npy", tmp_path / "Y.npy")
    np.save(tmp_path / "Y.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"Y\.npy: cannot read it as a \.npy array"):
        load_npy(tmp_path / "X.npy", tmp_path / "Y.npy")
    np.savez(tmp_path / "Y.npy", y=np.zeros(3))
    (tmp_path / "Y.npy.npz").rename(tmp_path / "Y.npy")
    with pytest.raises(DataError, match=r"Y\.npy: is a \.npz archive"):
        load_npy(tmp_path / "X.npy", tmp_path / "Y.npy")
    with pytest.raises(DataError, match="no such file"):
        load_npy(tmp_path / "X.npy", tmp_path / "missing.npy")


# --------------------------------------------------------------------------------------------------- CSV


def test_csv_with_header_label_column_anywhere(tmp_path: Path) -> None:
    p = tmp_path / "h.csv"
    p.write_text("f1,label,f2\n0.1,2,0.5\n0.0,0,1.0\n\n1.0,1,0.25\n")
    ds = load_csv(p)
    assert ds.x.shape == (3, 2) and ds.name == "h.csv"
    assert torch.allclose(ds.x, torch.tensor([[0.1, 0.5], [0.0, 1.0], [1.0, 0.25]]))
    assert ds.y.tolist() == [2, 0, 1] and ds.num_classes == 3


def test_csv_without_header_uses_last_column(tmp_path: Path) -> None:
    p = tmp_path / "n.csv"
    p.write_text("0.5, 0.25, 1\n0, 1, 0\n")
    ds = load_data(str(p))
    assert ds.x.shape == (2, 2) and ds.y.tolist() == [1, 0]


def test_csv_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    with pytest.raises(DataError, match="no such file"):
        load_csv(p)
    p.write_text("")
    with pytest.raises(DataError, match=r"bad\.csv: the file is empty"):
        load_csv(p)
    p.write_text("a,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_csv(p)
    p.write_text("0,255,1\n12,0,0\n")
    with pytest.raises(DataError, match=r"bad\.csv: x values must lie .*\[0, 255\].*divide by 255"):
        load_csv(p)
    p.write_text("0.1,0.2,1\n0.3,oops,0\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 2, column 2: 'oops' is not a number"):
        load_csv(p)
    p.write_text("a,b,label\n0.1,0.2,1\n0.3,0\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: 2 columns where the first row has 3"):
        load_csv(p)
    p.write_text("0.1,,1\n")
    with pytest.raises(DataError, match=r"line 1, column 2: empty cell"):
        load_csv(p)
    p.write_text("0.1,0.2,1.5\n")
    with pytest.raises(DataError, match=r"bad\.csv: labels must be whole class numbers, but y\[0\] = 1.5"):
        load_csv(p)
    p.write_text("nan,0.2,1\n")
    with pytest.raises(DataError, match="NaN"):
        load_csv(p)
    p.write_text("1\n0\n")
    with pytest.raises(DataError, match="feature columns and a label column"):
        load_csv(p)


# ------------------------------------------------------------------------------------------------ load_data


def test_load_data_digits_and_unknown_specs(tmp_path: Path) -> None:
    assert load_data(" digits ").name == "digits"
    for spec in ("imagenet", "data.txt", "a.npy", ""):
        with pytest.raises(DataError, match="accepted forms: 'digits', 'mnist:DIR'"):
            load_data(spec)
    with pytest.raises(DataError, match="names no directory"):
        load_data("mnist:")
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "absent.npz"))
