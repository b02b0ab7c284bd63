"""Request validation and the journal: refusals name what is wrong and write nothing."""

import json
import subprocess
import sys

import pytest

from lmeraser.data.splits import add_tombstones
from lmeraser.errors import LmeraserError
from lmeraser.journal import Journal
from lmeraser.request import RequestSpec
from lmeraser.salt import Keyer
from lmeraser.unlearning.intake import parse_requests_file, resolve
from lmeraser.workspace import Workspace

from helpers import TINY, build_workspace, received_event


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("requests"), TINY)


def test_resolve_subject_and_ids(ws):
    private = ws.split("private").manifest
    subject = private["subject_id"].value_counts().index[0]
    members = private.loc[private.subject_id == subject, "sample_id"].tolist()
    resolved = resolve(RequestSpec(subjects=[subject]), ws)
    assert list(resolved.request.sample_ids) == members and len(members) >= 2
    assert resolved.subjects == [subject] and resolved.request.subject_hashes == ()  # keyed only when journaled
    assert not ws.subject_salt_file.exists()  # validation writes nothing, not even the salt
    [journaled] = Journal(ws).submit([resolved])
    assert journaled.subject_hashes == (Keyer(ws).subject(subject),) and subject not in ws.journal_file.read_text()
    assert Journal(ws).pending() == [journaled]
    assert ws.subject_salt_file.stat().st_mode & 0o777 == 0o600


def test_unknown_public_and_test_ids_are_refused(ws):
    with pytest.raises(LmeraserError, match="sample id ffffffffffffffffffff is unknown"):
        resolve(RequestSpec(sample_ids=["ffffffffffffffffffff"]), ws)
    public_id = ws.split("public").sample_ids[0]
    with pytest.raises(LmeraserError, match="is public.*--allow-backbone-rebuild"):
        resolve(RequestSpec(sample_ids=[public_id]), ws)
    assert resolve(RequestSpec(sample_ids=[public_id], allow_backbone_rebuild=True), ws).request.public
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
    resolved = resolve(RequestSpec(sample_ids=[victim.sample_id]), copy).request
    assert resolved.sample_ids == () and resolved.already_forgotten == (victim.sample_id,)


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
    journal.append([received_event("r1")])
    journal.append([received_event("r2")])
    journal.append([{"request_id": "r1", "state": "verified", "time": 1.0, "record": 1}])
    assert [r.request_id for r in journal.pending()] == ["r2"]
    with open(journal.path, "ab") as handle:
        handle.write(b'{"request_id": "r3", "sta')  # killed mid-append
    assert [r.request_id for r in journal.pending()] == ["r2"]
    journal.append([received_event("r4")])
    assert [r.request_id for r in journal.pending()] == ["r2", "r4"]
    assert all(line.startswith(b"{") for line in journal.path.read_bytes().splitlines())


def test_concurrent_appends_serialise_and_lose_nothing(tmp_path):
    journal = Journal(Workspace(tmp_path))
    code = (
        "import sys; from lmeraser.journal import Journal; from lmeraser.workspace import Workspace\n"
        "j = Journal(Workspace(sys.argv[1]))\n"
        "from lmeraser.request import Request; from lmeraser.journal import received\n"
        "for i in range(50): j.append([received(Request(request_id=f'{sys.argv[2]}-{i}', kind='forget', "
        "sample_ids=(), received_at=0.0))])\n"
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
    journal.append([{"request_id": first.request.request_id, "state": "verified", "time": 0.0, "record": 1}])
    remove_samples(list(first.request.sample_ids), "private", copy)
    again = resolve(RequestSpec(subjects=[subject]), copy).request
    assert again.sample_ids == () and again.subjects_already_forgotten == (Keyer(copy).subject(subject),)
    with pytest.raises(LmeraserError, match="never forgotten"):
        resolve(RequestSpec(subjects=["s99998"]), copy)


def test_request_status_deadlines_and_flags(tmp_path):
    """`lmeraser requests`: deadline = receipt + one calendar month (GDPR Art. 12(3)); flags for
    due soon (7 days), overdue, and done late; --pending, --overdue and --json."""
    import time as _time
    from datetime import UTC, datetime

    import yaml
    from typer.testing import CliRunner

    from lmeraser.cli import app
    from lmeraser.config import RequestsParams
    from lmeraser.unlearning.status import add_months, request_statuses

    assert add_months(datetime(2027, 1, 31, tzinfo=UTC), 1) == datetime(2027, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2028, 1, 31, tzinfo=UTC), 1) == datetime(2028, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2027, 12, 15, tzinfo=UTC), 1) == datetime(2028, 1, 15, tzinfo=UTC)
    day, now = 86400.0, _time.time()
    journal = Journal(Workspace(tmp_path))

    def received(rid, days_ago, method="exact"):
        at = now - days_ago * day
        return received_event(rid, at, method)

    journal.append(
        [
            received("old", 40),
            received("soon", 27),
            received("done", 40),
            received("late", 70, "influence"),
            received("new", 0),
        ]
    )
    journal.append([{"request_id": "late", "state": "approximated", "time": now - 69 * day, "record": 1}])
    journal.append([{"request_id": "done", "state": "verified", "time": now - 35 * day, "record": 2}])
    journal.append([{"request_id": "late", "state": "verified", "time": now - 20 * day, "record": 3}])
    statuses = {s.request_id: s for s in request_statuses(Workspace(tmp_path), RequestsParams())}
    assert {rid: s.flag for rid, s in statuses.items()} == {
        "old": "overdue",
        "soon": "due soon",
        "done": "",
        "late": "late",
        "new": "",
    }
    assert (
        statuses["late"].records == [1, 3]
        and statuses["late"].method == "influence"
        and statuses["late"].state == "verified"
    )
    assert [h["state"] for h in statuses["late"].history] == ["received", "approximated", "verified"]
    assert (
        request_statuses(Workspace(tmp_path), RequestsParams(warn_days=0))[-2].flag == ""
    )  # "soon" is no longer flagged

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"requests": {"deadline_months": 2}}))
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["requests", "--root", str(tmp_path), "--json"]).stdout)
    flags = {r["request_id"]: r["flag"] for r in listed}
    assert flags["old"] == "" and flags["late"] == ""  # two months from receipt: neither is late
    (tmp_path / "params.yaml").write_text("")
    overdue = runner.invoke(app, ["requests", "--root", str(tmp_path), "--overdue", "--json"])
    assert [r["request_id"] for r in json.loads(overdue.stdout)] == ["old"]
    pending = json.loads(runner.invoke(app, ["requests", "--root", str(tmp_path), "--pending", "--json"]).stdout)
    assert sorted(r["request_id"] for r in pending) == ["new", "old", "soon"]
    table = runner.invoke(app, ["requests", "--root", str(tmp_path)])
    assert table.exit_code == 0 and "overdue" in table.stdout and "2 request(s) overdue or due soon" in table.stderr


def test_version():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from lmeraser.cli import app

    done = CliRunner().invoke(app, ["--version"])
    assert done.exit_code == 0 and done.stdout.strip() == f"lmeraser {version('lmeraser')}"


def test_a_corrected_image_must_have_the_datas_channels_and_is_never_converted():
    import io

    import numpy as np
    from PIL import Image

    from lmeraser.request import decode_corrected_image

    def png(mode: str, size=(6, 5)) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, size, 200 if mode == "L" else (10, 20, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    rgb = decode_corrected_image(png("RGB"), "x.png", False, (5, 6, 3))
    assert rgb.shape == (5, 6, 3) and rgb[0, 0].tolist() == [10, 20, 30]
    assert decode_corrected_image(png("L"), "x.png", False, (5, 6)).shape == (5, 6)
    with pytest.raises(LmeraserError, match="a L image, but the data is RGB; give an RGB image, it is never converted"):
        decode_corrected_image(png("L"), "x.png", False, (5, 6, 3))
    with pytest.raises(LmeraserError, match="a RGBA image, but the data is RGB"):
        decode_corrected_image(png("RGBA"), "x.png", False, (5, 6, 3))
    with pytest.raises(LmeraserError, match="a RGB image, but the data is grey"):
        decode_corrected_image(png("RGB"), "x.png", False, (5, 6))
    with pytest.raises(LmeraserError, match="corrected input is 5x6, expected \\(6, 6, 3\\)"):
        decode_corrected_image(png("RGB"), "x.png", False, (6, 6, 3))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((5, 6), np.uint8))
    with pytest.raises(LmeraserError, match="has shape \\(5, 6\\), expected \\(5, 6, 3\\)"):
        decode_corrected_image(buffer.getvalue(), "x.npy", True, (5, 6, 3))


def test_journal_values_of_the_wrong_type_are_an_altered_journal_for_every_reader(tmp_path):
    """What a stranger wrote into a journal (a record named by a word, a time that is not a
    number, NaN, a year 10^292, extra fields, a request whose id is not its event's): `lmeraser
    requests`, the batch and `audit verify` all read the journal through one parser, and each
    refuses it with the same sentence instead of crashing or passing."""
    import math

    from lmeraser.audit.verify import _check_journal

    ws = Workspace(tmp_path)
    good = received_event("req-000000000001", 1_800_000_000.0)
    cases = {
        "a record named by a word": {
            "request_id": "req-000000000001",
            "state": "verified",
            "time": 1.0,
            "record": "one",
        },
        "a time that is a word": {"request_id": "req-000000000001", "state": "applied", "time": "yesterday"},
        "a NaN time": {"request_id": "req-000000000001", "state": "applied", "time": math.nan},
        "a bool record": {"request_id": "req-000000000001", "state": "verified", "time": 1.0, "record": True},
        "an extra field": {**good, "note": "hello"},
        "an unknown state": {"request_id": "req-000000000001", "state": "bogus", "time": 1.0},
        "another request's id": {**good, "request_id": "req-000000000002"},
        "a year 10^292": {**good, "request": {**good["request"], "received_at": 1e300}},
        "a coerced label": {**good, "request": {**good["request"], "kind": "rectify", "label": "7"}},
        "a path outside": {
            **good,
            "request": {**good["request"], "kind": "rectify", "label": None, "input_path": "/etc/passwd"},
        },
    }
    ws.journal_file.parent.mkdir(parents=True, exist_ok=True)
    for bad in cases.values():  # the keys say what each case is
        lines = [json.dumps(good), json.dumps(bad)] if bad.get("state") != "received" else [json.dumps(bad)]
        ws.journal_file.write_text("\n".join(lines) + "\n")  # json.dumps writes NaN, and json.loads reads it back
        for read in (lambda: Journal(ws).pending(), lambda: _check_journal(ws, [])):
            with pytest.raises(LmeraserError, match="not a journal event"):
                read()
        with pytest.raises(ValueError):  # and none of it can be appended
            Journal(Workspace(tmp_path / "fresh")).append([bad])
    ws.journal_file.write_text(json.dumps(good) + "\n")
    assert [r.request_id for r in Journal(ws).pending()] == ["req-000000000001"]
