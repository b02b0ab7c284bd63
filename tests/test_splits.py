from pathlib import Path

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


# -- shards: an erasure rewrites the shards that held the sample, not the split ------------------


def _identity(path):
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_a_split_is_cut_into_shards_by_data_shard_size_and_reads_as_one(tmp_path):
    """data.shard_size decides the number of shards; every sample sits in the shard its id
    hashes to; the split reads back exactly as one (sorted by id, pixels aligned)."""
    from lmeraser.workspace import shard_index

    whole, cut = Workspace(tmp_path / "whole"), Workspace(tmp_path / "cut")
    init_data(DataParams(shard_size=100_000), 0, whole)
    summary = init_data(DataParams(shard_size=100), 0, cut)
    assert whole.source_info()["shards"] == {"public": 1, "private": 1, "test": 1}
    counts = summary["counts"]
    assert summary["shards"] == {split: -(-counts[split] // 100) for split in SPLITS} == cut.source_info()["shards"]
    for split in SPLITS:
        dirs = cut.shard_dirs(split)
        assert [d.name for d in dirs] == [f"{i:04d}" for i in range(len(dirs))] and len(dirs) > 1
        for i, directory in enumerate(dirs):
            ids = cut.shard_manifest(directory)["sample_id"].tolist()
            assert ids == sorted(ids) and all(shard_index(sid, len(dirs)) == i for sid in ids)
        a, b = whole.split(split), cut.split(split)
        assert a.manifest.equals(b.manifest) and np.array_equal(a.images, b.images)
        assert whole.manifest(split).equals(cut.manifest(split))
        some = b.sample_ids[::37]
        assert np.array_equal(cut.images_of(split, some), b.images[::37])


def test_an_erasure_rewrites_only_the_shard_that_held_the_sample(tmp_path):
    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=50), 0, ws)
    before = ws.split("private")
    victim = before.sample_ids[10]
    held = ws.shard_dir_of("private", victim)
    files = {p: _identity(p) for d in ws.shard_dirs("private") for p in sorted(d.iterdir())}
    remove_samples([victim], "private", ws)
    changed = {p for p, ident in files.items() if _identity(p) != ident}
    assert changed == {held / "manifest.csv", held / "images.npy"}
    after = ws.split("private")
    keep = before.manifest["sample_id"].to_numpy() != victim
    assert after.manifest.equals(before.manifest.loc[keep].reset_index(drop=True))
    assert np.array_equal(after.images, before.images[keep])
    # A correction rewrites its shard only, too.
    other = before.sample_ids[20]
    files = {p: _identity(p) for d in ws.shard_dirs("private") for p in sorted(d.iterdir())}
    splits_module.update_sample(other, "private", ws, label=(int(before.labels[20]) + 1) % 10)
    shard = ws.shard_dir_of("private", other)
    assert {p for p, ident in files.items() if _identity(p) != ident} == {shard / "manifest.csv", shard / "images.npy"}


def test_a_re_ingestion_after_erasures_cuts_the_same_shards_and_bytes(tmp_path):
    """The number of shards is counted before the suppression list drops samples: re-ingesting
    the same source after a forget writes the data the forget left, byte for byte."""
    from lmeraser import suppression
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=60), 0, ws)
    victims = ws.split("private").manifest.iloc[[0, 1, 2, 3, 4, 5, 6]]
    keyer = Keyer(ws)
    rows = [
        {"sample_id": v.sample_id, "content_key": keyer.content(v.content_hash), "reason": "forget"}
        for v in victims.itertuples()
    ]
    suppression.add(ws, rows)
    splits_module.add_tombstones(rows, ws)
    remove_samples(victims["sample_id"].tolist(), "private", ws)
    splits_module.refresh_counts(ws)
    left = _files(tmp_path / "data")
    init_data(DataParams(shard_size=60), 0, ws)
    assert _files(tmp_path / "data") == left


def test_a_missing_or_miscounted_shard_is_one_sentence(tmp_path):
    import json
    import shutil

    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=100), 0, ws)
    shutil.rmtree(ws.shard_dirs("private")[1])
    with pytest.raises(DataError, match=r"data/private/0001: not found; run 'lmeraser data init' first"):
        ws.split("private")
    (ws.shard_dirs("private")[1]).mkdir()  # the directory without its files
    with pytest.raises(DataError, match=r"data/private/0001/manifest.csv: not found; run 'lmeraser data init' first"):
        ws.split("private")
    info = ws.source_info()
    ws.source_info_file.write_text(json.dumps({**info, "shards": {**info["shards"], "test": "x"}}))
    with pytest.raises(DataError, match=r"source.json: shards.test is 'x', not a whole number from 1 to 1,000,000"):
        ws.manifest("test")


def test_data_written_before_shards_is_read_and_erased_in_place(tmp_path):
    """A workspace whose data/ predates shards (one manifest.csv and images.npy per split, no
    `shards` in source.json) keeps working: the split's directory is its one shard."""
    import json

    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=100_000), 0, ws)
    for split in SPLITS:
        for name in ("manifest.csv", "images.npy"):
            (ws.split_dir(split) / "0000" / name).rename(ws.split_dir(split) / name)
        (ws.split_dir(split) / "0000").rmdir()
    info = ws.source_info()
    del info["shards"]
    ws.source_info_file.write_text(json.dumps(info))
    assert ws.shard_dirs("private") == [ws.split_dir("private")]
    before = ws.split("private")
    remove_samples([before.sample_ids[0]], "private", ws)
    assert ws.split("private").sample_ids == before.sample_ids[1:]
    assert sorted(p.name for p in ws.split_dir("private").iterdir()) == ["images.npy", "manifest.csv"]


def test_the_change_following_validation_reads_only_the_changed_rows_of_a_sharded_split(tmp_path):
    from lmeraser.data.validation import validate_splits
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=40), 0, ws)
    Keyer(ws)
    assert validate_splits(ws).success
    gone = ws.manifest("private")["sample_id"][3]
    remove_samples([gone], "private", ws)
    victim = ws.split("private").sample_ids[7]
    splits_module.update_sample(victim, "private", ws, label=(int(ws.split("private").labels[7]) + 1) % 10)
    report = validate_splits(ws, changed_only=True)
    shards = {ws.shard_dir_of("private", victim), ws.shard_dir_of("private", gone)}
    in_changed_shards = sum(len(ws.shard_manifest(d)) for d in shards)
    assert report.success and report.statistics["mode"] == "changed rows"
    assert report.statistics["rows_checked"] == in_changed_shards < len(ws.manifest("private")) // 2
    # Flipped pixels under unchanged manifest fields, in one shard of many: caught (the shard changed).
    shard = ws.shard_dir_of("private", victim)
    manifest = ws.shard_manifest(shard)
    images = np.load(shard / "images.npy")
    row = int(np.flatnonzero(manifest["sample_id"].to_numpy() == victim)[0])
    images[row, 0, 0] ^= 0xFF
    np.save(shard / "images.npy", images)
    report = validate_splits(ws, changed_only=True)
    assert not report.success and any("hash_matches" in f for f in report.failures)


def test_a_manifest_edited_in_place_is_read_again(tmp_path):
    """Shard manifests are parsed once per process while their identity holds (workspace.py);
    an edit in place (same size: one label digit for another) changes mtime and ctime, so the next
    read sees it. The pause crosses the kernel's timestamp tick, as any real edit after a read does."""
    import time

    ws = Workspace(tmp_path)
    init_data(DataParams(shard_size=100), 0, ws)
    before = ws.manifest("private")
    sid = before["sample_id"][0]
    path = ws.shard_dir_of("private", sid) / "manifest.csv"
    old = int(before["label"][0])
    lines = path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(sid))
    lines[row] = lines[row].replace(f",{old},private,", f",{(old + 1) % 10},private,")
    time.sleep(0.05)
    path.write_text("\n".join(lines) + "\n")
    assert int(ws.manifest("private").set_index("sample_id").loc[sid, "label"]) == (old + 1) % 10
    before.loc[0, "label"] = 99  # a caller's copy: changing it changes nothing kept
    assert 99 not in set(ws.manifest("private")["label"])


def test_a_manifest_is_parsed_once_whatever_path_names_the_workspace(tmp_path, monkeypatch):
    """An unlearning batch resolves the workspace's path (its stages run with absolute paths), so
    the manifest cache is keyed by the file (device, inode), not by its name: the batch's reads
    after the CLI's relative ones parse nothing again, and after an erasure only its shard."""
    import contextlib

    import pandas as pd

    import lmeraser.workspace as workspace_module

    init_data(DataParams(subset=300, shard_size=20), 0, Workspace(tmp_path))
    parsed = []
    real = pd.read_csv
    monkeypatch.setattr(workspace_module.pd, "read_csv", lambda path, **kw: parsed.append(path) or real(path, **kw))
    with contextlib.chdir(tmp_path):
        relative = Workspace(Path("."))
        first = relative.manifest("private")
        count = len(relative.shard_dirs("private"))
        assert len(parsed) == count > 1
        absolute = Workspace(tmp_path.resolve())
        assert absolute.manifest("private").equals(first) and len(parsed) == count  # no parse again
        victim = first["sample_id"][3]
        parsed.clear()
        remove_samples([victim], "private", absolute)
        after = relative.manifest("private")
        assert victim not in set(after["sample_id"]) and len(after) == len(first) - 1
        shard = (absolute.shard_dir_of("private", victim) / "manifest.csv").resolve()
        assert {Path(path).resolve() for path in parsed} == {shard}  # the rewritten shard alone


# -- a stranger's attack on the shards (each case was a bug) -------------------------------------


def test_empty_shards_read_like_the_others_and_pass_validation(tmp_path):
    """A shard emptied by erasures (or left empty by the hash at ingestion) is a header-only
    manifest: it must not turn the split's label column into text (validation failed on every
    row, and a forget that emptied a shard left its batch stuck)."""
    from lmeraser.data.validation import validate_splits
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    init_data(DataParams(subset=300, shard_size=1), 0, ws)  # one shard per sample: many stay empty
    assert any(len(ws.shard_manifest(d)) == 0 for d in ws.shard_dirs("private"))
    Keyer(ws)
    assert validate_splits(ws).success
    full = next(d for d in ws.shard_dirs("private") if len(ws.shard_manifest(d)) > 0)
    remove_samples(ws.shard_manifest(full)["sample_id"].tolist(), "private", ws)  # the erasure empties it
    assert len(ws.shard_manifest(full)) == 0 and ws.manifest("private")["label"].dtype == np.int64
    assert validate_splits(ws, changed_only=True).success and validate_splits(ws).success


@pytest.fixture
def sharded(tmp_path):
    ws = Workspace(tmp_path)
    init_data(DataParams(subset=300, shard_size=20), 0, ws)
    return ws


def _set_shards(ws, value):
    import json

    ws.source_info_file.write_text(json.dumps({**ws.source_info(), "shards": value}))


def test_a_row_moved_to_another_shard_is_named(sharded):
    """A row in a shard its id does not hash to could be listed but never erased: refused, naming the file."""
    from lmeraser.data.validation import validate_splits

    ws = sharded
    source, target = ws.shard_dirs("private")[:2]
    manifest, images = ws.shard_manifest(source), np.load(source / "images.npy")
    moved = ws.shard_manifest(target)
    splits_module.write_split(
        target, pd_concat([moved, manifest.iloc[:1]]), np.concatenate([np.load(target / "images.npy"), images[:1]])
    )
    splits_module.write_split(source, manifest.iloc[1:].reset_index(drop=True), images[1:])
    message = rf"{target.name}/manifest.csv: sample id {manifest['sample_id'][0]} belongs in shard {source.name}"
    with pytest.raises(DataError, match=message):
        ws.manifest("private")
    with pytest.raises(DataError, match=message):
        validate_splits(ws)


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        ("extra", r"data/private/9999: not one of the \d+ shards data/source.json names for private"),
        ("fewer", r"data/private/\d{4}: not one of the \d+ shards data/source.json names for private"),
        ("scalar", r"source.json: shards is 29, not a count per split"),
        ("huge", r"source.json: shards.private is 100000000, not a whole number from 1 to 1,000,000"),
        ("deleted", r"data/private/0003: not found; run 'lmeraser data init' first"),
    ],
)
def test_shard_directories_that_do_not_match_source_json_are_one_sentence(sharded, tamper, needle):
    """A copied shard directory, a count lowered or set for all splits at once, an absurd count
    (it hung), a deleted shard: each is one sentence from the readers and from validation, at once."""
    import shutil
    import time

    from lmeraser.data.validation import split_fingerprints

    ws = sharded
    counts = ws.source_info()["shards"]
    if tamper == "extra":
        shutil.copytree(ws.shard_dirs("private")[5], ws.split_dir("private") / "9999")
    elif tamper == "fewer":
        _set_shards(ws, {**counts, "private": counts["private"] - 1})
    elif tamper == "scalar":
        _set_shards(ws, 29)
    elif tamper == "huge":
        _set_shards(ws, {**counts, "private": 10**8})
    else:
        shutil.rmtree(ws.shard_dirs("private")[3])
    start = time.monotonic()
    for read in (lambda: ws.manifest("private"), lambda: ws.split("private"), lambda: split_fingerprints(ws)):
        with pytest.raises(DataError, match=needle):
            read()
    assert time.monotonic() - start < 30


def test_a_changed_shard_size_is_noted_until_the_data_is_cut_again(sharded, tmp_path):
    from lmeraser.config import parse_params
    from lmeraser.pipeline import validate
    from lmeraser.salt import Keyer

    from helpers import TINY

    Keyer(sharded)
    lines = []
    params = parse_params({**TINY, "data": {**TINY["data"], "subset": 300, "shard_size": 7}})
    validate.run(params, sharded, log=lines.append)
    assert any("data/ was cut into shards of 20 samples; data.shard_size 7 takes effect" in line for line in lines)
    lines.clear()
    validate.run(
        parse_params({**TINY, "data": {**TINY["data"], "subset": 300, "shard_size": 20}}), sharded, lines.append
    )
    assert not any("shard_size" in line for line in lines)


def test_an_erasure_alone_checks_its_shard_s_pixels_without_starting_the_suite(sharded):
    """An erasure changes no row's fields: the rows left in its shard are checked by their content
    hashes, without Great Expectations (whose start alone cost a forget seconds); a pixel
    rewritten there is still caught."""
    from lmeraser.data.validation import validate_splits
    from lmeraser.salt import Keyer

    ws = sharded
    Keyer(ws)
    assert validate_splits(ws).success
    gone = ws.manifest("private")["sample_id"][4]
    shard = ws.shard_dir_of("private", gone)
    remove_samples([gone], "private", ws)
    report = validate_splits(ws, changed_only=True)
    assert report.success and report.statistics["rows_checked"] == len(ws.shard_manifest(shard))
    assert report.statistics["evaluated"] == 2 + len(SPLITS)  # whole-split checks only: no suite ran
    other = ws.manifest("private")["sample_id"][9]
    target = ws.shard_dir_of("private", other)
    manifest, images = ws.shard_manifest(target), np.load(target / "images.npy")
    images[int(np.flatnonzero(manifest["sample_id"].to_numpy() == other)[0]), 1, 1] ^= 0x0F
    np.save(target / "images.npy", images)
    report = validate_splits(ws, changed_only=True)
    assert not report.success and any("column=hash_matches) failed on 1 row(s)" in f for f in report.failures)
