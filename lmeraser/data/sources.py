"""Readers for every supported data source.

A source yields uint8 images, grey (N, H, W) or RGB (N, H, W, 3), and integer labels, with an
optional official test split. Nothing is ever downloaded: sources are bundled (scikit-learn digits),
installed by the system package manager (Fashion-MNIST) or the user's own files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeraser.errors import DataError, LmeraserError, shown

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
SOURCE_HELP = "digits, fashion-mnist, idx:DIR, npz:FILE, folder:DIR, cifar10:DIR or cifar100:DIR"
# Every source file is read whole, so each is bounded: a data file (IDX, npz, CIFAR batch) and what
# it decompresses to at most MAX_DATA_FILE bytes, an image or a subjects.csv at most MAX_SMALL_FILE.
MAX_DATA_FILE = 4 << 30
MAX_SMALL_FILE = 64 << 20
# Labels are class indices below MAX_CLASSES (a classifier head has one output per class).
MAX_CLASSES = 100_000


def read_source_file(path: Path, what: str, limit: int = MAX_DATA_FILE) -> bytes:
    """A source file's bytes: a regular file of at most `limit` bytes (a FIFO, device, directory,
    a name the system refuses or an unreadable file is one sentence naming it)."""
    from lmeraser.io import read_input_bytes

    try:
        return read_input_bytes(path, what, limit)
    except LmeraserError as error:
        raise DataError(str(error)) from None
    except OSError as error:
        raise DataError(
            f"{shown(path, 200)}: {what} cannot be read ({error.strerror or error.__class__.__name__})."
        ) from None


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`, False for a name the system refuses (too long, ...) instead of an OSError."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


@dataclass(frozen=True)
class RawDataset:
    name: str
    train_images: np.ndarray  # uint8 (N, H, W) grey or (N, H, W, 3) RGB
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    # The data subject of each training sample, when the source knows it (npz `subject_ids`,
    # `subjects.csv` beside IDX files); None: synthetic subjects are drawn at split time.
    train_subjects: np.ndarray | None = None


def load_source(spec: str, image_size: int | None = None) -> RawDataset:
    """Read the data source named by `spec` (see SOURCE_HELP); with `image_size`, every image is
    resized to image_size x image_size (a folder of differently sized images needs it)."""
    if spec == "digits":
        raw = load_digits()
    elif spec == "fashion-mnist":
        raw = load_fashion_mnist()
    elif spec.startswith("idx:"):
        raw = load_idx_dir(Path(spec[4:]))
    elif spec.startswith("npz:"):
        raw = load_npz(Path(spec[4:]))
    elif spec.startswith("folder:"):
        return load_folder(Path(spec[7:]), image_size)
    elif spec.startswith("cifar10:"):
        raw = load_cifar(Path(spec[8:]), 10)
    elif spec.startswith("cifar100:"):
        raw = load_cifar(Path(spec[9:]), 100)
    else:
        raise DataError(f"Unknown data source '{spec}'; expected one of {SOURCE_HELP}.")
    if image_size is None:
        return raw
    test = None if raw.test_images is None else resize(raw.test_images, image_size)
    return RawDataset(
        raw.name, resize(raw.train_images, image_size), raw.train_labels, test, raw.test_labels, raw.train_subjects
    )


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images resized to size x size with Pillow's bilinear filter (deterministic)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    mode = "L" if images.ndim == 3 else "RGB"
    return np.stack(
        [np.asarray(Image.fromarray(image, mode).resize((size, size), Image.Resampling.BILINEAR)) for image in images]
    )


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
    raw = read_source_file(path, "IDX file")
    if path.suffix == ".gz":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
                raw = stream.read(MAX_DATA_FILE + 1)
        except (OSError, EOFError, gzip.BadGzipFile) as error:
            raise DataError(f"{path}: unreadable or truncated gzip stream ({error}).") from None
        if len(raw) > MAX_DATA_FILE:
            raise DataError(f"{path}: decompresses to more than {MAX_DATA_FILE} bytes, the limit for a data file.")
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
            f"{path}: IDX payload has {len(raw) - header} bytes but the header promises {expected} for shape {shape}; "
            "the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if _exists(directory / name):
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
    if not _is_dir(directory):
        raise DataError(f"{shown(directory, 200)}: IDX source directory not found.")
    train = _idx_pair(directory, "train", required=True)
    test = _idx_pair(directory, "t10k", required=False)
    assert train is not None
    subjects = (
        _subjects_csv(directory / "subjects.csv", len(train[1])) if (directory / "subjects.csv").exists() else None
    )
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


def _subjects_table(path: Path, columns: tuple[str, ...]):
    """A `subjects.csv` as strings, refused in one sentence when unreadable or missing a column."""
    import pandas as pd

    raw = read_source_file(path, "subjects file", MAX_SMALL_FILE)
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable CSV ({error.__class__.__name__}).") from None
    for column in columns:
        if column not in frame:
            raise DataError(f"{path}: no '{column}' column (found {list(frame.columns)[:5]}).")
    return frame


def _subjects_csv(path: Path, n: int) -> np.ndarray:
    """`subjects.csv`: a `subject_id` column, one row per training sample, in file order."""
    return check_subjects(_subjects_table(path, ("subject_id",))["subject_id"].to_numpy(dtype=str), n, str(path))


def load_fashion_mnist(directory: Path | None = None) -> RawDataset:
    directory = directory or FASHION_MNIST_DIR
    missing = [name for name in FASHION_MNIST_MD5 if not (directory / name).exists()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {directory} (missing {missing[0]}); "
            "install it with 'apt-get install dataset-fashion-mnist'."
        )
    for name, expected in FASHION_MNIST_MD5.items():
        raw = read_source_file(directory / name, "Fashion-MNIST file")
        if hashlib.md5(raw).hexdigest() == expected:
            continue
        try:
            payload = hashlib.md5(gzip.decompress(raw)).hexdigest()
        except (OSError, EOFError, gzip.BadGzipFile):
            payload = "unreadable"
        if payload != FASHION_MNIST_PAYLOAD_MD5[name]:
            raise DataError(
                f"{directory / name}: checksum does not match the published md5 {expected} "
                f"nor the known payload md5 {FASHION_MNIST_PAYLOAD_MD5[name]}; "
                "the file is corrupt or not Fashion-MNIST."
            )
    data = load_idx_dir(directory)
    return RawDataset("fashion-mnist", data.train_images, data.train_labels, data.test_images, data.test_labels)


# -- an image folder -----------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image

    raw = read_source_file(path, "image", MAX_SMALL_FILE)
    try:
        with Image.open(io.BytesIO(raw)) as picture:
            picture.load()
            return np.asarray(
                picture.convert("L") if picture.mode in ("L", "1") else picture.convert("RGB")
            ), picture.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable PNG or JPEG image ({error.__class__.__name__}).") from None


def _class_tree(directory: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under directory/<class>/, classes in sorted order; (files, labels, classes)."""
    found = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{directory / unknown[0]}: class folder not in the training classes {classes[:5]}.")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = directory / name
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    files.append(path)
                    labels.append(label)
    if not files:
        raise DataError(
            f"{directory}: no .png/.jpg/.jpeg images in class subfolders (expected {directory}/<class>/<image>)."
        )
    return files, labels, classes


def _folder_images(files: list[Path], decoded: list[np.ndarray], image_size: int | None, rgb: bool) -> np.ndarray:
    images = []
    for path, image in zip(files, decoded, strict=True):
        if rgb and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image_size is not None:
            image = resize(image[None], image_size)[0]
        elif images and image.shape != images[0].shape:
            raise DataError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, "
                f"the others {images[0].shape[1]}x{images[0].shape[0]}; set data.image_size."
            )
        images.append(image)
    return np.stack(images)


def load_folder(directory: Path, image_size: int | None = None) -> RawDataset:
    """`folder:DIR`: one subfolder per class (labels in sorted folder-name order), PNG or JPEG,
    or `DIR/train/<class>` and `DIR/test/<class>` for an official test split. All-grey images
    give grey data; otherwise every image is read as RGB (a grey one repeated over the channels,
    alpha dropped). Optional `DIR/subjects.csv` with columns `file` (relative to DIR) and
    `subject_id`, a row for every training image."""
    if not _is_dir(directory):
        raise DataError(f"{shown(directory, 200)}: image folder not found.")
    train_dir = directory / "train" if (directory / "train").is_dir() else directory
    files, labels, classes = _class_tree(train_dir, None)
    test_files, test_labels = [], []
    if train_dir != directory and (directory / "test").is_dir():
        test_files, test_labels, _ = _class_tree(directory / "test", classes)
    decoded = [_read_image(path) for path in files + test_files]  # each image decoded once
    rgb = not {mode for _, mode in decoded} <= {"L", "1"}
    pixels = [image for image, _ in decoded]
    train = _folder_images(files, pixels[: len(files)], image_size, rgb)
    test = _folder_images(test_files, pixels[len(files) :], image_size, rgb) if test_files else None
    if test is not None and test.shape[1:] != train.shape[1:]:
        raise DataError(
            f"{directory / 'test'}: images are {test.shape[1:]} but training images are {train.shape[1:]}; "
            "set data.image_size."
        )
    subjects = None
    if (directory / "subjects.csv").exists():
        subjects = _folder_subjects(
            directory / "subjects.csv", [path.relative_to(directory).as_posix() for path in files]
        )
    return RawDataset(
        f"folder:{directory}",
        train,
        np.asarray(labels, dtype=np.int64),
        test,
        None if test is None else np.asarray(test_labels, dtype=np.int64),
        subjects,
    )


def _folder_subjects(path: Path, files: list[str]) -> np.ndarray:
    """A folder's `subjects.csv`: `file` (relative to the folder) and `subject_id` columns."""
    frame = _subjects_table(path, ("file", "subject_id"))
    by_file = dict(zip(frame["file"], frame["subject_id"], strict=True))
    missing = [name for name in files if name not in by_file]
    if missing:
        raise DataError(f"{path}: no subject for training image {missing[0]}.")
    return check_subjects(np.asarray([by_file[name] for name in files], dtype=str), len(files), str(path))


# -- CIFAR-10 / CIFAR-100, binary distribution -------------------------------------------------

_CIFAR = {
    10: {
        "folder": "cifar-10-batches-bin",
        "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test": "test_batch.bin",
        "label_bytes": 1,
    },
    100: {"folder": "cifar-100-binary", "train": ["train.bin"], "test": "test.bin", "label_bytes": 2},
}


def _cifar_records(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + 3072
    raw = read_source_file(path, "CIFAR batch file")
    if len(raw) == 0 or len(raw) % record:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR records; "
            "the file is truncated or not CIFAR binary."
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label (the second byte)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar(directory: Path, classes: int) -> RawDataset:
    """`cifar10:DIR` / `cifar100:DIR`: the official *binary* distribution (DIR is the extracted
    folder or its parent), never the pickled Python one, which is refused."""
    spec = _CIFAR[classes]
    if _is_dir(directory / spec["folder"]):
        directory = directory / spec["folder"]
    if not _is_dir(directory):
        raise DataError(f"{shown(directory, 200)}: CIFAR-{classes} folder not found.")
    if (
        (directory / "data_batch_1").exists()
        or (directory / "train").is_file()
        and not (directory / "train.bin").exists()
    ):
        raise DataError(
            f"{directory}: this is CIFAR-{classes}'s Python (pickled) distribution, which lmeraser never unpickles; "
            f"use the binary version ({spec['folder']})."
        )
    missing = [name for name in [*spec["train"], spec["test"]] if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory}: missing {missing[0]} (the CIFAR-{classes} binary distribution).")
    parts = [_cifar_records(directory / name, spec["label_bytes"]) for name in spec["train"]]
    test_images, test_labels = _cifar_records(directory / spec["test"], spec["label_bytes"])
    train_labels = np.concatenate([p[1] for p in parts])
    if train_labels.max() >= classes or test_labels.max() >= classes:
        raise DataError(f"{directory}: labels above {classes - 1}; is this CIFAR-{classes}?")
    return RawDataset(
        f"cifar{classes}:{directory}", np.concatenate([p[0] for p in parts]), train_labels, test_images, test_labels
    )


# -- npz ---------------------------------------------------------------------------------------

_NPZ_KEYS = (("x_train", "y_train"), ("images", "labels"))


def load_npz(path: Path) -> RawDataset:
    if not _exists(path):
        raise DataError(f"{shown(path, 200)}: npz file not found.")
    raw = read_source_file(path, "npz file")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            # A zip member's declared size bounds what reading it allocates (a zip bomb is refused).
            unpacked = sum(info.file_size for info in archive.zip.infolist())
            if unpacked > MAX_DATA_FILE:
                raise DataError(
                    f"{shown(path, 200)}: its arrays unpack to {unpacked} bytes, "
                    f"over the limit of {MAX_DATA_FILE} for a data file."
                )
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise DataError(f"{shown(path, 200)}: unreadable or truncated npz ({shown(error, 200)}).") from None
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
                    raise DataError(
                        f"{path}: x_test images are {test[0].shape[1:]} but training images are {train[0].shape[1:]}."
                    )
            subjects = (
                check_subjects(arrays["subject_ids"], len(train[1]), f"{path}:subject_ids")
                if "subject_ids" in arrays
                else None
            )
            return RawDataset(f"npz:{path}", *train, *(test or (None, None)), subjects)
    raise DataError(f"{path}: expected keys 'x_train'/'y_train' or 'images'/'labels', found {sorted(arrays)}.")


def _check_arrays(
    images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str
) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 and not (images.ndim == 4 and images.shape[-1] == 3):
        raise DataError(
            f"{images_name}: images must have shape (N, H, W) (grey), (N, H, W, 1) or (N, H, W, 3) (RGB), "
            f"got {images.shape}."
        )
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
    if labels.max() >= MAX_CLASSES:
        raise DataError(
            f"{labels_name}: label {int(labels.max())} is too large; labels are class indices below {MAX_CLASSES}."
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)
