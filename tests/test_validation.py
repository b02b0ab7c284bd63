import numpy as np
import pandas as pd
import pytest

from lmeraser.config import DataParams
from lmeraser.data.splits import init_data
from lmeraser.data.validation import validate_splits
from lmeraser.workspace import Workspace


@pytest.fixture
def data_dir(tmp_path):
    init_data(DataParams(subset=300, shard_size=1000), 0, Workspace(tmp_path))  # one shard: data/<split>/0000/
    return tmp_path / "data"


def _validate(data_dir):
    return validate_splits(Workspace(data_dir.parent))


def test_clean_splits_pass_and_write_data_docs(data_dir):
    report = _validate(data_dir)
    assert report.success, report.failures
    assert report.docs_index.exists() and report.statistics["failed"] == 0


def _edit_manifest(data_dir, split, fn):
    path = data_dir / split / "0000" / "manifest.csv"
    frame = pd.read_csv(path, dtype=str)
    fn(frame)
    frame.to_csv(path, index=False)


def test_id_in_two_splits_fails(data_dir):
    public_id = pd.read_csv(data_dir / "public" / "0000" / "manifest.csv", dtype=str)["sample_id"][0]
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
    private = pd.read_csv(data_dir / "private" / "0000" / "manifest.csv", dtype=str)
    victim, replaced = private.iloc[0], private.iloc[1]
    rows = [
        {
            "sample_id": victim.sample_id,
            "content_key": Keyer(ws).content(victim.content_hash),
            "reason": "forget",
            "label": "",
        },
        {
            "sample_id": "",
            "content_key": Keyer(ws).content(replaced.content_hash),
            "reason": "rectify-input",
            "label": "",
        },
    ]
    pd.DataFrame(rows).to_csv(data_dir / "tombstones.csv", index=False)
    report = _validate(data_dir)
    assert not report.success
    assert any("column=suppressed" in f and "failed on 2 row(s)" in f for f in report.failures), report.failures
    published = report.reason() + "".join(p.read_text(errors="ignore") for p in ws.data_docs.rglob("*") if p.is_file())
    for secret in (victim.sample_id, victim.content_hash, replaced.sample_id, replaced.content_hash):
        assert secret not in published


def test_missing_class_in_a_split_fails(data_dir):
    path = data_dir / "test" / "0000" / "manifest.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[frame["label"] == "3", "label"] = "4"
    frame.to_csv(path, index=False)
    report = _validate(data_dir)
    assert not report.success
    assert any("distinct_values_to_contain_set" in f and "test" in f for f in report.failures)


def test_pixels_not_matching_content_hash_fail(data_dir):
    images = np.load(data_dir / "private" / "0000" / "images.npy")
    images[0, 0, 0] ^= 0xFF
    np.save(data_dir / "private" / "0000" / "images.npy", images)
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
    assert (
        again.statistics["rows"] == first.statistics["rows"]
        and again.statistics["evaluated"] == first.statistics["evaluated"]
    )
    from lmeraser.data.splits import remove_samples

    remove_samples([ws.split("private").sample_ids[0]], "private", ws)
    after_forget = validate_splits(ws)
    assert after_forget.success and after_forget.statistics["facts_reused"] == ["public", "test"]
    # Flipped pixels in a split checked before: its files changed, so it is checked again and fails.
    images = np.load(data_dir / "test" / "0000" / "images.npy")
    images[0, 0, 0] ^= 0xFF
    np.save(data_dir / "test" / "0000" / "images.npy", images)
    tampered = validate_splits(ws)
    assert not tampered.success and any("hash_matches" in f for f in tampered.failures)
    assert tampered.statistics["facts_reused"] == ["public", "private"]
    # A tombstone is checked against every row, reused facts or not.
    from lmeraser.data.splits import add_tombstones

    add_tombstones([{"sample_id": ws.split("public").sample_ids[0], "content_key": "", "reason": "forget"}], ws)
    assert any("suppressed" in f for f in validate_splits(ws).failures)


# -- validation that follows the change (an unlearning batch's rebuild) --------------------------


def _tombstone(ws, row, reason="forget"):
    from lmeraser.salt import Keyer

    path = ws.tombstones_file
    key = Keyer(ws).content(row.content_hash)
    line = pd.DataFrame(
        [{"sample_id": row.sample_id if reason == "forget" else "", "content_key": key, "reason": reason, "label": ""}]
    )
    line.to_csv(path, mode="a", header=not path.exists(), index=False)


def _re_ingest(ws, data_dir):
    """A forgotten sample comes back: tombstoned, then its row and pixels written into the test split."""
    from lmeraser.data.splits import remove_samples

    private = ws.split("private")
    victim = private.manifest.iloc[0]
    image = private.images[0]
    _tombstone(ws, victim)
    remove_samples([victim.sample_id], "private", ws)
    test = ws.split("test")
    manifest = pd.concat([test.manifest, pd.DataFrame([{**victim.to_dict(), "split": "test"}])], ignore_index=True)
    manifest.to_csv(data_dir / "test" / "0000" / "manifest.csv", index=False)
    np.save(data_dir / "test" / "0000" / "images.npy", np.concatenate([test.images, image[None]]))


def _duplicate(ws, data_dir):
    public_id = ws.manifest("public")["sample_id"][0]
    _edit_manifest(data_dir, "test", lambda f: f.__setitem__("sample_id", [public_id] + f["sample_id"].tolist()[1:]))


def _tombstone_present(ws, data_dir):
    _tombstone(ws, ws.manifest("public").iloc[5])  # named by a new tombstone, still in the data


def _empty_a_class(ws, data_dir):
    from lmeraser.data.splits import remove_samples

    test = ws.manifest("test")
    remove_samples(test.loc[test["label"] == 3, "sample_id"].tolist(), "test", ws)


def _flip_pixels_of_a_changed_row(ws, data_dir):
    _edit_manifest(
        data_dir,
        "private",
        lambda f: f.__setitem__("label", [str((int(f["label"][0]) + 1) % 10)] + f["label"].tolist()[1:]),
    )
    images = np.load(data_dir / "private" / "0000" / "images.npy")
    images[0, 0, 0] ^= 0xFF
    np.save(data_dir / "private" / "0000" / "images.npy", images)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (_re_ingest, "column=suppressed"),
        (_duplicate, "expect_column_values_to_be_unique(column=sample_id)"),
        (_tombstone_present, "column=suppressed"),
        (_empty_a_class, 'expect_column_distinct_values_to_contain_set(column=label, row_condition=split=="test")'),
        (_flip_pixels_of_a_changed_row, "column=hash_matches"),
    ],
)
def test_the_changed_rows_check_catches_what_the_whole_suite_catches(data_dir, tamper, needle):
    from lmeraser.salt import Keyer

    ws = Workspace(data_dir.parent)
    Keyer(ws)  # the salt the first request makes: the summary is authenticated with it
    assert validate_splits(ws).success  # keeps the summary
    tamper(ws, data_dir)
    changed = validate_splits(ws, changed_only=True)
    assert changed.statistics["mode"] == "changed rows" and not changed.success
    assert any(needle in f for f in changed.failures), changed.failures
    assert "run `lmeraser stage validate` for every row" in changed.reason()
    whole = validate_splits(ws)
    assert whole.statistics["mode"] == "full" and not whole.success and any(needle in f for f in whole.failures), (
        whole.failures
    )


def test_a_forget_is_validated_from_its_changed_rows_and_a_bad_summary_means_every_row(data_dir):
    from lmeraser.data.splits import remove_samples
    from lmeraser.data.validation import ChangeSummary
    from lmeraser.salt import Keyer

    ws = Workspace(data_dir.parent)
    assert validate_splits(ws, changed_only=True).statistics["mode"] == "full"  # no salt: no summary
    Keyer(ws)
    assert validate_splits(ws).success
    victim = ws.split("private").manifest.iloc[2]
    _tombstone(ws, victim)
    remove_samples([victim.sample_id], "private", ws)
    report = validate_splits(ws, changed_only=True)
    # The rows of the shard the erasure rewrote are checked (here the split is one shard).
    assert report.success and report.statistics["mode"] == "changed rows"
    assert report.statistics["rows_checked"] == len(ws.manifest("private"))
    # A relabelled row: its shard's rows are checked, no other split's.
    _edit_manifest(
        data_dir,
        "public",
        lambda f: f.__setitem__("label", [str((int(f["label"][0]) + 1) % 10)] + f["label"].tolist()[1:]),
    )
    report = validate_splits(ws, changed_only=True)
    assert report.success and report.statistics["rows_checked"] == len(ws.manifest("public"))
    # An altered summary (someone without the salt), or tombstones rewritten rather than appended: every row.
    import json

    path = ChangeSummary.path(ws)
    saved = path.read_bytes()
    document = json.loads(saved)
    document["body"]["splits"]["private"]["label"][0] += 1  # hides a relabel from the next check
    path.write_text(json.dumps(document))
    assert validate_splits(ws, changed_only=True).statistics["mode"] == "full"
    path.write_bytes(saved)
    assert validate_splits(ws, changed_only=True).statistics["mode"] == "changed rows"
    header = ws.tombstones_file.read_text().splitlines(keepends=True)[0]
    ws.tombstones_file.write_text(header)  # the tombstones rewritten (here: emptied), not appended to
    assert validate_splits(ws, changed_only=True).statistics["mode"] == "full"


def test_the_first_validation_keeps_its_summary_so_the_first_erasure_checks_only_what_changed(data_dir):
    """A workspace fresh from `dvc repro` has no salt until its first erasure; the validate stage
    makes it (0600, as the first keyed hash would) to seal its summary, so the first forget's
    rebuild checks the changed rows instead of every row (measured at 30,000 private samples: the
    whole suite and its image facts cost seconds there)."""
    import stat

    from lmeraser.data.splits import remove_samples

    ws = Workspace(data_dir.parent)
    assert not ws.subject_salt_file.exists()
    assert validate_splits(ws).success
    assert stat.S_IMODE(ws.subject_salt_file.stat().st_mode) == 0o600 and len(ws.subject_salt_file.read_bytes()) == 32
    victim = ws.split("private").manifest.iloc[4]
    _tombstone(ws, victim)
    remove_samples([victim.sample_id], "private", ws)
    report = validate_splits(ws, changed_only=True)
    assert report.success and report.statistics["mode"] == "changed rows"


def test_fingerprints_reuse_a_kept_sha256_only_while_the_file_s_identity_holds(data_dir):
    """The change-following validation hashes only files whose identity (device, inode, size,
    mtime, ctime) changed since its summary: a kept sha256 is used for an untouched file, and a
    file written again, even with the same bytes, is read again."""
    import time

    from lmeraser.data.validation import split_fingerprints

    ws = Workspace(data_dir.parent)
    identities = {}
    first = split_fingerprints(ws, None, identities)
    assert set(identities) == set(first) and all(set(identities[s]) == set(first[s]) for s in first)
    rel = sorted(identities["private"])[0]
    known = {split: {name: list(entry) for name, entry in files.items()} for split, files in identities.items()}
    known["private"][rel][-1] = "0" * 64  # planted: only a file that is not read again keeps it
    assert split_fingerprints(ws, known)["private"][rel] == "0" * 64
    path = ws.split_dir("private") / rel
    time.sleep(0.05)  # past the kernel's timestamp tick, as any real write after a read is
    path.write_bytes(path.read_bytes())
    assert split_fingerprints(ws, known)["private"][rel] == first["private"][rel]


def test_a_keys_directory_that_cannot_be_written_keeps_no_summary_and_validation_still_passes(data_dir):
    """The validate stage makes the salt only when it can: a read-only keys directory (or any
    failure to make it) leaves no summary, and the validation's verdict is the suite's."""
    import os

    ws = Workspace(data_dir.parent)
    ws.keys_dir.mkdir(parents=True)
    ws.keys_dir.chmod(0o500)
    try:
        if os.access(ws.keys_dir, os.W_OK):  # root ignores the mode: make the directory a file instead
            ws.keys_dir.chmod(0o700)
            ws.keys_dir.rmdir()
            ws.keys_dir.write_text("not a directory")
        assert validate_splits(ws).success
        assert not ws.subject_salt_file.exists()
        assert validate_splits(ws, changed_only=True).statistics["mode"] == "full"  # no summary was kept
    finally:
        if ws.keys_dir.is_dir():
            ws.keys_dir.chmod(0o700)
