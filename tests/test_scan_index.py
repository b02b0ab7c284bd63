"""The scan index (lmeraser/audit/scan_index.py): a scan reads only files that are new or changed
since the index read them and answers the rest from it, with the same hits as a full read; a copy
planted into an indexed file, a damaged, altered or missing index, and --full all mean reading."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from lmeraser.audit.scan import scan
from lmeraser.data.splits import content_hash
from lmeraser.io import sha256_file
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace


@pytest.fixture
def stores(tmp_path):
    """data/, a DVC cache object and an MLflow artifact, and the keyed hash of an image in the cache."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", images[1:])
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    with open(cache / "cdef0123", "wb") as handle:
        np.save(handle, images[:3])
    artifact = tmp_path / "mlartifacts" / "1" / "run" / "notes.json"
    artifact.parent.mkdir(parents=True)
    artifact.write_text(json.dumps({"note": "nothing personal"}))
    ws = Workspace(tmp_path)
    keyer = Keyer(ws)
    return ws, images, keyer


def test_a_second_scan_reads_only_what_changed_and_finds_new_targets_in_old_files(stores):
    ws, images, keyer = stores
    first = scan(ws, set(), set())
    assert first.index["mode"] == "full" and first.index["reason"] == "no scan index yet"
    assert first.read == first.counts and sum(first.counts.values()) == 3
    assert stat.S_IMODE(os.stat(ws.scan_index_file).st_mode) == 0o600
    # Nothing changed: nothing is read, and a target the first scan did not look for is found in
    # the cache object from what the index kept (what a file holds, not what was searched).
    target = keyer.content(content_hash(images[0]))
    second = scan(ws, {target}, set())
    assert second.index["mode"] == "incremental" and sum(second.read.values()) == 0
    assert [(h.kind, h.location) for h in second.hits] == [("forgotten sample", "dvc cache")]
    assert second.hits == scan(ws, {target}, set(), full=True).hits  # the same answer as reading everything
    # A new file is read, a removed one leaves the index.
    np.save(ws.data / "more.npy", images[:1])
    (ws.root / "mlartifacts" / "1" / "run" / "notes.json").unlink()
    third = scan(ws, {target}, set())
    assert third.read == {
        "data": 1,
        "dvc cache": 0,
        "artifact store": 0,
        "mlflow artifacts": 0,
        "mlflow (default root)": 0,
    }
    assert sorted(h.location for h in third.hits) == ["data", "dvc cache"]
    assert "notes.json" not in ws.scan_index_file.read_text()
    assert third.index["sha256"] == sha256_file(ws.scan_index_file)  # the report names the index it saved


def test_the_index_serves_the_workspace_however_its_root_is_spelled(stores, monkeypatch):
    """`lmeraser audit scan --full` runs with the workspace as "." and the service's batches with
    its absolute path: each scan's index must serve the other (it answered nothing, and the first
    batch after a scheduled full scan read every store again)."""
    ws, _, _ = stores
    monkeypatch.chdir(ws.root)
    full = scan(Workspace(Path(".")), set(), set(), full=True)
    assert sum(full.read.values()) == 3
    after = scan(Workspace(ws.root.resolve()), set(), set())
    assert after.index["mode"] == "incremental" and sum(after.read.values()) == 0
    assert sum(scan(Workspace(Path(".")), set(), set()).read.values()) == 0


def test_a_copy_planted_into_an_indexed_file_is_read_again_even_with_its_times_restored(stores):
    ws, images, keyer = stores
    scan(ws, set(), set())
    victim = ws.data / "images.npy"
    before = victim.stat()
    planted = np.load(victim)
    planted[0] = images[0]  # same size, same shape: only the bytes change
    with open(victim, "r+b") as handle:
        np.save(handle, planted)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    report = scan(ws, {keyer.content(content_hash(images[0]))}, set())
    assert report.read["data"] == 1 and ("forgotten sample", "data") in {(h.kind, h.location) for h in report.hits}


@pytest.mark.parametrize("damage", ["garbage", "altered", "missing", "full"])
def test_a_damaged_altered_or_missing_index_or_full_means_reading_everything(stores, damage):
    ws, images, keyer = stores
    scan(ws, set(), set())
    target = keyer.content(content_hash(images[0]))
    full = False
    if damage == "garbage":
        ws.scan_index_file.write_text("{not json")
    elif damage == "altered":
        # Someone without the salt edits the index so the cache object seems to hold nothing.
        document = json.loads(ws.scan_index_file.read_text())
        entry = document["body"]["locations"]["dvc cache"]["files"]["files/md5/ab/cdef0123"]
        document["body"]["contents"][entry["sha256"]]["keys"] = []
        ws.scan_index_file.write_text(json.dumps(document))
    elif damage == "missing":
        ws.scan_index_file.unlink()
    else:
        full = True
    report = scan(ws, {target}, set(), full=full)
    reason = {
        "garbage": "the scan index is damaged (not the JSON it writes)",
        "altered": "the scan index fails its authentication (altered, or made with another salt)",
        "missing": "no scan index yet",
        "full": "a full scan was asked for",
    }[damage]
    assert report.index["mode"] == "full" and report.index["reason"] == reason
    assert report.read == report.counts and [h.location for h in report.hits] == ["dvc cache"]
    assert scan(ws, {target}, set()).index["mode"] == "incremental"  # rebuilt by that scan


def test_what_one_content_holds_is_kept_once_for_every_copy_and_ids_are_read_where_asked(stores):
    """A data shard, its DVC cache object and the remote's copy are the same bytes: the index keeps
    what they hold once. The same bytes in an MLflow location are read again for the sample ids
    they name (data/ is searched without them), and every copy is still a hit."""
    ws, images, keyer = stores
    sid = "0123456789abcdef0123"
    shared = ws.root / "data" / "shared.npy"
    np.save(shared, images[:2])
    copy = ws.root / "mlartifacts" / "1" / "run" / "shared.npy"
    copy.write_bytes(shared.read_bytes())
    scan(ws, set(), set(), sample_ids=set())
    body = json.loads(ws.scan_index_file.read_text())["body"]
    sha = sha256_file(shared)
    assert body["locations"]["data"]["files"]["shared.npy"] == {
        "id": body["locations"]["data"]["files"]["shared.npy"]["id"],
        "sha256": sha,
    }
    assert len(body["contents"]) == 4 and body["contents"][sha]["ids"] == []  # data, cache, notes, shared: one each
    assert ws.scan_index_file.read_text().count(keyer.content(content_hash(images[0]))) == 2  # shared, cache object
    target = keyer.content(content_hash(images[1]))
    report = scan(ws, {target}, set(), sample_ids={sid})
    assert sum(report.read.values()) == 0
    assert sorted((h.location, h.path.rsplit("/", 1)[-1]) for h in report.hits) == [
        ("data", "images.npy"),
        ("data", "shared.npy"),
        ("dvc cache", "cdef0123"),
        ("mlflow artifacts", "shared.npy"),
    ]


def test_the_copies_of_one_content_are_read_once_per_scan_and_each_copy_is_still_a_hit(stores, monkeypatch):
    """A shard, its DVC cache object and the remote's copy are one content: a scan (a full one
    too) reads it for what it holds once and only hashes the other copies, which are hits all
    the same; a copy of content the index already knows is not read again either."""
    from lmeraser.audit import scan as scan_module

    ws, images, keyer = stores
    shard = ws.root / "data" / "images.npy"
    for copy in (ws.root / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef9999", ws.root / "artifacts" / "kept.npy"):
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(shard.read_bytes())
    read = []
    real = scan_module._sha256_and_id_tokens
    monkeypatch.setattr(scan_module, "_sha256_and_id_tokens", lambda path: read.append(path) or real(path))
    target = keyer.content(content_hash(images[4]))  # in the shard only, not in the cache object
    full = scan(ws, {target}, set(), full=True)
    listed = sum(full.counts.values())
    assert sum(full.read.values()) == listed and len(read) == listed - 2  # three copies, read once
    assert sorted(h.path.rsplit("/", 1)[-1] for h in full.hits) == ["cdef9999", "images.npy", "kept.npy"]
    # A new copy of content the index holds: listed as read (its identity is new), only hashed.
    (ws.root / "artifacts" / "again.npy").write_bytes(shard.read_bytes())
    read.clear()
    again = scan(ws, {target}, set())
    assert again.read["artifact store"] == 1 and read == []
    assert sorted(h.path.rsplit("/", 1)[-1] for h in again.hits) == ["again.npy", "cdef9999", "images.npy", "kept.npy"]


def test_an_index_of_the_earlier_format_means_one_full_scan(stores):
    ws, _, keyer = stores
    keyer_seal = keyer.seal("scan-index", {"version": 1, "salt": keyer.fingerprint(), "locations": {}})
    ws.scan_index_file.parent.mkdir(parents=True, exist_ok=True)
    ws.scan_index_file.write_bytes(keyer_seal)
    report = scan(ws, set(), set())
    assert report.index == {**report.index, "mode": "full", "reason": "the scan index has format 1, this code writes 2"}
    assert scan(ws, set(), set()).index["mode"] == "incremental"


def test_erased_ids_in_mlflow_files_are_found_from_the_index_and_kept_keyed(stores):
    ws, _, keyer = stores
    sid = "0123456789abcdef0123"
    bundle = ws.root / "mlartifacts" / "1" / "run" / "bundle.json"
    bundle.write_text(json.dumps({"members": [sid]}))
    scan(ws, set(), set(), sample_ids=set())
    assert sid not in ws.scan_index_file.read_text()  # ids are kept keyed with the salt, never raw
    report = scan(ws, set(), set(), sample_ids={sid})
    assert sum(report.read.values()) == 0
    assert [(h.kind, h.digest) for h in report.hits] == [("erased sample id", keyer.subject("sample:" + sid))]


def test_a_copy_of_a_manifest_naming_an_erased_id_is_found_in_every_store_but_the_tombstones(stores):
    """A stranger's case: a shard's manifest.csv (the erased sample's id, subject, label and
    content hash) copied into artifacts/, data/ or the DVC cache was not found, because ids were
    searched in the MLflow stores only. Every store is searched now; the current tombstones (and
    their copies, by content) name every erased id by design and are no hit."""
    ws, _, keyer = stores
    sid = "0123456789abcdef0123"
    tombstones = f"sample_id,content_key,reason,label\n{sid},{'0' * 64},forget,\n"
    ws.tombstones_file.write_text(tombstones)
    (ws.root / ".dvc" / "cache" / "files" / "md5" / "ab" / "tombstones-object").write_text(tombstones)
    assert scan(ws, set(), set(), sample_ids={sid}).hits == []
    manifest = f"sample_id,subject_id,label,content_hash\n{sid},s00001,3,{'f' * 64}\n"
    planted = [ws.root / "artifacts" / "backup" / "manifest.csv", ws.data / "private" / "manifest-copy.csv"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(manifest)
    report = scan(ws, set(), set(), sample_ids={sid})
    assert sorted((h.location, h.kind) for h in report.hits) == [
        ("artifact store", "erased sample id"),
        ("data", "erased sample id"),
    ]
    assert report.hits == scan(ws, set(), set(), sample_ids={sid}, full=True).hits
    # A tombstones file that is not the current one (an older or edited copy) is a copy like any other.
    ws.tombstones_file.write_text(tombstones.replace("forget,", "forget,3"))
    assert {h.location for h in scan(ws, set(), set(), sample_ids={sid}).hits} == {
        "artifact store",
        "data",
        "dvc cache",
    }


def test_erased_ids_are_found_however_a_stranger_wrote_them_and_tombstone_versions_are_no_hit(stores, monkeypatch):
    """The stranger's cases the first id search missed (each a false "0 hits"): an id in a file
    larger than the search's chunk (and cut by a chunk's end), in upper case, in an `.npy` array
    of strings (ids back to back), in a file's or folder's name; and the tombstones: an earlier
    version (a prefix) is no hit, an edited one (a manifest line appended) is searched."""
    from lmeraser.audit import scan as scan_module

    ws, _, keyer = stores
    sid, other = "0123456789abcdef0123", "fedcba98765432100123"
    header = "sample_id,content_key,reason,label\n"
    rows = [f"{sid},{'0' * 64},forget,\n", f"{other},{'1' * 64},forget,\n"]
    ws.tombstones_file.write_text(header + "".join(rows))
    cache = ws.root / ".dvc" / "cache" / "files" / "md5" / "ab"
    (cache / "earlier-tombstones").write_text(header + rows[0])  # the version before the second erasure
    assert scan(ws, set(), set(), sample_ids={sid, other}).hits == []

    monkeypatch.setattr(scan_module, "ID_SEARCH_CHUNK", 64)
    leaks = ws.root / "artifacts" / "leaks"
    leaks.mkdir(parents=True)
    (leaks / "big.log").write_text("x" * 50 + f" {sid} " + "y" * 200)  # cut by the first chunk's end
    (leaks / "upper.csv").write_text(f"{other.upper()},s1,3\n")
    np.save(leaks / "ids.npy", np.array([sid, other], dtype="S20"))  # b"0123...fedc...": no separator
    (leaks / f"{sid}.json").write_text("{}")
    found = {(h.path.rsplit("/", 1)[-1], h.digest) for h in scan(ws, set(), set(), sample_ids={sid, other}).hits}
    key, other_key = keyer.subject("sample:" + sid), keyer.subject("sample:" + other)
    assert found == {
        ("big.log", key),
        ("upper.csv", other_key),
        ("ids.npy", key),
        ("ids.npy", other_key),
        (f"{sid}.json", key),
    }
    for path in leaks.iterdir():
        path.unlink()
    # A manifest line appended to the tombstones: the file is no tombstones file, and is searched.
    ws.tombstones_file.write_text(header + "".join(rows) + f"{sid},s00047,8,private,{'e' * 64}\n")
    report = scan(ws, set(), set(), sample_ids={sid, other})
    assert ("data", "tombstones.csv") in {(h.location, h.path.rsplit("/", 1)[-1]) for h in report.hits}


def test_without_a_salt_every_file_is_read_and_no_index_is_kept(tmp_path):
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", np.zeros((2, 4, 4), np.uint8))
    ws = Workspace(tmp_path)
    report = scan(ws, set(), set(), sample_ids=set())
    assert report.index["mode"] == "none" and report.read == report.counts and not ws.scan_index_file.exists()


def test_a_sealed_document_is_the_canonical_json_of_its_body_and_mac_and_any_edit_is_caught(tmp_path):
    """Keyer.seal serialises the body once and unseal checks the MAC over its bytes; both must
    agree with the plain form (canonical JSON of {"body", "mac"}), and an edit anywhere, a
    document in another form, another purpose or another salt must not unseal."""
    import json

    from lmeraser.io import canonical_json
    from lmeraser.salt import Keyer

    keyer = Keyer(Workspace(tmp_path / "a"))
    body = {"files": {"x/0001/images.npy": {"keys": ["ab" * 32], "id": [1, 2]}}, "when": 1.5, "text": 'é\u2028,"mac":"'}
    sealed = keyer.seal("scan-index", body)
    assert sealed == canonical_json({"body": body, "mac": keyer._seal_mac("scan-index", body)})
    assert keyer.unseal("scan-index", sealed) == (body, None)
    pretty = json.dumps(json.loads(sealed), indent=1).encode()  # another form, same content: still valid
    assert keyer.unseal("scan-index", pretty) == (body, None)
    assert keyer.unseal("validation-summary", sealed) == (None, "altered")
    assert Keyer(Workspace(tmp_path / "b")).unseal("scan-index", sealed) == (None, "altered")
    assert keyer.unseal("scan-index", sealed.replace(b"1.5", b"2.5")) == (None, "altered")
    assert keyer.unseal("scan-index", sealed[:-1]) == (None, "damaged")


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "link to a valid index", "directory"])
def test_an_index_path_that_is_not_a_regular_file_is_never_read_and_means_a_full_scan(stores, kind):
    """Found by a stranger's attack: a FIFO there hung every scan (and a forget at its verify
    step), a link to /dev/zero read until memory ran out. The index is read as the product reads
    its trusted files: a regular file only, never through a link, never blocking."""
    ws, images, keyer = stores
    scan(ws, set(), set())
    path = ws.scan_index_file
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif kind == "link to a valid index":
        path.rename(path.with_name("elsewhere.json"))
        path.symlink_to(path.with_name("elsewhere.json"))
    else:
        path.unlink()
        path.mkdir()
    target = keyer.content(content_hash(images[0]))
    if kind == "directory":  # the atomic write cannot replace a directory: the report says the index was not saved
        report = scan(ws, {target}, set())
        assert report.index["mode"] == "full" and "not a regular file" in report.index["reason"]
        assert report.index["sha256"] is None and "not_saved" in report.index
    else:
        report = scan(ws, {target}, set())
        assert report.index["mode"] == "full" and report.index["reason"].startswith("the scan index cannot be read")
        assert path.is_file() and not path.is_symlink()  # replaced by the index this scan saved
        assert scan(ws, {target}, set()).index["mode"] == "incremental"
    assert [h.location for h in report.hits] == ["dvc cache"]


def test_a_link_in_a_store_is_searched_through_to_a_file_and_any_other_link_is_named_not_searched(stores, tmp_path):
    """Found by a stranger's attack: a symbolic link in artifacts/ to a copy of an erased shard
    outside the workspace gave "0 hits" (links were skipped silently). A link to a regular file
    is searched through, also from the index once its target changes; a link to a directory or
    to nowhere is not followed, and the report (which a record signs) says so."""
    ws, images, keyer = stores
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "backup.npy", images[4:])
    (ws.root / "artifacts").mkdir()
    (ws.root / "artifacts" / "shard-backup.npy").symlink_to(outside / "backup.npy")
    (ws.root / "artifacts" / "elsewhere").symlink_to(outside, target_is_directory=True)
    (ws.root / "artifacts" / "dangling.npy").symlink_to(outside / "gone.npy")
    os.mkfifo(ws.root / "artifacts" / "pipe.npy")  # a FIFO in the store itself (a second stranger): named, never read
    target = keyer.content(content_hash(images[5]))
    first = scan(ws, {target}, set())
    assert sorted((h.location, h.path.rsplit("/", 1)[-1]) for h in first.hits) == [
        ("artifact store", "shard-backup.npy"),
        ("data", "images.npy"),
    ]
    assert {n for n in first.not_searched if n.startswith("artifact store: ")} == {
        "artifact store: elsewhere (a symbolic link to a directory, not followed)",
        "artifact store: dangling.npy (a symbolic link that leads nowhere)",
        "artifact store: pipe.npy (no regular file, not read)",
    }
    assert scan(ws, {target}, set()).read["artifact store"] == 0  # answered from the index
    np.save(outside / "backup.npy", images[:2])  # the target rewritten: read again, the erased image gone
    again = scan(ws, {target}, set())
    assert again.read["artifact store"] == 1 and [h.location for h in again.hits] == ["data"]


def test_keyed_subject_ids_are_the_hmac_of_their_salt_and_memoised_per_salt(tmp_path, monkeypatch):
    """A scan keys every sample id each new file names (160,000 per forget at 30,000 private
    samples): `Keyer.subject` keys an id once per process and salt, and what it returns is still
    HMAC-SHA256 under that workspace's own salt, never another workspace's memo."""
    import hashlib
    import hmac

    from lmeraser import salt as salt_module
    from lmeraser.salt import Keyer

    first, second = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    for ws in (first, second):
        ws.root.mkdir()
    keyers = Keyer(first), Keyer(second)
    salts = [salt_module.salt(ws, False) for ws in (first, second)]
    assert salts[0] != salts[1]
    for keyer, salt in zip(keyers, salts):
        for subject in ("sample:0123456789abcdef0123", "subject:alice", "sample:0123456789abcdef0123"):
            assert keyer.subject(subject) == hmac.new(salt, subject.encode(), hashlib.sha256).hexdigest()
    assert Keyer(first).subject("subject:alice") == keyers[0].subject("subject:alice")  # a new Keyer, same memo
    monkeypatch.setattr(salt_module, "SUBJECT_MEMO_MAX", 3)
    for i in range(10):  # bounded: started again when full, every answer still the HMAC
        assert (
            keyers[0].subject(f"sample:{i}") == hmac.new(salts[0], f"sample:{i}".encode(), hashlib.sha256).hexdigest()
        )
    assert len(keyers[0]._memo) <= 3
