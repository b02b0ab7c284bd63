import numpy as np
import pytest

from lmeraser.config import DataParams
from lmeraser.data import splits as splits_module
from lmeraser.data.splits import content_hash, init_data, remove_samples
from lmeraser.errors import DataError
from lmeraser.workspace import SPLITS, Workspace


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_init_is_byte_deterministic(tmp_path):
    init_data(DataParams(), 0, Workspace(tmp_path / "a"))
    init_data(DataParams(), 0, Workspace(tmp_path / "b"))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    init_data(DataParams(), 1, Workspace(tmp_path / "c"))
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_splits_are_disjoint_stratified_and_sorted(tmp_path):
    summary = init_data(DataParams(n_subjects=7), 0, Workspace(tmp_path))
    seen = set()
    for split in SPLITS:
        part = Workspace(tmp_path).split(split)
        ids = part.sample_ids
        assert ids == sorted(ids)
        assert not seen & set(ids)
        seen |= set(ids)
        assert set(part.labels) == set(range(10)), split
        assert [content_hash(img) for img in part.images[:20]] == part.manifest["content_hash"][:20].tolist()
    assert len(seen) == 1797 == sum(summary["counts"].values())
    private = Workspace(tmp_path).split("private").manifest
    assert private["subject_id"].str.fullmatch(r"s\d{5}").all()
    assert private["subject_id"].nunique() == 7


def test_subset_and_official_test_split(tmp_path):
    summary = init_data(DataParams(subset=300), 0, Workspace(tmp_path))
    assert summary["counts"]["public"] + summary["counts"]["private"] == 300
    assert summary["counts"]["public"] == 150
    # A source with an official test split keeps it whole as the test split.
    from test_sources import make_idx_dir

    idx = make_idx_dir(tmp_path / "idx", n=60)
    summary = init_data(DataParams(source=f"idx:{idx}", public_fraction=0.5), 0, Workspace(tmp_path / "idx-ws"))
    assert summary["counts"] == {"public": 30, "private": 30, "test": 9}


def test_failed_init_leaves_previous_data_intact(tmp_path, monkeypatch):
    init_data(DataParams(), 0, Workspace(tmp_path))
    before = _files(tmp_path / "data")
    calls = {"n": 0}
    real = splits_module.write_split

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(splits_module, "write_split", crash_on_second)
    with pytest.raises(OSError):
        init_data(DataParams(), 5, Workspace(tmp_path))
    assert _files(tmp_path / "data") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data")]


def test_bad_source_writes_nothing(tmp_path):
    with pytest.raises(DataError):
        init_data(DataParams(source="nope"), 0, Workspace(tmp_path))
    assert not (tmp_path / "data").exists()


def test_remove_samples(tmp_path):
    init_data(DataParams(), 0, Workspace(tmp_path))
    private = Workspace(tmp_path).split("private")
    victims = private.sample_ids[3:5]
    removed = remove_samples(victims, "private", Workspace(tmp_path))
    assert removed["sample_id"].tolist() == victims
    after = Workspace(tmp_path).split("private")
    assert len(after) == len(private) - 2 and not set(victims) & set(after.sample_ids)
    keep = ~private.manifest["sample_id"].isin(victims).to_numpy()
    assert np.array_equal(after.images, private.images[keep])
    with pytest.raises(DataError, match="not in data/private"):
        remove_samples(["deadbeef"], "private", Workspace(tmp_path))


def test_re_ingestion_keeps_erased_samples_out_and_corrections_in(tmp_path):
    """The suppression list survives `data init`: what was forgotten stays out, a corrected label
    stays corrected, a replaced image's old pixels stay out; tombstones are its copy."""
    from lmeraser import suppression
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    init_data(DataParams(), 0, ws)
    private = ws.split("private").manifest
    forgotten, relabelled, replaced = private.iloc[0], private.iloc[1], private.iloc[2]
    keyer = Keyer(ws)
    new_label = (int(relabelled.label) + 1) % 10
    rows = [
        {"sample_id": forgotten.sample_id, "content_key": keyer.content(forgotten.content_hash), "reason": "forget"},
        {"sample_id": relabelled.sample_id, "content_key": "", "reason": "rectify-label", "label": new_label},
        {"sample_id": "", "content_key": keyer.content(replaced.content_hash), "reason": "rectify-input"},
    ]
    assert suppression.add(ws, rows) == 3 and suppression.add(ws, rows) == 0  # idempotent
    summary = init_data(DataParams(), 0, ws)  # the source still holds all three
    assert summary["suppressed"] == 2 and summary["labels_corrected"] == 1
    after = ws.split("private").manifest.set_index("sample_id")
    assert forgotten.sample_id not in after.index and replaced.sample_id not in after.index
    assert int(after.loc[relabelled.sample_id, "label"]) == new_label
    assert len(ws.tombstones()) == 3 and forgotten.content_hash not in ws.tombstones_file.read_text()


def test_re_ingestion_without_the_salt_is_refused_and_writes_nothing(tmp_path):
    from lmeraser import suppression
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    init_data(DataParams(), 0, ws)
    victim = ws.split("private").manifest.iloc[0]
    suppression.add(
        ws, [{"sample_id": victim.sample_id, "content_key": Keyer(ws).content(victim.content_hash), "reason": "forget"}]
    )
    before = _files(tmp_path / "data")
    ws.subject_salt_file.unlink()
    with pytest.raises(DataError, match="secret salt is missing"):
        init_data(DataParams(), 0, ws)
    assert _files(tmp_path / "data") == before
