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


def test_tombstoned_samples_fail_without_the_data_docs_naming_them(data_dir):
    """A forgotten id and a replaced image's content, both back in the data: the suite fails, and
    neither its message nor the published data docs name the id or hash (a membership oracle)."""
    from lmeraser.salt import Keyer

    ws = Workspace(data_dir.parent)
    private = pd.read_csv(data_dir / "private" / "manifest.csv", dtype=str)
    victim, replaced = private.iloc[0], private.iloc[1]
    rows = [
        {"sample_id": victim.sample_id, "content_key": Keyer(ws).content(victim.content_hash), "reason": "forget", "label": ""},
        {"sample_id": "", "content_key": Keyer(ws).content(replaced.content_hash), "reason": "rectify-input", "label": ""},
    ]
    pd.DataFrame(rows).to_csv(data_dir / "tombstones.csv", index=False)
    report = _validate(data_dir)
    assert not report.success
    assert any("column=suppressed" in f and "failed on 2 row(s)" in f for f in report.failures), report.failures
    published = report.reason() + "".join(p.read_text(errors="ignore") for p in ws.data_docs.rglob("*") if p.is_file())
    for secret in (victim.sample_id, victim.content_hash, replaced.sample_id, replaced.content_hash):
        assert secret not in published


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


def test_only_splits_whose_files_changed_have_their_images_checked_again(data_dir):
    """Incremental validation: the image facts of an unchanged split come from the cache, every
    row of every split is still checked by the suite, and a changed file is never masked."""
    ws = Workspace(data_dir.parent)
    first = validate_splits(ws)
    assert first.success and first.statistics["facts_reused"] == []
    again = validate_splits(ws)
    assert again.success and again.statistics["facts_reused"] == ["public", "private", "test"]
    assert again.statistics["rows"] == first.statistics["rows"] and again.statistics["evaluated"] == first.statistics["evaluated"]
    from lmeraser.data.splits import remove_samples

    remove_samples([ws.split("private").sample_ids[0]], "private", ws)
    after_forget = validate_splits(ws)
    assert after_forget.success and after_forget.statistics["facts_reused"] == ["public", "test"]
    # Flipped pixels in a split checked before: its files changed, so it is checked again and fails.
    images = np.load(data_dir / "test" / "images.npy")
    images[0, 0, 0] ^= 0xFF
    np.save(data_dir / "test" / "images.npy", images)
    tampered = validate_splits(ws)
    assert not tampered.success and any("hash_matches" in f for f in tampered.failures)
    assert tampered.statistics["facts_reused"] == ["public", "private"]
    # A tombstone is checked against every row, reused facts or not.
    from lmeraser.data.splits import add_tombstones

    add_tombstones([{"sample_id": ws.split("public").sample_ids[0], "content_key": "", "reason": "forget"}], ws)
    assert any("suppressed" in f for f in validate_splits(ws).failures)
