"""Signing, chaining and every tamper case of the lineage log."""

import base64
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmeraser.errors import LmeraserError
from lmeraser.lineage import keys
from lmeraser.lineage.dsse import IN_TOTO_PAYLOAD_TYPE, open_envelope, pae, sign, statement
from lmeraser.lineage.log import GENESIS, LineageLog


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log(tmp_path, key):
    log = LineageLog(tmp_path / "lineage.jsonl")
    for i in range(4):
        log.append(
            {"artifacts/prompts/index.json": f"{i:064x}"}, {"request_ids": [f"r{i}"], "clusters_rebuilt": [i]}, key
        )
    return log


def test_pae_matches_the_dsse_spec():
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_envelope_round_trip_and_wrong_key(key):
    stmt = statement({"model": "ab" * 32}, {"x": 1})
    envelope = sign(stmt, key)
    assert envelope["payloadType"] == IN_TOTO_PAYLOAD_TYPE
    assert envelope["signatures"][0]["keyid"] == keys.key_id(key.public_key())
    assert open_envelope(envelope, key.public_key()) == stmt
    with pytest.raises(ValueError, match="no signature by key"):
        open_envelope(envelope, Ed25519PrivateKey.generate().public_key())


def test_chain_verifies(log, key):
    records = log.verify(key.public_key())
    assert [r.number for r in records] == [1, 2, 3, 4]
    assert records[0].predicate["previous_record_sha256"] == GENESIS
    assert records[2].predicate["previous_record_sha256"] == records[1].line_sha256
    assert records[3].subjects == {"artifacts/prompts/index.json": f"{3:064x}"}


def _lines(log):
    return log.path.read_bytes().split(b"\n")[:-1]


def _write(log, lines):
    log.path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_any_changed_byte_is_caught_and_named(log, key):
    original = log.path.read_bytes()
    lines = _lines(log)
    for number in (1, 3):
        for position in (5, len(lines[number - 1]) // 2, len(lines[number - 1]) - 3):
            mutated = bytearray(lines[number - 1])
            mutated[position] = ord("A") if mutated[position] != ord("A") else ord("B")
            _write(log, [*lines[: number - 1], bytes(mutated), *lines[number:]])
            with pytest.raises(LmeraserError, match=f"record {number}"):
                log.verify(key.public_key())
    log.path.write_bytes(original)
    log.verify(key.public_key())


def test_altered_payload_with_valid_json_is_caught(log, key):
    lines = _lines(log)
    envelope = json.loads(lines[1])
    stmt = json.loads(base64.b64decode(envelope["payload"]))
    stmt["predicate"]["clusters_rebuilt"] = [99]
    envelope["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    _write(log, [lines[0], json.dumps(envelope).encode(), *lines[2:]])
    with pytest.raises(LmeraserError, match="record 2: signature does not verify"):
        log.verify(key.public_key())


def test_removed_record_is_caught(log, key):
    lines = _lines(log)
    _write(log, [lines[0], *lines[2:]])
    with pytest.raises(LmeraserError, match="record 2: sequence number is 3"):
        log.verify(key.public_key())
    _write(log, lines[1:])
    with pytest.raises(LmeraserError, match="record 1"):
        log.verify(key.public_key())


def test_reordered_records_are_caught(log, key):
    lines = _lines(log)
    _write(log, [lines[0], lines[2], lines[1], lines[3]])
    with pytest.raises(LmeraserError, match="record 2"):
        log.verify(key.public_key())


def test_record_re_signed_by_another_key_is_caught(log, key):
    lines = _lines(log)
    envelope = json.loads(lines[1])
    stmt = json.loads(base64.b64decode(envelope["payload"]))
    forged = sign(stmt, Ed25519PrivateKey.generate())
    _write(log, [lines[0], json.dumps(forged).encode(), *lines[2:]])
    with pytest.raises(LmeraserError, match="record 2: no signature by key"):
        log.verify(key.public_key())


def test_key_is_created_0600_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    path = tmp_path / "keys" / "signing.pem"
    first = keys.load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = keys.load_or_create_key(path)
    assert keys.key_id(first.public_key()) == keys.key_id(second.public_key())
    os.chmod(path, 0o644)
    with pytest.raises(LmeraserError, match="readable by others"):
        keys.load_or_create_key(path)


def test_key_from_environment_and_public_export(tmp_path, monkeypatch, key):
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    monkeypatch.setenv(keys.KEY_ENV, pem.decode())
    loaded = keys.load_or_create_key(tmp_path / "unused.pem")
    assert keys.key_id(loaded.public_key()) == keys.key_id(key.public_key())
    assert not (tmp_path / "unused.pem").exists()
    (tmp_path / "pub.pem").write_bytes(keys.public_pem(key))
    assert keys.key_id(keys.load_public_key(tmp_path / "pub.pem")) == keys.key_id(key.public_key())
    monkeypatch.setenv(keys.KEY_ENV, "not a key")
    with pytest.raises(LmeraserError, match="not a PEM private key"):
        keys.load_or_create_key(tmp_path / "unused.pem")


def test_key_file_location_is_configurable(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    from lmeraser.workspace import KEY_FILE_ENV, Workspace

    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "vault" / "lmeraser.pem"))
    ws = Workspace(tmp_path / "ws")
    assert ws.signing_key_file == tmp_path / "vault" / "lmeraser.pem"
    keys.load_or_create_key(ws.signing_key_file)
    assert stat.S_IMODE((tmp_path / "vault" / "lmeraser.pem").stat().st_mode) == 0o600
    monkeypatch.delenv(KEY_FILE_ENV)
    assert ws.signing_key_file == tmp_path / "ws" / "audit" / "keys" / "signing-key.pem"


def test_replay_names_the_record_that_superseded_a_cluster():
    from lmeraser.audit.replay import superseded_by
    from lmeraser.lineage.log import Record

    def record(number, rebuilt=(), edited=()):
        predicate = {
            "clusters_rebuilt": [{"cluster": c} for c in rebuilt],
            "clusters_edited": [{"cluster": c} for c in edited],
        }
        return Record(number, "0" * 64, {"predicate": predicate})

    first = record(1, rebuilt=[3, 5])
    later = [first, record(2, rebuilt=[7]), record(3, edited=[5]), record(4, rebuilt=[3])]
    assert superseded_by(first, later, 3) == 4 and superseded_by(first, later, 5) == 3
    assert superseded_by(first, later, 9) is None and superseded_by(later[3], later, 3) is None


def test_keys_are_0600_from_the_first_byte_and_never_replaced_silently(tmp_path, monkeypatch):
    import os as _os

    from lmeraser import io

    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    modes = []
    real = io.atomic_path

    def spy(path, mode=None):
        manager = real(path, mode)
        tmp = manager.__enter__()
        modes.append(stat.S_IMODE(_os.stat(tmp).st_mode))  # before a byte is written
        return _Wrapped(manager, tmp)

    class _Wrapped:
        def __init__(self, manager, tmp):
            self.manager, self.tmp = manager, tmp

        def __enter__(self):
            return self.tmp

        def __exit__(self, *exc):
            return self.manager.__exit__(*exc)

    monkeypatch.setattr(io, "atomic_path", spy)
    keys.load_or_create_key(tmp_path / "k.pem")
    assert modes == [0o600]
    with pytest.raises(LmeraserError, match="no new key is made"):
        keys.load_or_create_key(tmp_path / "absent.pem", create=False)
    assert not (tmp_path / "absent.pem").exists()


def test_a_missing_key_is_not_replaced_once_records_exist(tmp_path, monkeypatch):
    """forget/unlearn (sign_and_append) and export-key make a key only for the first record."""
    from lmeraser.workspace import Workspace

    from helpers import lmeraser_cli

    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    ws = Workspace(tmp_path)
    ws.lineage_file.parent.mkdir(parents=True)
    ws.lineage_file.write_text("{}\n")  # a log with a record, its key gone
    done = lmeraser_cli(
        "audit", "export-key", "--root", str(tmp_path), "--out", str(tmp_path / "pub.pem"), cwd=tmp_path
    )
    assert done.returncode == 1 and "no new key is made" in done.stderr
    assert not ws.signing_key_file.exists() and not (tmp_path / "pub.pem").exists()


def test_child_processes_never_see_the_signing_key(monkeypatch):
    from lmeraser.versioning import child_env

    monkeypatch.setenv(keys.KEY_ENV, "-----BEGIN PRIVATE KEY-----secret")
    env = child_env(PATH="/bin")
    assert keys.KEY_ENV not in env and env["PATH"] == "/bin"


def test_removed_trailing_records_are_caught_and_numbers_never_reused(log, key):
    """The chain alone cannot see a shortened log; the signed head can, and append refuses it."""
    lines = _lines(log)
    _write(log, lines[:3])
    with pytest.raises(LmeraserError, match="1 trailing record\\(s\\) were removed: the signed head lists 4"):
        log.verify(key.public_key())
    with pytest.raises(LmeraserError, match="trailing record"):
        log.append({"a": "0" * 64}, {"next": True}, key)  # would have reused number 4
    assert _lines(log) == lines[:3]
    log.head_path.unlink()
    with pytest.raises(LmeraserError, match="signed head is missing, though record 1 was anchored"):
        log.verify(key.public_key())


def test_an_interrupted_append_verifies_and_the_next_append_re_anchors(log, key):
    head = log.head_path.read_bytes()
    log.append({"a": "1" * 64}, {"r": 5}, key)
    log.head_path.write_bytes(head)  # killed after the log was written, before the head
    assert len(log.verify(key.public_key())) == 5
    log.append({"a": "2" * 64}, {"r": 6}, key)
    assert log.head(key.public_key()).records == 6


def test_any_byte_level_damage_is_named_never_a_traceback(log, key):
    """Flips (including bytes that are not UTF-8), deletions and insertions at every 7th byte."""
    original = log.path.read_bytes()
    for position in range(0, len(original), 7):
        for mutated in (
            original[:position] + bytes([original[position] ^ 0x80]) + original[position + 1 :],
            original[:position] + original[position + 1 :],
            original[:position] + b"\xff" + original[position:],
        ):
            log.path.write_bytes(mutated)
            with pytest.raises(LmeraserError, match="record \\d+|lineage.jsonl"):
                log.verify(key.public_key())
    log.path.write_bytes(original)
    assert len(log.verify(key.public_key())) == 4


def _workspace_with_records(tmp_path, monkeypatch, n=2):
    from lmeraser.lineage.records import signing_key
    from lmeraser.workspace import Workspace

    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    ws = Workspace(tmp_path)
    log = LineageLog(ws.lineage_file)
    for i in range(n):
        log.append({"x": f"{i:064x}"}, {"i": i}, signing_key(ws))
    return ws, log


def test_the_signer_is_pinned_and_verify_trusts_the_pin_not_the_key_beside_the_log(tmp_path, monkeypatch):
    from lmeraser.audit.verify import public_key, verified_records
    from lmeraser.lineage.records import signing_key

    ws, log = _workspace_with_records(tmp_path, monkeypatch)
    pinned = keys.load_public_key(ws.signer_file)
    assert keys.key_id(pinned) == keys.key_id(keys.load_or_create_key(ws.signing_key_file).public_key())
    assert len(verified_records(ws, public_key(ws))) == 2
    # Whoever can write audit/ replaces the private key and re-signs the whole log and head.
    intruder = Ed25519PrivateKey.generate()
    ws.signing_key_file.unlink()
    ws.signing_key_file.write_bytes(
        intruder.private_bytes(
            keys.serialization.Encoding.PEM, keys.serialization.PrivateFormat.PKCS8, keys.serialization.NoEncryption()
        )
    )
    os.chmod(ws.signing_key_file, 0o600)
    with pytest.raises(LmeraserError, match="is not the pinned signer"):
        signing_key(ws)  # no record is signed with a key other than the pinned one
    forged = LineageLog(tmp_path / "forged.jsonl")
    for record in log.verify(pinned):
        forged.append(
            record.subjects,
            {k: v for k, v in record.predicate.items() if k not in ("sequence", "previous_record_sha256", "anchored")},
            intruder,
        )
    os.replace(forged.path, log.path)
    os.replace(forged.head_path, log.head_path)
    with pytest.raises(LmeraserError, match="record 1: no signature by key"):
        verified_records(ws, public_key(ws))


def test_a_replaced_pin_is_caught_against_the_committed_one(tmp_path, monkeypatch):
    import subprocess

    from lmeraser.audit.verify import public_key

    ws, _ = _workspace_with_records(tmp_path, monkeypatch, n=1)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "audit/lineage-public-key.pem"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "pin"], cwd=tmp_path, check=True)
    public_key(ws)
    ws.signer_file.write_bytes(keys.public_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(LmeraserError, match="differs from the committed version"):
        public_key(ws)


def test_a_configured_key_file_that_is_missing_is_never_created(tmp_path, monkeypatch):
    from lmeraser.lineage.records import signing_key
    from lmeraser.workspace import KEY_FILE_ENV, Workspace

    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "vault" / "key.pem"))
    with pytest.raises(LmeraserError, match="no new key is made"):
        signing_key(Workspace(tmp_path / "ws"))
    assert not (tmp_path / "vault").exists() and not (tmp_path / "ws" / "audit" / "lineage-public-key.pem").exists()


def test_the_key_from_the_environment_never_reaches_a_child_process(tmp_path, monkeypatch, key):
    """`lmeraser` moves $LMERASER_SIGNING_KEY into memory first: Prefect's server, dvc and git are
    started from a process whose environment no longer holds it."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    monkeypatch.setenv(keys.KEY_ENV, pem)
    monkeypatch.setattr(keys, "_taken", None)
    keys.take_key_from_environment()
    assert keys.KEY_ENV not in os.environ
    assert keys.key_id(keys.load_or_create_key(tmp_path / "unused.pem").public_key()) == keys.key_id(key.public_key())
    seen = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ.get('{keys.KEY_ENV}'))"], capture_output=True, text=True
    ).stdout
    assert seen.strip() == "None" and not (tmp_path / "unused.pem").exists()
