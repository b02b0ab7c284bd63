"""Keys, head, salt and log as trust anchors (issue 21, findings 1, 2, 3 and 7): real files, real
Ed25519 keys, real git repositories and journals in temporary workspaces; no mocks."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmeraser.errors import DataError, LmeraserError
from lmeraser.lineage import keys
from lmeraser.lineage.log import LineageLog
from lmeraser.workspace import KEY_FILE_ENV, Workspace

from helpers import BIN, received_event

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
AUDIT_FILES = ("audit/lineage.jsonl", "audit/lineage.head.json", "audit/lineage-public-key.pem", "audit/journal.jsonl")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setattr(keys, "_taken", None)
    return Workspace(tmp_path / "ws")


def _record(ws: Workspace, request_id: str):
    """Sign and append one record listing `request_id`, then journal it `verified`, as a batch does."""
    from lmeraser.journal import Journal
    from lmeraser.lineage.records import lineage_log, signing_key

    record = lineage_log(ws).append(
        {"artifacts/prompts/index.json": os.urandom(32).hex()},
        {"requests": [{"request_id": request_id}]},
        signing_key(ws),
    )
    Journal(ws).append([received_event(request_id)])
    Journal(ws).append([{"request_id": request_id, "state": "verified", "time": time.time(), "record": record.number}])
    return record


def _git(ws: Workspace, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=ws.root, check=True, capture_output=True, text=True).stdout


def _commit(ws: Workspace, message: str) -> None:
    _git(ws, "add", "--", *[name for name in AUDIT_FILES if (ws.root / name).exists()])
    _git(ws, "commit", "-qm", message)


def _verified(ws: Workspace, pubkey=None):
    from lmeraser.audit.verify import public_key, verified_records

    return verified_records(ws, public_key(ws, pubkey))


def _re_sign(ws: Workspace, intruder: Ed25519PrivateKey) -> None:
    """What an intruder who can write audit/ does: re-sign every record and the head with a key of theirs."""
    log = LineageLog(ws.lineage_file)
    forged = LineageLog(ws.root / "forged.jsonl")
    for record in log.read_unverified():
        body = {
            k: v
            for k, v in record.predicate.items()
            if k not in ("sequence", "previous_record_sha256", "anchored", "signer")
        }
        forged.append(record.subjects, {**body, "signer": keys.key_id(intruder.public_key())}, intruder)
    os.replace(forged.path, log.path)
    os.replace(forged.head_path, log.head_path)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# -- finding 1: the pinned signer ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["outside the workspace", "an untracked file inside it"])
def test_a_pinned_signer_swapped_through_a_symlink_fails(ws, tmp_path, where):
    _record(ws, "r1")
    _record(ws, "r2")
    _git(ws, "init", "-q")
    _commit(ws, "records")
    assert len(_verified(ws)) == 2
    intruder = Ed25519PrivateKey.generate()
    target = tmp_path / "elsewhere" / "pub.pem" if where.startswith("outside") else ws.audit / "other-key.pem"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(keys.public_pem(intruder))
    ws.signer_file.unlink()
    ws.signer_file.symlink_to(target)
    _re_sign(ws, intruder)
    with pytest.raises(LmeraserError, match="pinned signer is a symbolic link"):
        _verified(ws)
    with pytest.raises(LmeraserError, match="symbolic link"):
        from lmeraser.lineage.records import signing_key

        signing_key(ws)  # nor does a batch sign with a key the link points to


def test_a_new_signer_committed_to_git_without_a_rotation_fails(ws):
    _record(ws, "r1")
    _git(ws, "init", "-q")
    _commit(ws, "record 1")
    intruder = Ed25519PrivateKey.generate()
    ws.signer_file.write_bytes(keys.public_pem(intruder))
    _re_sign(ws, intruder)
    _commit(ws, "a new key, committed")
    with pytest.raises(
        LmeraserError,
        match=r"commit [0-9a-f]{12} pinned the signer ed25519:[0-9a-f]{64}, which is none of the log's signers",
    ):
        _verified(ws)


def test_an_uncommitted_pin_beside_a_committed_head_fails(ws):
    _record(ws, "r1")
    _git(ws, "init", "-q")
    _git(ws, "add", "audit/lineage.jsonl", "audit/lineage.head.json")
    _git(ws, "commit", "-qm", "log only")
    with pytest.raises(LmeraserError, match="not committed, though the signed head is"):
        _verified(ws)


def test_a_key_rotation_is_a_signed_record_and_the_only_way_to_change_the_signer(ws):
    from lmeraser.lineage.records import rotate_key, signing_key, summary_row

    _record(ws, "r1")
    _git(ws, "init", "-q")
    _commit(ws, "record 1")
    old = signing_key(ws)
    old_public = ws.root.parent / "auditors-copy.pem"
    old_public.write_bytes(keys.public_pem(old))
    rotation = rotate_key(ws, reason="yearly")
    new = signing_key(ws)
    assert rotation.is_rotation and rotation.number == 2
    assert rotation.predicate["old_signer"] == keys.key_id(old.public_key()) and rotation.predicate[
        "new_signer"
    ] == keys.key_id(new.public_key())
    assert (
        rotation.subjects == LineageLog(ws.lineage_file).read_unverified()[0].subjects
    )  # a rotation changes no artifact
    envelope = json.loads(LineageLog(ws.lineage_file).envelope(2))
    assert {s["keyid"] for s in envelope["signatures"]} == {
        keys.key_id(old.public_key()),
        keys.key_id(new.public_key()),
    }
    assert stat.S_IMODE(ws.signing_key_file.stat().st_mode) == 0o600
    assert keys.key_id(keys.load_public_key(ws.signer_file)) == keys.key_id(new.public_key())
    assert not ws.signing_key_file.with_name(ws.signing_key_file.name + ".next").exists()
    assert summary_row(rotation)["method"] == "key rotation"
    # Verifies before the rotation is committed (the log hands over from the committed key) and after.
    assert len(_verified(ws)) == 2
    _record(ws, "r3")
    _commit(ws, "rotation")
    records = _verified(ws)
    assert len(records) == 3 and keys.key_id(keys.load_public_key(ws.signer_file)) == keys.key_id(new.public_key())
    assert len(_verified(ws, old_public)) == 3  # an auditor's copy of the retired key still anchors the log
    # The retired key signs nothing more, and a rotation needs the current key's signature.
    with pytest.raises(LmeraserError, match="was retired by a key rotation"):
        LineageLog(ws.lineage_file).append({"x": "0" * 64}, {"requests": []}, old)
    intruder = Ed25519PrivateKey.generate()
    with pytest.raises(LmeraserError, match="none of the log's signers|no signature by key"):
        LineageLog(ws.lineage_file).rotate(intruder, Ed25519PrivateKey.generate(), {})
    assert len(_verified(ws)) == 3


def test_a_forged_rotation_record_fails(ws):
    """A rotation the current signer did not sign (here: signed only by the key it hands over to,
    which also re-signs the head and the pin) fails at its record."""
    import hashlib

    from lmeraser.io import canonical_json
    from lmeraser.lineage.dsse import sign, statement
    from lmeraser.lineage.log import ROTATION_TYPE, Head
    from lmeraser.lineage.records import signing_key

    _record(ws, "r1")
    old, intruder = signing_key(ws), Ed25519PrivateKey.generate()
    log = LineageLog(ws.lineage_file)
    first = ws.lineage_file.read_bytes().splitlines()[0]
    predicate = {
        "method": "key-rotation",
        "old_signer": keys.key_id(old.public_key()),
        "new_signer": keys.key_id(intruder.public_key()),
        "old_public_key": keys.public_pem(old).decode(),
        "new_public_key": keys.public_pem(intruder).decode(),
        "signer": keys.key_id(old.public_key()),
        "sequence": 2,
        "previous_record_sha256": hashlib.sha256(first).hexdigest(),
        "anchored": True,
    }
    line = canonical_json(sign(statement(log.read_unverified()[0].subjects, predicate, ROTATION_TYPE), intruder))
    ws.lineage_file.write_bytes(first + b"\n" + line + b"\n")
    log._write_head(Head(2, hashlib.sha256(line).hexdigest()), intruder)
    ws.signer_file.write_bytes(keys.public_pem(intruder))
    with pytest.raises(LmeraserError, match="record 2: no signature by key"):
        _verified(ws)


def test_an_interrupted_rotation_fails_verify_until_rotate_key_finishes_it(ws):
    from lmeraser.lineage.records import rotate_key, signing_key

    _record(ws, "r1")
    old = signing_key(ws)
    code = (
        "from lmeraser.workspace import Workspace; from lmeraser.lineage.records import rotate_key; "
        f"rotate_key(Workspace({str(ws.root)!r}))"
    )
    env = {**os.environ, "LMERASER_FAILPOINT": "atomic:lineage-public-key.pem"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.returncode == -9  # killed after the log handed over, before the pin followed
    assert keys.key_id(keys.load_public_key(ws.signer_file)) == keys.key_id(old.public_key())
    with pytest.raises(LmeraserError, match="the pinned signer is .*, but the log's signer is"):
        _verified(ws)
    record = rotate_key(ws)  # finishes the hand-over the log records; no second rotation
    assert record.number == 2 and len(LineageLog(ws.lineage_file).read_unverified()) == 2
    new = signing_key(ws)
    assert keys.key_id(new.public_key()) == record.predicate["new_signer"] != keys.key_id(old.public_key())
    assert len(_verified(ws)) == 2


def test_the_signing_key_is_a_trust_anchor_too(ws, tmp_path):
    from lmeraser.lineage.records import signing_key

    _record(ws, "r1")
    real = tmp_path / "moved.pem"
    os.replace(ws.signing_key_file, real)
    ws.signing_key_file.symlink_to(real)
    with pytest.raises(LmeraserError, match="signing key is a symbolic link"):
        signing_key(ws)
    ws.signing_key_file.unlink()
    os.mkfifo(ws.signing_key_file, 0o600)
    with pytest.raises(LmeraserError, match="signing key is not a regular file \\(a FIFO\\)"):
        signing_key(ws)


# -- finding 2: the subject salt ------------------------------------------------------------------


@pytest.mark.parametrize("evidence", ["suppression list", "lineage record", "tombstone", "journaled subject"])
def test_a_lost_salt_is_never_regenerated(ws, evidence):
    from lmeraser import suppression
    from lmeraser.data.splits import add_tombstones
    from lmeraser.journal import Journal
    from lmeraser.salt import Keyer

    keyer = Keyer(ws)
    assert stat.S_IMODE(ws.subject_salt_file.stat().st_mode) == 0o600 and len(ws.subject_salt_file.read_bytes()) == 32
    row = {"sample_id": "ab" * 10, "content_key": keyer.content("c" * 64), "reason": "forget"}
    if evidence == "suppression list":
        suppression.add(ws, [row])
    elif evidence == "lineage record":
        _record(ws, "r1")
    elif evidence == "tombstone":
        ws.data.mkdir(parents=True, exist_ok=True)
        add_tombstones([row], ws)
    else:
        Journal(ws).append([received_event("r1", subject_hashes=(keyer.subject("alice"),))])
    ws.subject_salt_file.unlink()
    for create in (True, False):  # the next forget, batch or data init
        with pytest.raises(
            DataError, match="secret salt is missing, though .* keyed with it; restore it from your secret store"
        ):
            Keyer(ws, create=create)
    assert not ws.subject_salt_file.exists()
    from lmeraser.salt import check_salt  # what a batch's capture step calls before any change

    with pytest.raises(DataError, match="secret salt is missing, though .* keyed with it"):
        check_salt(ws)


def test_a_fresh_workspace_may_make_its_salt_once(ws):
    from lmeraser.salt import Keyer, check_salt

    assert check_salt(ws) is False and not ws.subject_salt_file.exists()  # nothing keyed yet: made on first use
    first = Keyer(ws).subject("alice")
    assert Keyer(ws).subject("alice") == first  # read back, never remade
    assert stat.S_IMODE(ws.keys_dir.stat().st_mode) == 0o700


def test_a_salt_readable_by_others_short_long_or_linked_is_refused(ws, tmp_path):
    from lmeraser.salt import Keyer

    Keyer(ws)
    path = ws.subject_salt_file
    good = path.read_bytes()
    os.chmod(path, 0o644)
    with pytest.raises(DataError, match="secret salt is readable by others \\(mode 644\\); run `chmod 600"):
        Keyer(ws)
    os.chmod(path, 0o600)
    for size in (5, 33):
        path.write_bytes(b"s" * size)
        with pytest.raises(DataError, match=f"secret salt is {size} bytes, not 32") as caught:
            Keyer(ws)
        assert "sssss" not in str(caught.value)  # a secret never appears in a message
    path.unlink()
    (tmp_path / "salt").write_bytes(good)
    os.chmod(tmp_path / "salt", 0o600)
    path.symlink_to(tmp_path / "salt")
    with pytest.raises(DataError, match="secret salt is a symbolic link"):
        Keyer(ws)


def _python(code: str, timeout: int = 120, memory: int | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter; with `memory`, its address space capped (bytes)."""

    def cap():
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, preexec_fn=cap)


def test_a_fifo_salt_is_refused_without_blocking(ws):
    ws.keys_dir.mkdir(parents=True, mode=0o700)
    os.mkfifo(ws.subject_salt_file, 0o600)
    code = (
        "from lmeraser.workspace import Workspace; from lmeraser.salt import Keyer; "
        "from lmeraser.errors import LmeraserError\n"
        f"try:\n    Keyer(Workspace({str(ws.root)!r}))\nexcept LmeraserError as error:\n    print(error)"
    )
    done = _python(code, timeout=60)  # before: blocked forever opening the FIFO
    assert done.returncode == 0 and "secret salt is not a regular file (a FIFO)" in done.stdout, done.stderr


# -- finding 3: rollback ----------------------------------------------------------------------------


def test_a_log_rolled_back_with_its_head_fails_against_the_journal(ws):
    _record(ws, "r1")
    earlier = {name: (ws.root / name).read_bytes() for name in ("audit/lineage.jsonl", "audit/lineage.head.json")}
    _record(ws, "r2")
    assert len(_verified(ws)) == 2
    for name, raw in earlier.items():
        (ws.root / name).write_bytes(raw)
    assert (
        len(LineageLog(ws.lineage_file).verify(keys.load_public_key(ws.signer_file))) == 1
    )  # the log alone looks sound
    with pytest.raises(
        LmeraserError,
        match="request r2 was verified by lineage record 2, but the log holds 1 record\\(s\\); the log was rolled back",
    ):
        _verified(ws)


def test_a_log_rolled_back_with_its_journal_fails_against_the_head_history(ws):
    _record(ws, "r1")
    _git(ws, "init", "-q")
    _commit(ws, "record 1")
    first = _git(ws, "rev-parse", "HEAD").strip()
    _record(ws, "r2")
    _commit(ws, "record 2")
    assert len(_verified(ws)) == 2
    _git(ws, "checkout", first, "--", "audit/lineage.jsonl", "audit/lineage.head.json", "audit/journal.jsonl")
    _git(ws, "commit", "-qm", "roll back")
    with pytest.raises(
        LmeraserError,
        match="holds 1 record\\(s\\), but the signed head committed in [0-9a-f]{12} listed 2; the log was rolled back",
    ):
        _verified(ws)


def test_a_journal_naming_a_record_that_does_not_list_its_request_fails(ws):
    from lmeraser.journal import Journal

    _record(ws, "r1")
    _record(ws, "r2")
    Journal(ws).append([{"request_id": "r9", "state": "approximated", "time": time.time(), "record": 1}])
    with pytest.raises(LmeraserError, match="request r9 was approximated by lineage record 1, which does not list it"):
        _verified(ws)


# -- finding 7: anchors that are no regular file ---------------------------------------------------


@pytest.mark.parametrize("anchor", ["head", "pin"])
def test_a_directory_head_or_pin_is_one_sentence(ws, anchor):
    _record(ws, "r1")
    path = LineageLog(ws.lineage_file).head_path if anchor == "head" else ws.signer_file
    path.unlink()
    path.mkdir()
    with pytest.raises(LmeraserError, match="is not a regular file \\(a directory\\)"):
        _verified(ws)


def test_a_head_linked_to_dev_zero_is_refused_without_reading_it(ws):
    _record(ws, "r1")
    head = LineageLog(ws.lineage_file).head_path
    head.unlink()
    head.symlink_to("/dev/zero")
    code = (
        "from lmeraser.workspace import Workspace; from lmeraser.audit.verify import public_key, verified_records\n"
        "from lmeraser.errors import LmeraserError\n"
        f"ws = Workspace({str(ws.root)!r})\n"
        "try:\n    verified_records(ws, public_key(ws))\nexcept LmeraserError as error:\n    print(error)"
    )
    done = _python(code, timeout=300, memory=3 << 29)  # before: read /dev/zero until memory ran out
    assert done.returncode == 0 and "signed head is a symbolic link" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("anchor", ["head", "pin"])
def test_audit_verify_refuses_a_fifo_head_or_pin_without_blocking(ws, anchor):
    _record(ws, "r1")
    path = LineageLog(ws.lineage_file).head_path if anchor == "head" else ws.signer_file
    path.unlink()
    os.mkfifo(path)
    done = subprocess.run(
        [str(BIN / "lmeraser"), "audit", "verify", "--root", str(ws.root)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr
    what = "signed head" if anchor == "head" else "pinned signer"
    assert f"{what} is not a regular file (a FIFO)" in done.stderr and "Traceback" not in done.stderr


def test_read_trusted_bounds_what_it_reads(tmp_path):
    from lmeraser.io import MissingFile, read_trusted

    path = tmp_path / "anchor"
    path.write_bytes(b"x" * 100)
    assert read_trusted(path, "anchor", 100) == b"x" * 100
    with pytest.raises(LmeraserError, match="anchor is 101 bytes, over the limit of 100"):
        path.write_bytes(b"x" * 101)
        read_trusted(path, "anchor", 100)
    with pytest.raises(MissingFile):
        read_trusted(tmp_path / "absent", "anchor", 100)
    (tmp_path / "link").symlink_to(path)
    assert read_trusted(tmp_path / "link", "anchor", 200, follow_links=True) == b"x" * 101  # a path the user named
    with pytest.raises(LmeraserError, match="is a symbolic link"):
        read_trusted(tmp_path / "link", "anchor", 200)
