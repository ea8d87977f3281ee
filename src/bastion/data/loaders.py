"""Loaders that read data sets from disk (or from scikit-learn's bundled copy) into :class:`Dataset` objects.

Nothing here downloads: MNIST and CIFAR-10 are read from files the user already has. Every loader turns
whatever can go wrong with a file (missing, truncated, wrong format, values out of range) into a
:class:`DataError` whose message names the file, the problem and what to do, rather than a numpy or torch
traceback.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data.dataset import Dataset
from bastion.data.validation import validate_arrays
from bastion.errors import DataError, InputError

__all__ = [
    "load_cifar10",
    "load_csv",
    "load_data",
    "load_digits",
    "load_digits_sequences",
    "load_mnist",
    "load_npy",
    "load_npz",
]

PathLike = str | os.PathLike

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch.bin",)


# --------------------------------------------------------------------------------------------------- helpers


def _as_path(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"expected a file or directory path, got {type(path).__name__} {path!r}")
    return Path(path).expanduser()


def _existing_file(path: PathLike) -> Path:
    p = _as_path(path)
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise DataError(f"{p}: no such file; check the path{where}")
    if not p.is_file():
        raise DataError(f"{p}: is a directory, not a file; pass the path of the data file itself")
    return p


def _existing_dir(path: PathLike, hint: str) -> Path:
    p = _as_path(path)
    if not p.exists():
        raise DataError(f"{p}: no such directory; {hint}")
    if not p.is_dir():
        raise DataError(f"{p}: is a file, not a directory; {hint}")
    return p


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")
    return int(limit)


def _check_labels(labels: np.ndarray, num_classes: int, source: Path) -> None:
    """Label bytes of MNIST and CIFAR files must name one of the classes; say which file holds a bad one."""
    if labels.size and int(labels.max()) >= num_classes:
        i = int(np.argmax(labels >= num_classes))
        raise DataError(
            f"{source}: label {int(labels[i])} of record {i} is outside the {num_classes} classes "
            f"[0, {num_classes}); the file is damaged or is not a {num_classes}-class data set"
        )


def _read_bytes(path: Path) -> bytes:
    """Whole contents of a file, decompressed when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: the gzip stream is corrupt or truncated ({exc}); download the file again") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _standard_shape(x: np.ndarray, source: str) -> np.ndarray:
    """Accept (N, D), (N, C, H, W) and (N, H, W) features; the last gets a channel axis."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim not in (2, 4):
        raise DataError(
            f"{source}: x has shape {x.shape}; expected (N, D) vectors, (N, H, W) grey images or (N, C, H, W) images"
        )
    return x


# ----------------------------------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes); no download.

    Pixel intensities 0..16 are divided by 16 so that every value lies in [0, 1].

    Returns:
        A :class:`Dataset` named ``"digits"`` with x of shape (1797, 1, 8, 8).
    """
    table = _bundled_digits_table()
    if table is None:
        from sklearn import datasets

        bunch = datasets.load_digits()
        pixels, target = np.asarray(bunch.data), np.asarray(bunch.target)
    else:
        pixels, target = table[:, :-1], table[:, -1]
    images = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x, y, k = validate_arrays(images, target, num_classes=10, source="digits")
    return Dataset._trusted(x, y, k, "digits", (0.0, 1.0))


def load_digits_sequences() -> Dataset:
    """The bundled digits as sequences: each 8x8 image is 8 time steps (its rows) of 8 features (the row's pixels).

    The same samples, labels and order as :func:`load_digits`, reshaped from (N, 1, 8, 8) to (N, T, F) = (N, 8, 8)
    for recurrent models (testRNN reads MNIST the same way: 28 steps of 28 pixels). The zoo's ``lstm`` accepts both
    shapes; this one is for models (and threat models or mutations) that expect ``(N, T, F)`` sequences.

    Returns:
        A :class:`Dataset` named ``"digits-seq"`` with x of shape (1797, 8, 8) in [0, 1].
    """
    images = load_digits()
    return Dataset._trusted(images.x.reshape(-1, 8, 8).contiguous(), images.y, images.num_classes, "digits-seq",
                            images.domain)  # fmt: skip


def _bundled_digits_table() -> np.ndarray | None:
    """The (1797, 65) table of pixels and labels that scikit-learn ships, read without importing scikit-learn.

    Importing ``sklearn.datasets`` takes seconds (it pulls in most of SciPy); the data is one small gzipped
    CSV inside the installed package. Returns None when the file is not where it has always been, so that the
    caller falls back on scikit-learn's own loader.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError, zlib.error):
        return None
    if table.shape != (1797, 65):
        return None
    return table


# ------------------------------------------------------------------------------------------------------ MNIST


def _parse_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Parse an IDX file (Y. LeCun's format: big-endian magic and dimensions, then unsigned bytes)."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX header; the file is truncated")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        if data[:2] == b"\x1f\x8b":
            hint = "it is gzip-compressed, so give it a .gz suffix"
        elif found in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
            hint = "it looks like the IDX file of the other kind (images and labels swapped?)"
        else:
            hint = f"check that it is an MNIST {what} file in IDX format"
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} for IDX {what}; {hint}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: {len(data)} bytes, shorter than the {header}-byte IDX header; the file is truncated, "
            "download it again"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    body = len(data) - header
    if body < expected:
        raise DataError(
            f"{path}: the header announces {what} of shape {dims} ({expected} bytes) but only {body} bytes "
            "follow; the file is truncated, download it again"
        )
    if body > expected:
        raise DataError(
            f"{path}: {body - expected} unexpected bytes after the {expected} bytes of {what} of shape "
            f"{dims} announced by the header; the file is damaged or not an IDX file"
        )
    if expected == 0:
        raise DataError(f"{path}: the header announces {what} of shape {dims}, which holds no data")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _find_idx(directory: Path, prefix: str, kind: str, ndim: int) -> Path:
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in directory.iterdir())
    listing = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
    raise DataError(
        f"{directory}: no MNIST file {names[0]} (or {names[0]}.gz); the directory holds "
        f"{listing or 'nothing'}. Put the MNIST IDX files, raw or gzipped, in it"
    )


def load_mnist(directory: PathLike, split: str = "test", limit: int | None = None) -> Dataset:
    """MNIST from its IDX files, raw or gzip-compressed.

    Args:
        directory: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each possibly with a ``.gz`` suffix;
            only the two files of the requested split are needed).
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        limit: keep only the first ``limit`` samples.

    Returns:
        A :class:`Dataset` named ``"mnist:<directory> (<split>)"``, x of shape (N, 1, 28, 28) in [0, 1].
    """
    split = _check_split(split)
    limit = _check_limit(limit)
    d = _existing_dir(directory, "pass the folder holding the MNIST IDX files")
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(d, prefix, "images", 3)
    labels_path = _find_idx(d, prefix, "labels", 1)
    images = _parse_idx(images_path, _IDX_IMAGES_MAGIC, "images")
    labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "the files belong to different splits or one is damaged"
        )
    _check_labels(labels, 10, labels_path)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    name = f"mnist:{d} ({split})"
    x, y, k = validate_arrays(images[:, None], labels, num_classes=10, source=name)
    return Dataset._trusted(x, y, k, name, (0.0, 1.0))


# --------------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_directory(directory: PathLike) -> Path:
    d = _existing_dir(directory, "pass the folder cifar-10-batches-bin/ of the CIFAR-10 binary version, or its parent")
    nested = d / "cifar-10-batches-bin"
    return nested if nested.is_dir() else d


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of CIFAR-10 records of {_CIFAR_RECORD} bytes "
            f"(1 label byte + {_CIFAR_PIXELS} pixel bytes); the file is truncated or not a CIFAR-10 binary "
            "batch"
        )
    records = np.frombuffer(_read_bytes(path), dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    _check_labels(labels, 10, path)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: PathLike, split: str = "test", limit: int | None = None) -> Dataset:
    """CIFAR-10 from the files of its *binary* version (``cifar-10-binary.tar.gz``, extracted).

    Each record is one label byte followed by 3072 pixel bytes, channel-major (all red, then green, then
    blue).

    Args:
        directory: the folder holding ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``, or
            its parent holding ``cifar-10-batches-bin/``.
        split: ``"train"`` (the five data batches) or ``"test"`` (``test_batch.bin``).
        limit: keep only the first ``limit`` samples (later files are then not read at all).

    Returns:
        A :class:`Dataset` named ``"cifar10:<directory> (<split>)"``, x of shape (N, 3, 32, 32) in [0, 1].
    """
    split = _check_split(split)
    limit = _check_limit(limit)
    d = _cifar_directory(directory)
    names = _CIFAR_TRAIN_FILES if split == "train" else _CIFAR_TEST_FILES
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        hint = ""
        if (d / "test_batch").exists() or (d / "cifar-10-batches-py").exists():
            hint = " This looks like the Python (pickle) version; bastion reads only the binary version."
        raise DataError(
            f"{d}: missing CIFAR-10 binary file(s) {', '.join(missing)}; pass the folder holding them "
            f"(cifar-10-batches-bin/) or its parent.{hint}"
        )
    xs, ys, count = [], [], 0
    for n in names:
        x_part, y_part = _read_cifar_file(d / n)
        xs.append(x_part)
        ys.append(y_part)
        count += len(y_part)
        if limit is not None and count >= limit:
            break
    images = np.concatenate(xs)[:limit]
    labels = np.concatenate(ys)[:limit]
    name = f"cifar10:{d} ({split})"
    x, y, k = validate_arrays(images, labels, num_classes=10, source=name)
    return Dataset._trusted(x, y, k, name, (0.0, 1.0))


# --------------------------------------------------------------------------------------------- numpy and CSV


def _from_arrays(x: np.ndarray, y: np.ndarray, num_classes: int | None, source: str, name: str) -> Dataset:
    x = _standard_shape(x, source)
    if x.shape[0] == 0:
        raise DataError(f"{source}: x holds no samples")
    xt, yt, k = validate_arrays(x, y, num_classes=num_classes, source=source)
    return Dataset._trusted(xt, yt, k, name, (0.0, 1.0))


def load_npz(path: PathLike, *, num_classes: int | None = None) -> Dataset:
    """A data set from a ``.npz`` archive holding arrays ``x`` and ``y`` (as written by ``np.savez``).

    ``uint8`` features are divided by 255; other features must already lie in [0, 1]. Labels are integers.

    Args:
        path: the archive.
        num_classes: number of classes; by default ``max(y) + 1``.

    Returns:
        A :class:`Dataset` named after the file, x of shape (N, D) or (N, C, H, W); (N, H, W) gets a
        channel axis.
    """
    p = _existing_file(path)
    try:
        archive: Any = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{p}: cannot read it as a .npz archive ({exc}); save it with np.savez(path, x=..., y=...)"
        ) from None
    if not hasattr(archive, "files"):
        raise DataError(
            f"{p}: holds a single array of shape {getattr(archive, 'shape', '?')}, not an archive of x and "
            "y; "
            "use np.savez(path, x=..., y=...) or load_npy(x_path, y_path)"
        )
    with archive:
        keys = list(archive.files)
        for key in ("x", "y"):
            if key not in keys:
                raise DataError(
                    f"{p}: no array named {key!r}; the archive holds {keys}. "
                    "Save it with np.savez(path, x=features, y=labels)"
                )
        try:
            x, y = archive["x"], archive["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{p}: an array in the archive cannot be read ({exc})") from None
    return _from_arrays(x, y, num_classes, str(p), p.name)


def _load_single_npy(path: Path) -> np.ndarray:
    try:
        arr: Any = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it as a .npy array ({exc}); save it with np.save") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{path}: is a .npz archive, not a single .npy array; use load_npz")
    return arr


def load_npy(x_path: PathLike, y_path: PathLike, *, num_classes: int | None = None) -> Dataset:
    """A data set from two ``.npy`` files, features and labels, with the rules of :func:`load_npz`.

    Args:
        x_path: the features.
        y_path: the labels.
        num_classes: number of classes; by default ``max(y) + 1``.

    Returns:
        A :class:`Dataset` named ``"<x file>,<y file>"``.
    """
    px, py = _existing_file(x_path), _existing_file(y_path)
    x, y = _load_single_npy(px), _load_single_npy(py)
    return _from_arrays(x, y, num_classes, f"{px} + {py}", f"{px.name},{py.name}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _locate_csv_error(p: Path, lines: list[str], start: int, n_columns: int, exc: Exception) -> DataError:
    """numpy's parser says little about where a CSV goes wrong; find the first bad line and cell ourselves."""
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        cells = line.split(",")
        if len(cells) != n_columns:
            return DataError(
                f"{p}, line {lineno}: {len(cells)} columns where the first row has {n_columns}; "
                "every row needs the same columns"
            )
        for col, cell in enumerate(cells, start=1):
            if not cell.strip():
                return DataError(f"{p}, line {lineno}, column {col}: empty cell; fill in or drop the row")
            if not _is_number(cell):
                return DataError(
                    f"{p}, line {lineno}, column {col}: {cell.strip()!r} is not a number; the CSV must be "
                    "numeric apart from an optional header row"
                )
    return DataError(f"{p}: cannot be read as a numeric CSV ({exc})")


def load_csv(path: PathLike, *, num_classes: int | None = None) -> Dataset:
    """A data set from a numeric comma-separated file, one sample per row.

    An optional first row of column names is recognised by holding something that is not a number. The label
    column is the one named ``label`` when there is such a header, otherwise the last column. Features must
    already lie in [0, 1] (unlike ``uint8`` arrays, CSV values are never rescaled silently).

    Args:
        path: the CSV file.
        num_classes: number of classes; by default ``max(y) + 1``.

    Returns:
        A :class:`Dataset` named after the file, x of shape (N, D).
    """
    p = _existing_file(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{p}: is not a UTF-8 text file; expected a numeric CSV") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DataError(f"{p}: the file is empty; expected rows of comma-separated numbers")
    cells = [c.strip() for c in lines[first].split(",")]
    # A header names its columns; an empty cell alone does not make a header (it is a data row with a gap).
    header = cells if any(c and not _is_number(c) for c in cells) else None
    n_columns = len(cells)
    if n_columns < 2:
        raise DataError(f"{p}: rows have {n_columns} column; expected feature columns and a label column")
    start = first + 1 if header is not None else first
    if not any(line.strip() for line in lines[start:]):
        raise DataError(f"{p}: holds a header row but no data rows")
    try:
        data = np.loadtxt(lines[start:], delimiter=",", comments=None, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise _locate_csv_error(p, lines, start, n_columns, exc) from None
    if data.shape[1] != n_columns:
        raise DataError(f"{p}: the header names {n_columns} columns but the rows have {data.shape[1]}")
    label_col = n_columns - 1
    if header is not None:
        lowered = [h.lower() for h in header]
        if "label" in lowered:
            label_col = lowered.index("label")
    y = data[:, label_col]
    x = np.delete(data, label_col, axis=1)
    return _from_arrays(x, y, num_classes, str(p), p.name)


# ------------------------------------------------------------------------------------------------- dispatch

_SPEC_FORMS = (
    "'digits', 'mnist:DIR' or 'mnist:DIR:train', 'cifar10:DIR' or 'cifar10:DIR:train', "
    "'FILE.npz', 'FILE.csv', 'X.npy,Y.npy', 'digits-seq' (the digits as 8 steps of 8 features)"
)


def _dir_and_split(rest: str) -> tuple[str, str]:
    for split in ("train", "test"):
        if rest.endswith(f":{split}"):
            return rest[: -len(split) - 1], split
    return rest, "test"


def load_data(spec: str) -> Dataset:
    """Load a data set from a short textual description, as the command line does.

    Args:
        spec: one of ``digits``; ``digits-seq`` (:func:`load_digits_sequences`); ``mnist:DIR`` (test split) or
            ``mnist:DIR:train``; ``cifar10:DIR`` or ``cifar10:DIR:train``; a path ending in ``.npz`` or ``.csv``;
            ``X.npy,Y.npy``.

    Returns:
        The loaded :class:`Dataset`.
    """
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string, got {type(spec).__name__}; accepted forms: {_SPEC_FORMS}")
    s = spec.strip()
    lower = s.lower()
    if lower == "digits":
        return load_digits()
    if lower in ("digits-seq", "digits_seq"):
        return load_digits_sequences()
    for prefix, loader in (("mnist:", load_mnist), ("cifar10:", load_cifar10)):
        if lower.startswith(prefix):
            directory, split = _dir_and_split(s[len(prefix) :])
            if not directory:
                raise DataError(f"data spec {spec!r} names no directory; write {prefix}DIR")
            return loader(directory, split)
    parts = [part.strip() for part in s.split(",")]
    if len(parts) == 2 and all(part.lower().endswith(".npy") for part in parts):
        return load_npy(parts[0], parts[1])
    if lower.endswith(".npz"):
        return load_npz(s)
    if lower.endswith(".csv"):
        return load_csv(s)
    raise DataError(f"unknown data spec {spec!r}; accepted forms: {_SPEC_FORMS}")
