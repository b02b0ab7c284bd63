"""Readers for every supported data source.

A source yields uint8 grey-scale images (N, H, W) and integer labels, with an optional
official test split. Nothing is ever downloaded: sources are bundled (scikit-learn digits),
installed by the system package manager (Fashion-MNIST) or the user's own files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeraser.errors import DataError

FASHION_MNIST_DIR = Path(os.environ.get("LMERASER_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# md5 of each .gz as published in the Fashion-MNIST README (the upstream download files).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Debian's package (0.0~git20200523.55506a9-1) ships the upstream git copy, gzipped differently,
# so its .gz md5s differ from the README's; we also accept the md5 of the *decompressed* IDX
# payload, measured from that package, which any re-compression leaves unchanged.
FASHION_MNIST_PAYLOAD_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
SOURCE_HELP = "digits, fashion-mnist, idx:DIR or npz:FILE"


@dataclass(frozen=True)
class RawDataset:
    name: str
    train_images: np.ndarray  # uint8 (N, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    # The data subject of each training sample, when the source knows it (npz `subject_ids`,
    # `subjects.csv` beside IDX files); None: synthetic subjects are drawn at split time.
    train_subjects: np.ndarray | None = None


def load_source(spec: str) -> RawDataset:
    """Read the data source named by `spec` (see SOURCE_HELP)."""
    if spec == "digits":
        return load_digits()
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if spec.startswith("idx:"):
        return load_idx_dir(Path(spec[4:]))
    if spec.startswith("npz:"):
        return load_npz(Path(spec[4:]))
    raise DataError(f"Unknown data source '{spec}'; expected one of {SOURCE_HELP}.")


def load_digits() -> RawDataset:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # 0..16 intensities -> 0..255 uint8, exactly (integer arithmetic, same bytes on every machine).
    images = ((bunch.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
    return RawDataset("digits", images, bunch.target.astype(np.int64))


# -- IDX (the MNIST file format) ---------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), refusing bad magic numbers and truncation."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: unreadable or truncated gzip stream ({error}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX payload has {len(raw) - header} bytes but the header promises {expected} for shape {shape}; the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    return None


def _idx_pair(directory: Path, prefix: str, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        if required:
            missing = f"{prefix}-images-idx3-ubyte[.gz]" if images_path is None else f"{prefix}-labels-idx1-ubyte[.gz]"
            raise DataError(f"{directory}: missing {missing}.")
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    return _check_arrays(images, labels, str(images_path), str(labels_path))


def load_idx_dir(directory: Path) -> RawDataset:
    if not directory.is_dir():
        raise DataError(f"{directory}: IDX source directory not found.")
    train = _idx_pair(directory, "train", required=True)
    test = _idx_pair(directory, "t10k", required=False)
    assert train is not None
    subjects = _subjects_csv(directory / "subjects.csv", len(train[1])) if (directory / "subjects.csv").exists() else None
    return RawDataset(f"idx:{directory}", *train, *(test or (None, None)), subjects)


MAX_SUBJECT_ID = 256


def check_subjects(subjects: np.ndarray, n: int, name: str) -> np.ndarray:
    """One printable, non-empty subject id (at most 256 characters) per training sample."""
    if subjects.ndim != 1 or len(subjects) != n:
        raise DataError(f"{name}: expected one subject id per training sample ({n}), got shape {subjects.shape}.")
    if not (np.issubdtype(subjects.dtype, np.str_) or np.issubdtype(subjects.dtype, np.integer)):
        raise DataError(f"{name}: subject ids must be strings or integers (dtype {subjects.dtype}).")
    out = subjects.astype(str)
    for i, subject in enumerate(out):
        if not subject or len(subject) > MAX_SUBJECT_ID or not subject.isprintable():
            raise DataError(f"{name}: subject id of row {i} must be 1..{MAX_SUBJECT_ID} printable characters.")
    return out


def _subjects_csv(path: Path, n: int) -> np.ndarray:
    """`subjects.csv`: a `subject_id` column, one row per training sample, in file order."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable CSV ({error.__class__.__name__}).") from None
    if "subject_id" not in frame:
        raise DataError(f"{path}: no 'subject_id' column (found {list(frame.columns)[:5]}).")
    return check_subjects(frame["subject_id"].to_numpy(dtype=str), n, str(path))


def load_fashion_mnist(directory: Path | None = None) -> RawDataset:
    directory = directory or FASHION_MNIST_DIR
    missing = [name for name in FASHION_MNIST_MD5 if not (directory / name).exists()]
    if missing:
        raise DataError(f"Fashion-MNIST not found in {directory} (missing {missing[0]}); install it with 'apt-get install dataset-fashion-mnist'.")
    for name, expected in FASHION_MNIST_MD5.items():
        raw = (directory / name).read_bytes()
        if hashlib.md5(raw).hexdigest() == expected:
            continue
        try:
            payload = hashlib.md5(gzip.decompress(raw)).hexdigest()
        except (OSError, EOFError, gzip.BadGzipFile):
            payload = "unreadable"
        if payload != FASHION_MNIST_PAYLOAD_MD5[name]:
            raise DataError(
                f"{directory / name}: checksum does not match the published md5 {expected} "
                f"nor the known payload md5 {FASHION_MNIST_PAYLOAD_MD5[name]}; the file is corrupt or not Fashion-MNIST."
            )
    data = load_idx_dir(directory)
    return RawDataset("fashion-mnist", data.train_images, data.train_labels, data.test_images, data.test_labels)


# -- npz ---------------------------------------------------------------------------------------

_NPZ_KEYS = (("x_train", "y_train"), ("images", "labels"))


def load_npz(path: Path) -> RawDataset:
    if not path.is_file():
        raise DataError(f"{path}: npz file not found.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise DataError(f"{path}: unreadable or truncated npz ({error}).") from None
    for image_key, label_key in _NPZ_KEYS:
        if image_key in arrays:
            if label_key not in arrays:
                raise DataError(f"{path}: has '{image_key}' but no '{label_key}'.")
            train = _check_arrays(arrays[image_key], arrays[label_key], f"{path}:{image_key}", f"{path}:{label_key}")
            test = None
            if "x_test" in arrays or "y_test" in arrays:
                if "x_test" not in arrays or "y_test" not in arrays:
                    raise DataError(f"{path}: 'x_test' and 'y_test' must come together.")
                test = _check_arrays(arrays["x_test"], arrays["y_test"], f"{path}:x_test", f"{path}:y_test")
                if test[0].shape[1:] != train[0].shape[1:]:
                    raise DataError(f"{path}: x_test images are {test[0].shape[1:]} but training images are {train[0].shape[1:]}.")
            subjects = check_subjects(arrays["subject_ids"], len(train[1]), f"{path}:subject_ids") if "subject_ids" in arrays else None
            return RawDataset(f"npz:{path}", *train, *(test or (None, None)), subjects)
    raise DataError(f"{path}: expected keys 'x_train'/'y_train' or 'images'/'labels', found {sorted(arrays)}.")


def _check_arrays(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise DataError(f"{images_name}: images must have shape (N, H, W) or (N, H, W, 1), got {images.shape}.")
    if labels.ndim != 1:
        raise DataError(f"{labels_name}: labels must be one-dimensional, got shape {labels.shape}.")
    if len(images) != len(labels):
        raise DataError(f"{images_name}: {len(images)} images but {labels_name} has {len(labels)} labels.")
    if len(images) == 0:
        raise DataError(f"{images_name}: no samples.")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise DataError(f"{images_name}: pixels must be integers in 0..255 (dtype {images.dtype}).")
        images = images.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{labels_name}: labels must be non-negative integers (dtype {labels.dtype}).")
    return np.ascontiguousarray(images), labels.astype(np.int64)
