import numpy as np
import pandas as pd
import pytest

from lmeraser.config import DataParams
from lmeraser.data.splits import init_data
from lmeraser.data.validation import validate_splits
from lmeraser.workspace import Workspace


@pytest.fixture
def data_dir(tmp_path):
    init_data(DataParams(subset=300), 0, Workspace(tmp_path))
    return tmp_path / "data"


def _validate(data_dir):
    return validate_splits(Workspace(data_dir.parent))


def test_clean_splits_pass_and_write_data_docs(data_dir):
    report = _validate(data_dir)
    assert report.success, report.failures
    assert report.docs_index.exists() and report.statistics["failed"] == 0


def _edit_manifest(data_dir, split, fn):
    path = data_dir / split / "manifest.csv"
    frame = pd.read_csv(path, dtype=str)
    fn(frame)
    frame.to_csv(path, index=False)


def test_id_in_two_splits_fails(data_dir):
    public_id = pd.read_csv(data_dir / "public" / "manifest.csv", dtype=str)["sample_id"][0]
    _edit_manifest(data_dir, "test", lambda f: f.__setitem__("sample_id", [public_id] + f["sample_id"].tolist()[1:]))
    report = _validate(data_dir)
    assert not report.success
    assert "expect_column_values_to_be_unique(column=sample_id)" in report.reason()
    assert str(report.docs_index) in report.reason()


def test_tombstoned_id_fails(data_dir):
    victim = pd.read_csv(data_dir / "private" / "manifest.csv", dtype=str).iloc[0]
    pd.DataFrame([{"sample_id": victim.sample_id, "content_hash": victim.content_hash}]).to_csv(data_dir / "tombstones.csv", index=False)
    report = _validate(data_dir)
    assert not report.success
    assert any("not_be_in_set(column=sample_id)" in f for f in report.failures)


def test_missing_class_in_a_split_fails(data_dir):
    path = data_dir / "test" / "manifest.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[frame["label"] == "3", "label"] = "4"
    frame.to_csv(path, index=False)
    report = _validate(data_dir)
    assert not report.success
    assert any("distinct_values_to_contain_set" in f and "test" in f for f in report.failures)


def test_pixels_not_matching_content_hash_fail(data_dir):
    images = np.load(data_dir / "private" / "images.npy")
    images[0, 0, 0] ^= 0xFF
    np.save(data_dir / "private" / "images.npy", images)
    report = _validate(data_dir)
    assert not report.success
    assert any("hash_matches" in f for f in report.failures)


def test_label_out_of_domain_fails(data_dir):
    _edit_manifest(data_dir, "public", lambda f: f.__setitem__("label", ["12"] + f["label"].tolist()[1:]))
    report = _validate(data_dir)
    assert any("column=label" in f and "between" in f for f in report.failures)
