"""Request validation and the journal: refusals name what is wrong and write nothing."""

import subprocess
import sys

import pytest

from lmeraser.data.splits import add_tombstones
from lmeraser.errors import LmeraserError
from lmeraser.salt import Keyer
from lmeraser.unlearning.requests import Journal, RequestSpec, parse_requests_file, resolve
from lmeraser.workspace import Workspace

from conftest import TINY, build_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("requests"), TINY)


def test_resolve_subject_and_ids(ws):
    private = ws.split("private").manifest
    subject = private["subject_id"].value_counts().index[0]
    members = private.loc[private.subject_id == subject, "sample_id"].tolist()
    resolved = resolve(RequestSpec(subjects=[subject]), ws)
    assert resolved.sample_ids == members and len(members) >= 2
    assert not ws.subject_salt_file.exists()  # validation writes nothing, not even the salt
    Journal(ws).submit([resolved])
    assert resolved.subject_hashes == [Keyer(ws).subject(subject)] and subject not in ws.journal_file.read_text()
    assert ws.subject_salt_file.stat().st_mode & 0o777 == 0o600


def test_unknown_public_and_test_ids_are_refused(ws):
    with pytest.raises(LmeraserError, match="sample id ffffffffffffffffffff is unknown"):
        resolve(RequestSpec(sample_ids=["ffffffffffffffffffff"]), ws)
    public_id = ws.split("public").sample_ids[0]
    with pytest.raises(LmeraserError, match="is public.*--allow-backbone-rebuild"):
        resolve(RequestSpec(sample_ids=[public_id]), ws)
    assert resolve(RequestSpec(sample_ids=[public_id], allow_backbone_rebuild=True), ws).public
    with pytest.raises(LmeraserError, match="test split"):
        resolve(RequestSpec(sample_ids=[ws.split("test").sample_ids[0]]), ws)
    with pytest.raises(LmeraserError, match="subject s99999 has no private samples"):
        resolve(RequestSpec(subjects=["s99999"]), ws)


def test_already_forgotten_is_a_recorded_noop(ws, tmp_path):
    victim = ws.split("private").manifest.iloc[0]
    import shutil

    copy = Workspace(tmp_path)
    shutil.copytree(ws.data, copy.data)
    add_tombstones([{"sample_id": victim.sample_id, "content_key": "k", "reason": "forget"}], copy)
    from lmeraser.data.splits import remove_samples

    remove_samples([victim.sample_id], "private", copy)
    resolved = resolve(RequestSpec(sample_ids=[victim.sample_id]), copy)
    assert resolved.sample_ids == [] and resolved.already_forgotten == [victim.sample_id]


def test_rectify_validation(ws, tmp_path):
    sid = ws.split("private").sample_ids[0]
    with pytest.raises(LmeraserError, match="label 10 is outside the label domain 0..9"):
        resolve(RequestSpec(kind="rectify", sample_ids=[sid], label=10), ws)
    import numpy as np

    np.save(tmp_path / "bad.npy", np.zeros((5, 5), np.uint8))
    with pytest.raises(LmeraserError, match=r"shape \(5, 5\), expected \(8, 8\)"):
        resolve(RequestSpec(kind="rectify", sample_ids=[sid], input=str(tmp_path / "bad.npy")), ws)
    with pytest.raises(ValueError, match="exactly one of label or input"):
        RequestSpec(kind="rectify", sample_ids=[sid])


def test_malformed_request_file_names_the_line(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"sample_ids": ["a"]}\n{"sample_ids": ["b"], "colour": 1}\n')
    with pytest.raises(LmeraserError, match="line 2: colour: Extra inputs are not permitted; nothing was applied"):
        parse_requests_file(path, "forget")
    path.write_text('{"sample_ids": ["a"]}\n\n{"sample_ids": [\n')
    with pytest.raises(LmeraserError, match="line 3: not valid JSON"):
        parse_requests_file(path, "forget")
    path.write_text('{"kind": "forget"}\n')
    with pytest.raises(LmeraserError, match="line 1: a forget request needs sample_ids or subjects"):
        parse_requests_file(path, "forget")


def test_journal_states_and_torn_last_line(tmp_path):
    journal = Journal(Workspace(tmp_path))
    journal.append([{"request_id": "r1", "state": "received", "request": {"request_id": "r1"}}])
    journal.append([{"request_id": "r2", "state": "received", "request": {"request_id": "r2"}}])
    journal.append([{"request_id": "r1", "state": "verified"}])
    assert [r["request_id"] for r in journal.pending()] == ["r2"]
    with open(journal.path, "ab") as handle:
        handle.write(b'{"request_id": "r3", "sta')  # killed mid-append
    assert [r["request_id"] for r in journal.pending()] == ["r2"]
    journal.append([{"request_id": "r4", "state": "received", "request": {"request_id": "r4"}}])
    assert [r["request_id"] for r in journal.pending()] == ["r2", "r4"]
    assert all(line.startswith(b"{") for line in journal.path.read_bytes().splitlines())


def test_concurrent_appends_serialise_and_lose_nothing(tmp_path):
    journal = Journal(Workspace(tmp_path))
    code = (
        "import sys; from lmeraser.unlearning.requests import Journal; from lmeraser.workspace import Workspace\n"
        "j = Journal(Workspace(sys.argv[1]))\n"
        "for i in range(50): j.append([{'request_id': f'{sys.argv[2]}-{i}', 'state': 'received', 'request': {'request_id': f'{sys.argv[2]}-{i}'}}])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name]) for name in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(journal.pending()) == 150


def test_re_forgetting_a_subject_is_a_recorded_noop(ws, tmp_path):
    """Once a batch has forgotten subject S, a new request for S is accepted and recorded as a
    no-op (like an id forgotten before); a subject never seen is still refused."""
    import shutil

    from lmeraser.data.splits import remove_samples

    copy = Workspace(tmp_path)
    shutil.copytree(ws.data, copy.data)
    private = copy.manifest("private")
    subject = private["subject_id"].value_counts().index[0]
    first = resolve(RequestSpec(subjects=[subject]), copy)
    journal = Journal(copy)
    journal.submit([first])
    journal.append([{"request_id": first.request_id, "state": "verified", "time": 0.0, "record": 1}])
    remove_samples(first.sample_ids, "private", copy)
    again = resolve(RequestSpec(subjects=[subject]), copy)
    assert again.sample_ids == [] and again.subjects_already_forgotten == [Keyer(copy).subject(subject)]
    with pytest.raises(LmeraserError, match="never forgotten"):
        resolve(RequestSpec(subjects=["s99998"]), copy)
