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


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x_train": np.zeros((4, 5)), "y_train": np.zeros(4, int)}, "shape (N, H, W)"),
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
        assert md5 in (hashlib.md5(gzip.decompress(raw)).hexdigest(),) or hashlib.md5(raw).hexdigest() == sources.FASHION_MNIST_MD5[name]
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
