import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from lmeraser.data import sources
from lmeraser.data.sources import load_source, read_idx
from lmeraser.errors import DataError


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_dir(directory: Path, n: int = 30, with_test: bool = True, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 6, 6)), gz)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", np.arange(n) % 3, gz)
    if with_test:
        write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (9, 6, 6)), gz)
        write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", np.arange(9) % 3, gz)
    return directory


def test_digits_is_bundled_and_scaled():
    data = load_source("digits")
    assert data.train_images.shape == (1797, 8, 8)
    assert data.train_images.dtype == np.uint8
    assert data.train_images.max() == 255 and data.train_images.min() == 0
    assert set(np.unique(data.train_labels)) == set(range(10))
    assert data.test_images is None


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    data = load_source(f"idx:{make_idx_dir(tmp_path / 'idx', gz=gz)}")
    assert data.train_images.shape == (30, 6, 6)
    assert data.test_images.shape == (9, 6, 6)
    assert data.train_labels.tolist()[:4] == [0, 1, 2, 0]


def test_truncated_idx_names_the_file(tmp_path):
    directory = make_idx_dir(tmp_path / "idx", gz=False)
    target = directory / "train-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(DataError) as info:
        load_source(f"idx:{directory}")
    assert str(target) in str(info.value) and "truncated" in str(info.value)


def test_truncated_gzip_and_bad_magic(tmp_path):
    directory = make_idx_dir(tmp_path / "idx")
    target = directory / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(target)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(junk)


def test_idx_mismatched_counts(tmp_path):
    directory = make_idx_dir(tmp_path / "idx", with_test=False)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(29) % 3)
    with pytest.raises(DataError, match="30 images but"):
        load_source(f"idx:{directory}")


def test_idx_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing train-images"):
        load_source(f"idx:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="not found"):
        load_source(f"idx:{tmp_path / 'absent'}")


def test_npz_sources(tmp_path):
    rng = np.random.default_rng(1)
    good = tmp_path / "good.npz"
    np.savez(
        good,
        x_train=rng.integers(0, 256, (20, 5, 5), dtype=np.uint8),
        y_train=np.arange(20) % 2,
        x_test=rng.integers(0, 256, (4, 5, 5), dtype=np.uint8),
        y_test=np.arange(4) % 2,
    )
    data = load_source(f"npz:{good}")
    assert data.train_images.shape == (20, 5, 5) and data.test_labels.tolist() == [0, 1, 0, 1]
    channel = tmp_path / "channel.npz"
    np.savez(channel, images=rng.integers(0, 256, (6, 5, 5, 1)), labels=np.zeros(6, dtype=int))
    assert load_source(f"npz:{channel}").train_images.shape == (6, 5, 5)
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8), labels=np.zeros(6, dtype=int))
    assert load_source(f"npz:{rgb}").train_images.shape == (6, 5, 5, 3)
    assert load_source(f"npz:{rgb}", image_size=8).train_images.shape == (6, 8, 8, 3)  # data.image_size


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x_train": np.zeros((4, 5)), "y_train": np.zeros(4, int)}, "shape (N, H, W)"),
        (
            {"x_train": np.zeros((4, 5, 5, 4), np.uint8), "y_train": np.zeros(4, int)},
            "(N, H, W, 3) (RGB), got (4, 5, 5, 4)",
        ),
        ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.zeros(3, int)}, "4 images but"),
        ({"x_train": np.full((4, 5, 5), 300), "y_train": np.zeros(4, int)}, "0..255"),
        ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.full(4, -1)}, "non-negative"),
        ({"pixels": np.zeros((4, 5, 5), np.uint8)}, "expected keys"),
        ({"x_train": np.zeros((4, 5, 5), np.uint8)}, "no 'y_train'"),
    ],
)
def test_npz_bad_shapes(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_source(f"npz:{path}")


def test_truncated_npz(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez(path, x_train=np.zeros((50, 5, 5), np.uint8), y_train=np.zeros(50, int))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="unreadable or truncated npz"):
        load_source(f"npz:{path}")


def test_unknown_source_is_named():
    with pytest.raises(DataError, match="Unknown data source 'mnist'"):
        load_source("mnist")


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist")


def test_fashion_mnist_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    for name in sources.FASHION_MNIST_MD5:
        (tmp_path / name).write_bytes(b"not the real file")
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="checksum does not match the published md5"):
        load_source("fashion-mnist")


def test_fashion_mnist_from_the_debian_package():
    # .ci/run installs Debian's dataset-fashion-mnist; without it this fails, it is not skipped.
    for name, md5 in sources.FASHION_MNIST_PAYLOAD_MD5.items():
        raw = (sources.FASHION_MNIST_DIR / name).read_bytes()
        assert (
            md5 in (hashlib.md5(gzip.decompress(raw)).hexdigest(),)
            or hashlib.md5(raw).hexdigest() == sources.FASHION_MNIST_MD5[name]
        )
    data = load_source("fashion-mnist")
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert set(np.unique(data.train_labels)) == set(range(10))


def test_sources_carry_real_subject_ids(tmp_path):
    """A source that knows its data subjects keeps them (npz `subject_ids`, `subjects.csv` beside
    IDX files); synthetic subjects only when it does not."""
    from lmeraser.config import DataParams
    from lmeraser.data.splits import init_data
    from lmeraser.workspace import Workspace

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), np.arange(40) % 4
    subjects = np.array([f"customer-{i // 3}" for i in range(40)])
    np.savez(tmp_path / "with.npz", x_train=images, y_train=labels, subject_ids=subjects)
    ws = Workspace(tmp_path / "npz")
    init_data(DataParams(source=f"npz:{tmp_path / 'with.npz'}", test_fraction=0.25), 0, ws)
    private = ws.manifest("private")
    assert private["subject_id"].str.startswith("customer-").all()
    from lmeraser.data.splits import content_hash

    source = load_source(f"npz:{tmp_path / 'with.npz'}")
    by_content = dict(zip([content_hash(i) for i in source.train_images], subjects))
    assert all(by_content[h] == s for h, s in zip(private["content_hash"], private["subject_id"]))

    idx = make_idx_dir(tmp_path / "idx", n=30)
    (idx / "subjects.csv").write_text("subject_id\n" + "".join(f"p{i % 7}\n" for i in range(30)))
    assert list(load_source(f"idx:{idx}").train_subjects[:3]) == ["p0", "p1", "p2"]
    (idx / "subjects.csv").write_text("subject_id\n" + "p1\n" * 29)
    with pytest.raises(DataError, match=r"subjects.csv: expected one subject id per training sample \(30\)"):
        load_source(f"idx:{idx}")
    np.savez(tmp_path / "bad.npz", x_train=images, y_train=labels, subject_ids=np.array(["ok"] * 39 + ["bad\x1b[31m"]))
    with pytest.raises(DataError, match="row 39 must be 1..256 printable characters"):
        load_source(f"npz:{tmp_path / 'bad.npz'}")


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_an_image_folder_with_a_test_split_and_subjects(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    for i, image in enumerate(images[:4]):
        _png(tmp_path / "train" / ("cat" if i % 2 else "ant") / f"{i}.png", image)
    _png(tmp_path / "train" / "cat" / "grey.png", images[4, ..., 0])  # a grey one among RGB: repeated over the channels
    _png(tmp_path / "test" / "ant" / "t.png", images[5])
    (tmp_path / "subjects.csv").write_text(
        "file,subject_id\n"
        + "".join(
            f"train/{c}/{n},s{n}\n"
            for c, n in [("ant", "0.png"), ("ant", "2.png"), ("cat", "1.png"), ("cat", "3.png"), ("cat", "grey.png")]
        )
    )
    data = load_source(f"folder:{tmp_path}")
    assert data.train_images.shape == (5, 10, 12, 3) and data.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(data.train_images[0], images[0]) and np.array_equal(data.test_images[0], images[5])
    assert np.array_equal(data.train_images[4], np.repeat(images[4, ..., :1], 3, axis=2))
    assert data.train_subjects.tolist() == ["s0.png", "s2.png", "s1.png", "s3.png", "sgrey.png"]
    assert load_source(f"folder:{tmp_path}", image_size=8).train_images.shape == (5, 8, 8, 3)
    # Refusals, one sentence each.
    (tmp_path / "subjects.csv").write_text("file,subject_id\ntrain/ant/0.png,a\n")
    with pytest.raises(DataError, match="no subject for training image train/ant/2.png"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "subjects.csv").unlink()
    _png(tmp_path / "train" / "ant" / "big.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="big.png: image is 20x20, the others 12x10; set data.image_size"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "train" / "ant" / "big.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="big.png: not a readable PNG or JPEG"):
        load_source(f"folder:{tmp_path}")
    _png(tmp_path / "test" / "bee" / "x.png", images[0])
    (tmp_path / "train" / "ant" / "big.png").unlink()
    with pytest.raises(DataError, match="bee: class folder not in the training classes"):
        load_source(f"folder:{tmp_path}")


def test_an_all_grey_folder_gives_grey_data(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        _png(tmp_path / str(i % 2) / f"{i}.png", rng.integers(0, 256, (7, 7), dtype=np.uint8))
    data = load_source(f"folder:{tmp_path}")
    assert data.train_images.shape == (4, 7, 7) and data.test_images is None
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images"):
        (tmp_path / "empty" / "a").mkdir(parents=True)
        load_source(f"folder:{tmp_path / 'empty'}")


def _cifar_file(path: Path, labels: list[int], label_bytes: int, rng) -> np.ndarray:
    pixels = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    rows = [bytes([0] * (label_bytes - 1) + [label]) + image.tobytes() for label, image in zip(labels, pixels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(rows))
    return pixels.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_binary_distribution(tmp_path, classes):
    rng = np.random.default_rng(classes)
    folder = tmp_path / ("cifar-10-batches-bin" if classes == 10 else "cifar-100-binary")
    label_bytes = 1 if classes == 10 else 2
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if classes == 10 else ["train.bin"]
    first = [
        _cifar_file(folder / name, [i % classes, (i + 7) % classes], label_bytes, rng) for i, name in enumerate(names)
    ][0]
    test = _cifar_file(folder / ("test_batch.bin" if classes == 10 else "test.bin"), [classes - 1], label_bytes, rng)
    data = load_source(f"cifar{classes}:{tmp_path}")  # the parent of the extracted folder also works
    assert data.train_images.shape == (2 * len(names), 32, 32, 3) and data.train_labels[:2].tolist() == [0, 7 % classes]
    assert (
        np.array_equal(data.train_images[:2], first)
        and np.array_equal(data.test_images, test)
        and data.test_labels.tolist() == [classes - 1]
    )
    with open(folder / names[0], "ab") as handle:
        handle.write(b"x")
    with pytest.raises(DataError, match="not a whole number of .*-byte CIFAR records"):
        load_source(f"cifar{classes}:{folder}")


def test_the_pickled_cifar_distribution_is_refused(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04 pickled")
    with pytest.raises(DataError, match="Python \\(pickled\\) distribution, which lmeraser never unpickles"):
        load_source(f"cifar10:{tmp_path}")
    (tmp_path / "bin").mkdir()
    with pytest.raises(DataError, match="missing data_batch_1.bin"):
        load_source(f"cifar10:{tmp_path / 'bin'}")


# -- issue 21: every source file regular and bounded, labels bounded ---------------------------


def _within(seconds: int, call):
    """`call()`, failing the test instead of hanging when it blocks (a FIFO nobody writes to)."""
    import signal

    def hung(*_):
        raise AssertionError(f"no answer in {seconds} s: the reader blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_an_idx_file_that_is_no_regular_file_is_refused_without_reading(tmp_path, kind):
    import os

    directory = make_idx_dir(tmp_path / "idx", gz=False)
    images = directory / "train-images-idx3-ubyte"
    images.unlink()
    if kind == "fifo":
        os.mkfifo(images)
    elif kind == "dev-zero":
        images.symlink_to("/dev/zero")
    else:
        images.mkdir()
    with pytest.raises(DataError) as refused:
        _within(20, lambda: load_source(f"idx:{directory}"))
    assert str(refused.value) == f"{images}: IDX file is not a regular file (a directory, FIFO or device)."


def test_a_subjects_file_that_is_a_fifo_is_refused(tmp_path):
    import os

    directory = make_idx_dir(tmp_path / "idx")
    os.mkfifo(directory / "subjects.csv")
    with pytest.raises(DataError, match="subjects.csv: subjects file is not a regular file"):
        _within(20, lambda: load_source(f"idx:{directory}"))


def test_labels_are_bounded_class_indices(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "huge.npz", x_train=images, y_train=np.array([0, 1, 2**40]))
    with pytest.raises(DataError) as refused:
        load_source(f"npz:{tmp_path / 'huge.npz'}")
    assert str(refused.value) == (
        f"{tmp_path / 'huge.npz'}:y_train: label {2**40} is too large; "
        f"labels are class indices below {sources.MAX_CLASSES}."
    )
    np.savez(tmp_path / "fine.npz", x_train=images, y_train=np.array([0, 1, sources.MAX_CLASSES - 1]))
    assert load_source(f"npz:{tmp_path / 'fine.npz'}").train_labels.max() == sources.MAX_CLASSES - 1


@pytest.mark.parametrize("spec", ["npz:", "idx:", "folder:", "cifar10:"])
def test_a_source_path_too_long_for_the_system_is_one_sentence(spec):
    with pytest.raises(DataError) as refused:
        load_source(spec + "/" + "a" * 5000)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300 and "not found" in message
