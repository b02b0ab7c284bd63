"""No false records: what a signed record says is checked against the data and the served bits,
and everything a batch needs is checked before the data changes.

One small DVC repository (TINY params) runs the real pipeline; the tests run in file order and
each leaves the workspace clean for the next (every batch finishes, or its refusal changed nothing).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmeraser.journal import Journal
from lmeraser.lineage.log import LineageLog
from lmeraser.workspace import SPLITS, Workspace

from helpers import clone_repo, commit_all, dvc, lmeraser_warm, repro_in_process, warm_ok

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def root(tiny_repo_template, tmp_path_factory):
    """This module's copy of the session's TINY repository after `dvc repro`, committed."""
    return clone_repo(tiny_repo_template[0], tmp_path_factory.mktemp("honest") / "repo")


_commit = commit_all


def _records(root):
    return LineageLog(root / "audit" / "lineage.jsonl").read_unverified()


def _present(root) -> set[str]:
    return {sid for split in SPLITS for sid in Workspace(root).manifest(split)["sample_id"]}


def _snapshot(root) -> dict[str, bytes]:
    """The bytes a refused batch must leave as they were: data/, data.dvc, dvc.lock, the log."""
    paths = [root / "data.dvc", root / "dvc.lock", root / "audit" / "suppression.csv", root / "audit" / "lineage.jsonl"]
    paths += sorted((root / "data").rglob("*"))
    return {str(p.relative_to(root)): p.read_bytes() for p in paths if p.is_file()}


def _private(root, i):
    return Workspace(root).manifest("private")["sample_id"][i]


def test_forget_after_a_rectification_erases_the_sample(root):
    """Finding 0a: a label correction is not an erasure. Forgetting a rectified sample removes it
    (the record counts it, nothing calls it 'already forgotten'); only then is it forgotten."""
    victim = _private(root, 5)
    warm_ok("rectify", "--sample-id", victim, "--label", "4", cwd=root)
    assert victim in _present(root)
    done = warm_ok("forget", "--sample-id", victim, cwd=root)
    assert "already forgotten" not in done.stdout
    assert victim not in _present(root)
    request = _records(root)[-1].predicate["requests"][0]
    assert request["kind"] == "forget" and request["samples"] == 1 and request["already_forgotten"] == []
    # Now it is forgotten: a rectification is refused, a second forget is a recorded no-op.
    refused = lmeraser_warm("rectify", "--sample-id", victim, "--label", "3", cwd=root)
    assert refused.returncode == 1 and "was forgotten and cannot be rectified" in refused.stderr
    again = warm_ok("forget", "--sample-id", victim, cwd=root)
    assert "1 already forgotten" in again.stdout
    from lmeraser.salt import Keyer

    predicate = _records(root)[-1].predicate
    assert predicate["requests"][0]["already_forgotten"] == [Keyer(Workspace(root)).subject("sample:" + victim)]
    assert victim not in json.dumps(predicate)  # a record names no raw id of a forgotten sample


def test_re_ingestion_keeps_a_corrected_image_and_label(root, tmp_path):
    """Finding 0b: `data init` after an image correction keeps the sample, with its corrected
    pixels and label, byte for byte as the batch left it; without data/ it refuses to guess."""
    ws = Workspace(root)
    private = ws.split("private")
    target, row = private.sample_ids[7], 7
    fixed = (255 - private.images[row]).astype(np.uint8)
    np.save(tmp_path / "fixed.npy", fixed)
    warm_ok("rectify", "--sample-id", target, "--input", str(tmp_path / "fixed.npy"), cwd=root)
    label = (int(private.labels[row]) + 1) % 10
    warm_ok("rectify", "--sample-id", target, "--label", str(label), cwd=root)
    before = _snapshot(root)
    done = warm_ok("data", "init", cwd=root)
    assert "1 image correction(s) re-applied" in done.stdout and "1 label correction(s)" in done.stdout
    assert _snapshot(root) == before  # the same data version: nothing to rebuild, nothing to record
    after = Workspace(root).split("private")
    i = after.sample_ids.index(target)
    assert np.array_equal(after.images[i], fixed) and int(after.labels[i]) == label
    status = dvc("status", cwd=root).stdout
    assert "data.dvc" not in status and "evaluate:" not in status, status
    # data/ gone: the corrected pixels are nowhere else, so re-ingesting would bring back the old ones.
    shutil.move(root / "data", tmp_path / "data-aside")
    refused = lmeraser_warm("data", "init", cwd=root)
    assert (
        refused.returncode == 1
        and f"no longer holds sample {target}" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    assert not (root / "data").exists()
    shutil.move(tmp_path / "data-aside", root / "data")
    _commit(root, "after re-ingestion")


def test_a_change_outside_any_batch_is_named_by_the_next_record(root):
    """Finding 0b, second half: what changed in the serving path since the last record (here a
    params change and `dvc repro`) is named, cluster by cluster, by the next batch's record."""
    params = (root / "params.yaml").read_text()
    assert "lr: 0.02" in params
    (root / "params.yaml").write_text(params.replace("lr: 0.02", "lr: 0.021", 1))
    served = {
        c: e["sha256"] for c, e in json.loads((root / "artifacts/prompts/index.json").read_text())["clusters"].items()
    }
    repro_in_process(root, "evaluate")  # `dvc repro evaluate`, in process: the serving path (baselines are off it)
    now = {
        c: e["sha256"] for c, e in json.loads((root / "artifacts/prompts/index.json").read_text())["clusters"].items()
    }
    assert now != served
    _commit(root, "new learning rate")
    previous = _records(root)[-1].number
    warm_ok("forget", "--sample-id", _private(root, 11), cwd=root)
    outside = _records(root)[-1].predicate["outside_change"]
    assert outside["since_record"] == previous
    assert {c["cluster"] for c in outside["clusters_changed"]} == {int(c) for c in now if now[c] != served[c]}
    assert all(c["prompt_sha256_before"] == served[str(c["cluster"])] for c in outside["clusters_changed"])
    assert "artifacts/prompts/index.json" in outside["subjects_changed"]
    # The record after it finds nothing new to explain.
    warm_ok("forget", "--sample-id", _private(root, 12), cwd=root)
    assert _records(root)[-1].predicate["outside_change"] is None


def test_the_registered_bundle_never_names_an_erased_sample(root):
    """Finding 0c: after an influence forget made exact, no file of the MLflow stores (registered
    bundles included) names the erased sample or its request."""
    victim = _private(root, 13)
    warm_ok("forget", "--sample-id", victim, "--method", "influence", cwd=root)
    request_id = Journal(Workspace(root)).pending()[0].request_id
    warm_ok("unlearn", cwd=root)
    leaks = [
        str(path)
        for path in (root / "mlartifacts").rglob("*")
        if path.is_file()
        and path.stat().st_size < 1 << 20
        and (victim.encode() in path.read_bytes() or request_id.encode() in path.read_bytes())
    ]
    assert leaks == []
    overlay = root / "artifacts" / "prompts" / "approximate" / "overlay.json"
    assert not overlay.exists() or victim not in overlay.read_text()


def _refused_before_any_change(root, expect: str) -> None:
    """A forget is submitted and its batch refused at the preflight (in process: the CLI's one
    sentence is tested elsewhere): the sample still there, no batch state left, the request
    pending for the next `unlearn`."""
    from lmeraser.errors import LmeraserError
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.exact import process_pending
    from lmeraser.unlearning.intake import submit

    ws = Workspace(root)
    victim = _private(root, 17)
    journal = ws.journal_file.read_bytes()
    try:
        submit([RequestSpec(sample_ids=[victim])], ws)
    except LmeraserError as error:  # refused at submission already (e.g. no salt to check it with)
        assert re.search(expect, str(error)), error
        assert ws.journal_file.read_bytes() == journal
    else:
        with pytest.raises(LmeraserError, match=expect):
            process_pending(ws, log=lambda message: None, git_commit=False)
        assert victim in {s for r in Journal(ws).pending() for s in r.sample_ids}
    assert victim in _present(root) and not list((root / "audit" / "batches").glob("*.json"))


def _finish(root) -> None:
    from lmeraser.unlearning.exact import process_pending

    process_pending(Workspace(root), log=lambda message: None)
    assert not Journal(Workspace(root)).pending()


def test_a_missing_signing_key_stops_the_batch_before_any_change(root, tmp_path):
    """Check before you change: without the signing key the batch refuses at once; data, data.dvc,
    dvc.lock, the suppression list and the log stay as they were; with the key back it finishes."""
    if not _records(root):  # run alone: the first record makes the key
        from lmeraser.request import RequestSpec
        from lmeraser.unlearning.intake import submit

        submit([RequestSpec(sample_ids=[_private(root, 29)])], Workspace(root))
        _finish(root)
    key = root / "audit" / "keys" / "signing-key.pem"
    shutil.move(key, tmp_path / "key.pem")
    before = _snapshot(root)
    _refused_before_any_change(root, "signing key not found")
    assert _snapshot(root) == before
    shutil.move(tmp_path / "key.pem", key)
    _finish(root)


def test_another_signer_a_lost_salt_a_broken_registry_or_an_unwritable_directory_changes_nothing(
    root, tmp_path, monkeypatch
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    before = _snapshot(root)
    with monkeypatch.context() as env:
        env.setenv("LMERASER_SIGNING_KEY", other.decode())
        _refused_before_any_change(root, "is not the pinned signer")
    assert _snapshot(root) == before
    # The salt: never made again once keyed hashes exist.
    salt = root / "audit" / "keys" / "subject-salt"
    shutil.move(salt, tmp_path / "salt")
    _refused_before_any_change(root, "salt")
    assert _snapshot(root) == before and not salt.exists()
    shutil.move(tmp_path / "salt", salt)
    # The registry store: a damaged mlflow.db fails the batch before the data changes.
    db = root / "mlflow.db"
    shutil.copy2(db, tmp_path / "mlflow.db")
    db.write_bytes(b"not a database" * 100)
    _refused_before_any_change(root, "mlflow.db")
    assert _snapshot(root) == before
    shutil.copy2(tmp_path / "mlflow.db", db)
    # A directory the batch writes to that cannot take a file (here: not a directory at all).
    batches = root / "audit" / "batches"
    if batches.exists():
        shutil.move(batches, tmp_path / "batches")
    batches.write_text("in the way")
    try:
        _refused_before_any_change(root, "the batch state directory is not a directory")
    finally:
        batches.unlink()
        if (tmp_path / "batches").exists():
            shutil.move(tmp_path / "batches", batches)
    assert _snapshot(root) == before
    _finish(root)


def test_an_influence_update_without_its_signing_key_is_refused_not_served(root, tmp_path):
    from lmeraser.errors import LmeraserError
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import submit

    key = root / "audit" / "keys" / "signing-key.pem"
    overlay = root / "artifacts" / "prompts" / "approximate" / "overlay.json"
    served = overlay.read_bytes() if overlay.exists() else None
    shutil.move(key, tmp_path / "key.pem")
    try:
        with pytest.raises(LmeraserError, match="signing key not found"):
            submit([RequestSpec(sample_ids=[_private(root, 19)])], Workspace(root), method="influence")
    finally:
        shutil.move(tmp_path / "key.pem", key)
    assert (overlay.read_bytes() if overlay.exists() else None) == served and not Journal(Workspace(root)).pending()


def test_a_key_rotation_from_the_cli_verifies_reports_and_signs_the_next_batch(root):
    """`lmeraser audit rotate-key` hands the log over by a signed rotation: verify and report accept
    it, and the next batch is signed by the new key (and the retired key is refused)."""
    from lmeraser.lineage.keys import key_id, load_public_key
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import submit

    if not _records(root):  # run alone: the first record makes the key
        submit([RequestSpec(sample_ids=[_private(root, 29)])], Workspace(root))
        _finish(root)
    old = key_id(load_public_key(root / "audit" / "lineage-public-key.pem"))
    retired = (root / "audit" / "keys" / "signing-key.pem").read_bytes()
    done = warm_ok("audit", "rotate-key", "--reason", "yearly", cwd=root)
    new = key_id(load_public_key(root / "audit" / "lineage-public-key.pem"))
    assert f"key rotation {old} -> {new}" in done.stdout and new != old
    warm_ok("audit", "verify", cwd=root)
    warm_ok("audit", "report", "--out", str(root / "audit" / "report.html"), cwd=root)
    submit([RequestSpec(sample_ids=[_private(root, 31)])], Workspace(root))
    _finish(root)
    assert _records(root)[-1].predicate["signer"] == new
    key = root / "audit" / "keys" / "signing-key.pem"
    current = key.read_bytes()
    key.write_bytes(retired)
    try:
        _refused_before_any_change(root, "is not the pinned signer")
    finally:
        key.write_bytes(current)
    _commit(root, "rotation")


def _submit(root, *specs) -> None:
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import submit

    submit([RequestSpec(**spec) for spec in specs], Workspace(root))


def test_forget_and_corrections_of_one_sample_in_one_batch(root, tmp_path):
    """A stranger's cases: a forget with a label and an image correction of the same sample in one
    batch erases it (the corrections change nothing, no cluster is planned for the corrected image);
    two label corrections of one sample end with the last, even when it restores the original."""
    ws = Workspace(root)
    private = ws.split("private")
    gone, relabelled = private.sample_ids[37], private.sample_ids[41]
    original = int(private.labels[41])
    np.save(tmp_path / "fix.npy", (255 - private.images[37]).astype(np.uint8))
    _submit(
        root,
        {"sample_ids": [gone]},
        {"kind": "rectify", "sample_ids": [gone], "label": (int(private.labels[37]) + 1) % 10},
        {"kind": "rectify", "sample_ids": [gone], "input": str(tmp_path / "fix.npy")},
        {"kind": "rectify", "sample_ids": [relabelled], "label": (original + 1) % 10},
        {"kind": "rectify", "sample_ids": [relabelled], "label": original},
    )
    _finish(root)
    record = _records(root)[-1].predicate
    assert gone not in _present(root) and record["verification"]["clusters_as_planned"]
    after = Workspace(root).split("private")
    assert int(after.labels[after.sample_ids.index(relabelled)]) == original
    suppression = (root / "audit" / "suppression.csv").read_text()
    assert suppression.count(gone) == 1  # one erasure row; no correction of an erased sample


def test_an_erased_image_cannot_come_back_as_a_correction(root, tmp_path):
    from lmeraser.errors import LmeraserError

    ws = Workspace(root)
    private = ws.split("private")
    victim, other = private.sample_ids[43], private.sample_ids[47]
    np.save(tmp_path / "erased.npy", private.images[43])
    _submit(root, {"sample_ids": [victim]})
    _finish(root)
    journal = (root / "audit" / "journal.jsonl").read_bytes()
    with pytest.raises(LmeraserError, match="is the image of an erased sample"):
        _submit(root, {"kind": "rectify", "sample_ids": [other], "input": str(tmp_path / "erased.npy")})
    assert (root / "audit" / "journal.jsonl").read_bytes() == journal


def test_a_replaced_salt_or_a_rolled_back_log_stops_the_batch_and_the_scan(root, tmp_path):
    """A salt of the right size but other bytes is named (records carry the salt's fingerprint), and
    so is a log rolled back under the journal: no batch extends it, no scan says '0 hits' with it."""
    from lmeraser.audit.scan import scan, scan_targets
    from lmeraser.errors import LmeraserError

    assert _records(root)[-1].predicate["salt_fingerprint"]
    salt = root / "audit" / "keys" / "subject-salt"
    original = salt.read_bytes()
    from lmeraser.unlearning.exact import process_pending

    _submit(root, {"sample_ids": [_private(root, 53)]})  # pending, then the salt is swapped
    np.save(tmp_path / "any.npy", Workspace(root).split("private").images[59])
    salt.write_bytes(os.urandom(32))
    try:
        before = _snapshot(root)
        with pytest.raises(LmeraserError, match="not the secret salt lineage record"):
            process_pending(Workspace(root), log=lambda message: None)
        assert _snapshot(root) == before
        with pytest.raises(LmeraserError, match="not the secret salt"):  # a submission that keys with it is refused
            _submit(root, {"kind": "rectify", "sample_ids": [_private(root, 59)], "input": str(tmp_path / "any.npy")})
        with pytest.raises(LmeraserError, match="not the secret salt"):
            targets = scan_targets(Workspace(root))
            scan(Workspace(root), targets.sample_keys, targets.artifact_hashes)
    finally:
        salt.write_bytes(original)
    # Roll the log and its head back one record: the journal still names the last one.
    log, head = root / "audit" / "lineage.jsonl", root / "audit" / "lineage.head.json"
    saved = log.read_bytes(), head.read_bytes()
    lines = saved[0].splitlines(keepends=True)
    from lmeraser.lineage.log import LineageLog

    shutil.copy2(log, tmp_path / "log")
    (tmp_path / "short.jsonl").write_bytes(b"".join(lines[:-1]))
    try:
        # A head signed for the shorter log, as the earlier committed version had.
        history = subprocess.run(
            ["git", "log", "--format=%H", "--", "audit/lineage.head.json"], cwd=root, capture_output=True, text=True
        ).stdout.split()
        older = next(
            c
            for c in history
            if subprocess.run(["git", "show", f"{c}:audit/lineage.jsonl"], cwd=root, capture_output=True).stdout.count(
                b"\n"
            )
            < len(lines)
        )
        for name, path in (("audit/lineage.jsonl", log), ("audit/lineage.head.json", head)):
            path.write_bytes(
                subprocess.run(["git", "show", f"{older}:{name}"], cwd=root, capture_output=True, check=True).stdout
            )
        assert len(LineageLog(log).read_unverified()) < len(lines)
        _refused_before_any_change(root, "the lineage log does not verify")
    finally:
        log.write_bytes(saved[0])
        head.write_bytes(saved[1])
    _finish(root)


def test_a_record_that_would_contradict_the_data_is_not_signed(root):
    """A bookkeeping bug (here a request that calls a live sample 'already forgotten', as the
    tombstone bug of finding 0a did) fails the batch at its state check; nothing is signed."""
    from lmeraser.errors import LmeraserError
    from lmeraser.journal import Submission
    from lmeraser.request import Request
    from lmeraser.unlearning.exact import process_pending

    ws = Workspace(root)
    live = _private(root, 23)
    records = len(_records(root))
    bogus = Request(
        request_id="req-bookkeeping", kind="forget", sample_ids=(), already_forgotten=(live,), received_at=0.0
    )
    Journal(ws).submit([Submission(bogus, subjects=[])])
    with pytest.raises(LmeraserError, match=f"sample {live}, said to be forgotten already, is in data/private"):
        process_pending(ws, log=lambda message: None)
    assert len(_records(root)) == records and live in _present(root)
    # While that batch waits, a re-ingestion is refused: its record would describe data it did not make.
    from lmeraser.config import load_params
    from lmeraser.data.splits import init_data

    params = load_params(root / "params.yaml")
    with pytest.raises(LmeraserError, match="an unlearning batch is in progress"):
        init_data(params.data, params.seed, ws)


def test_a_bundle_carries_the_active_overlay_without_its_edits(trained_workspace, tmp_path):
    """Finding 0c at its source: the serving bundle a registered model holds has each active
    influence overlay's artifact and key, never the edits (sample ids, request ids, times) that the
    workspace keeps until the exact batch; it still serves the overlay."""
    from lmeraser.inference import ServingModel
    from lmeraser.overlay import Overlay
    from lmeraser.tracking import serving_bundle

    source, _ = trained_workspace
    shutil.copytree(source.root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    index = ws.prompt_index()
    cluster, entry = next(iter(index.clusters.items()))
    victim = ws.manifest("private")["sample_id"][0]
    overlay = Overlay(ws)
    stored = overlay.store.save(
        "edited", ServingModel.load(ws).state(cluster), {"cluster": int(cluster), "method": "influence"}
    )
    edits = [{"request_id": "req-0123456789ab", "kind": "forget", "sample_ids": [victim], "received_at": 1.0}]
    overlay.write(
        {
            cluster: {
                "key": "edited",
                "sha256": stored.sha256,
                "base_key": entry.key,
                "base_sha256": entry.sha256,
                "approximate": True,
                "edits": edits,
            }
        }
    )
    files = serving_bundle(ws, tmp_path / "bundle")
    written = b"".join(path.read_bytes() for path in (tmp_path / "bundle").rglob("*") if path.is_file())
    assert victim.encode() not in written and b"req-0123456789ab" not in written
    bundle = Workspace(tmp_path / "bundle")
    assert ServingModel.load(bundle).served_keys()[cluster] == "overlay:edited"
    assert (
        files[ws.relative(ws.overlay_file)]
        and json.loads(bundle.overlay_file.read_text())["clusters"][cluster]["sha256"] == stored.sha256
    )


def test_one_forget_parses_the_params_once_and_reads_the_journal_once_per_change(tiny_repo_template, tmp_path):
    """`lmeraser forget` in one process (submission, the unlearn flow, the rebuild's stages, the
    record): the params file is parsed once, the journal is read again only after it changed
    (received, applied, verified), however many steps ask it, and dvc.lock is written once, though
    the batch also deletes the prompt the last record pinned (which the purge used to record again)."""
    root = clone_repo(
        tiny_repo_template[0], tmp_path / "repo"
    )  # its own: the module's may hold a batch other tests left pending
    warm_ok("forget", "--sample-id", _private(root, 40), "--no-git-commit", cwd=root)  # a record pins its prompts
    # No record pinned prompts before it: the train stage pruned the superseded one itself, and the
    # record counts it (it said 0 before a stranger's attack).
    assert _records(root)[-1].predicate["purge"]["artifact_files_removed"] >= 1
    code = (
        "import atexit, sys\n"
        "import lmeraser\n"
        "from lmeraser import config\n"
        "from lmeraser import journal\n"
        "from dvc.dvcfile import Lockfile\n"
        "writes, dump = [], Lockfile.dump_stages\n"
        "Lockfile.dump_stages = lambda self, *a, **k: writes.append(1) or dump(self, *a, **k)\n"
        "atexit.register(lambda: print(f'COUNTS {config.parses} {journal.reads} {len(writes)}', file=sys.stderr))\n"
        "from lmeraser.cli import main\n"
        "sys.argv = ['lmeraser', 'forget', '--sample-id', sys.argv[1], '--no-git-commit']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, _private(root, 41)], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "lineage record" in done.stdout
    parses, reads, lock_writes = (int(n) for n in done.stderr.rsplit("COUNTS ", 1)[1].split()[:3])
    assert parses == 1
    assert reads <= 4, f"the journal was read {reads} times"
    assert lock_writes == 1, f"dvc.lock was written {lock_writes} times"
    last = _records(root)[-1].predicate
    assert last["purge"]["artifact_files_removed"] >= 1  # the pinned prompt its rebuild superseded
    # The serving path is recorded as it is (the baselines stage waits for the next `dvc repro`).
    assert "up to date" in dvc("status", "evaluate", cwd=root).stdout.lower()
    # Every record this module's batches signed holds to the published schema (docs/record-schema.json).
    import jsonschema

    from lmeraser.lineage.records import record_schema

    schema = record_schema()
    signed = [r for r in _records(root) if not r.is_rotation]
    assert signed
    for record in signed:
        jsonschema.validate(record.predicate, schema)


def test_an_auditor_verifies_the_log_without_lmeraser(root, tmp_path):
    """docs/examples/verify_lineage.py (the DSSE spec, Ed25519 and the chain, on `cryptography`
    alone) verifies this workspace's log, and fails on a record changed by one byte, on a record
    removed, and on another key."""
    script = Path(__file__).parents[1] / "docs" / "examples" / "verify_lineage.py"
    log, head, pem = (
        root / "audit" / "lineage.jsonl",
        root / "audit" / "lineage.head.json",
        root / "audit" / "lineage-public-key.pem",
    )
    if not _records(root):  # run alone: make a record to verify
        warm_ok("forget", "--sample-id", _private(root, 3), cwd=root)
    # The key that signed record 1: the pinned one, or the first rotation's old key (as docs/auditing.md says).
    rotation = next((r for r in _records(root) if r.is_rotation), None)
    if rotation is not None:
        pem = tmp_path / "first-signer.pem"
        pem.write_text(rotation.predicate["old_public_key"])

    def run(log_bytes: bytes, key: Path = pem) -> subprocess.CompletedProcess:
        shutil.copy(head, tmp_path / "lineage.head.json")
        (tmp_path / "lineage.jsonl").write_bytes(log_bytes)
        return subprocess.run(
            [sys.executable, "-I", str(script), str(tmp_path / "lineage.jsonl"), str(key)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = run(log.read_bytes())
    assert good.returncode == 0 and "signed head: OK" in good.stdout, good.stdout + good.stderr
    lines = log.read_bytes().splitlines(keepends=True)
    envelope = json.loads(lines[0])
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["predicate"]["batch_id"] = "batch-forged"
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    forged = run(json.dumps(envelope).encode() + b"\n" + b"".join(lines[1:]))
    assert forged.returncode == 1 and "record 1: FAILED (InvalidSignature" in forged.stdout
    crlf = run(log.read_bytes().replace(b"\n", b"\r\n"))
    assert crlf.returncode == 1 and "FAILED" in crlf.stdout  # another line ending is another log
    for garbage in (
        b"[1, 2]\n",
        b"[" * 100000 + b"\n",
        b'{"payloadType": "application/vnd.in-toto+json", "payload": "", "signatures": {}}\n',
    ):
        broken = run(garbage + log.read_bytes())
        assert broken.returncode == 1 and "record 1: FAILED" in broken.stdout and "Traceback" not in broken.stderr, (
            broken.stderr[-500:]
        )
    if len(lines) > 1:
        dropped = run(b"".join(lines[1:]))
        assert dropped.returncode == 1 and "record 1: FAILED" in dropped.stdout
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert "no signature by" in run(log.read_bytes(), other).stdout


class _StopBeforeRecord(Exception):
    pass


def test_a_tampered_batch_file_is_refused_and_nothing_is_signed(tiny_repo_template, tmp_path):
    """What a stranger did to an interrupted batch's file (audit/batches/<id>.json): each change
    is refused before anything is signed, and no file outside the workspace is touched; the file
    as the batch wrote it then resumes and signs."""
    import copy

    from lmeraser.audit.verify import public_key, verify
    from lmeraser.errors import LmeraserError
    from lmeraser.unlearning.exact import process_pending

    root = clone_repo(tiny_repo_template[0], tmp_path / "repo")
    ws = Workspace(root)
    victim, other = _private(root, 5), _private(root, 6)
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import submit

    submit([RequestSpec(sample_ids=[victim])], ws)

    def stop_before_record(batch, step):
        if step == "record":
            raise _StopBeforeRecord
        batch.run(step)

    with pytest.raises(_StopBeforeRecord):
        process_pending(ws, log=lambda m: None, run_step=stop_before_record, git_commit=False)
    [path] = ws.batch_files()
    original = json.loads(path.read_text())
    outside = tmp_path / "victim.txt"
    outside.write_text("not the workspace's")
    records = len(_records(root))

    def edit(change):
        state = copy.deepcopy(original)
        change(state)
        return state

    cases = {
        "a target added": lambda s: s["requests"][0]["sample_ids"].append(other),
        "the kind changed": lambda s: s["requests"][0].update(kind="rectify", label=3),
        "another request id": lambda s: s["requests"][0].update(request_id="req-ffffffffffff"),
        "no requests": lambda s: s["requests"].clear(),
        "another batch id": lambda s: s.update(batch_id="batch-0000000000000000"),
        "scan hits": lambda s: s["done"]["verify"]["scan"].update(hits=5),
        "not as planned": lambda s: s["done"]["verify"].update(clusters_as_planned=False),
        "a coerced bool": lambda s: s["done"]["verify"].update(clusters_as_planned="no"),
        "a bool label": lambda s: s["requests"][0].update(kind="rectify", label=True),
        "a path to delete": lambda s: s["requests"][0].update(input_path=str(outside)),
        "a relative escape": lambda s: s["requests"][0].update(input_path="../victim.txt"),
        "a public flag": lambda s: s["requests"][0].update(public=True),
    }
    for name, change in cases.items():
        path.write_text(json.dumps(edit(change)))
        with pytest.raises(LmeraserError) as refused:
            process_pending(ws, log=lambda m: None, git_commit=False)
        message = str(refused.value)
        assert "(it was altered)" in message or "was altered" in message or "verification failed" in message, (
            name,
            message,
        )
        assert len(_records(root)) == records, name
        assert outside.exists(), name
    path.write_text(json.dumps(original))
    done = process_pending(ws, log=lambda m: None, git_commit=False)
    assert done["record"] == records + 1 and not ws.batch_files()
    assert verify(ws, public_key(ws, None))[-1].number == records + 1


def _plant_in_public(ws: Workspace, image: np.ndarray, label: int) -> dict[Path, bytes]:
    """Put `image` into data/public under a new id (in the shard the id hashes to), as a bug or a
    stray copy could; returns the shard files' bytes as they were."""
    import hashlib

    import pandas as pd

    from lmeraser.data.splits import content_hash
    from lmeraser.workspace import shard_index

    directories = ws.shard_dirs("public")
    new_id = next(
        candidate
        for candidate in (hashlib.sha256(f"planted-{i}".encode()).hexdigest()[:20] for i in range(10_000))
        if shard_index(candidate, len(directories)) == 0
    )
    directory = directories[0]
    saved = {directory / name: (directory / name).read_bytes() for name in ("manifest.csv", "images.npy")}
    manifest = ws.shard_manifest(directory)
    images = ws.shard_images(directory, len(manifest))
    row = {
        "sample_id": new_id,
        "subject_id": manifest["subject_id"].iloc[0],
        "label": label,
        "split": "public",
        "content_hash": content_hash(image),
    }
    manifest = pd.concat([manifest, pd.DataFrame([row])], ignore_index=True)
    images = np.concatenate([images, image[None]])
    order = np.argsort(manifest["sample_id"].to_numpy(), kind="stable")
    manifest.iloc[order].to_csv(directory / "manifest.csv", index=False)
    np.save(directory / "images.npy", images[order])
    return saved


def test_erased_content_back_in_data_under_another_id_is_named_and_nothing_is_signed(
    tiny_repo_template, tmp_path, monkeypatch
):
    """The record's state check looks for an erased sample's content in data/, not only its id:
    for a sample this batch erases (from the content hash it captured, without keying every row)
    and for one an earlier batch erased (then every row's content is keyed). The content comes
    back in a public shard under a new id after the purge; the batch stops and signs nothing, and
    finishes once the copy is gone."""
    from lmeraser.errors import LmeraserError
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.exact import UnlearnBatch, process_pending
    from lmeraser.unlearning.intake import submit

    root = clone_repo(tiny_repo_template[0], tmp_path / "repo")  # its own: a batch left pending above stays there
    ws = Workspace(root)
    victim = _private(root, 31)
    image = ws.images_of("private", [victim])[0]
    label = int(ws.manifest("private").set_index("sample_id").loc[victim, "label"])
    purge, planted = UnlearnBatch._purge, {}

    def purge_then_plant(batch):
        done = purge(batch)
        planted.update(_plant_in_public(batch.ws, image, label))
        return done

    monkeypatch.setattr(UnlearnBatch, "_purge", purge_then_plant)
    for expected in (
        f"the content of sample {victim} is still in data/ under another id",
        f"the content of sample {victim}, said to be forgotten already, is in data/",
    ):
        records = len(_records(root))
        submit([RequestSpec(sample_ids=[victim])], ws)
        with pytest.raises(LmeraserError, match=re.escape(expected)):
            process_pending(ws, log=lambda m: None, git_commit=False)
        assert len(_records(root)) == records
        for path, data in planted.items():  # the copy removed: the batch resumes and signs
            path.write_bytes(data)
        planted.clear()
        monkeypatch.setattr(UnlearnBatch, "_purge", purge)
        process_pending(ws, log=lambda m: None, git_commit=False)
        assert len(_records(root)) == records + 1 and not Journal(ws).pending()
        monkeypatch.setattr(UnlearnBatch, "_purge", purge_then_plant)
    _commit(root, "after the planted copies")


# What preload must have imported: a long-lived worker's first erasure imported these lazily (929
# modules at 30,000 private samples, ~1.5 s), after the request had been accepted.
_FIRST_BATCH_IMPORTS = ("networkx", "sklearn", "alembic", "sqlalchemy", "pygit2", "great_expectations", "dvc_render")

_PRELOADED_FORGET = """
import json, sys
import lmeraser
from pathlib import Path
from lmeraser.request import RequestSpec
from lmeraser.unlearning.exact import preload, process_pending
from lmeraser.unlearning.intake import submit
from lmeraser.workspace import Workspace
ws = Workspace(Path(sys.argv[1]))
preload(ws)
before = set(sys.modules)
submit([RequestSpec(sample_ids=[ws.manifest("private")["sample_id"].iloc[3]])], ws)
done = process_pending(ws, lambda m: None, git_commit=True)
print(json.dumps({"record": done["record"], "imported": sorted(set(sys.modules) - before)}))
"""


def test_a_preloaded_worker_imports_nothing_heavy_inside_its_first_erasure(tiny_repo_template, tmp_path):
    copy = clone_repo(tiny_repo_template[0], tmp_path / "repo")
    done = subprocess.run(
        [sys.executable, "-c", _PRELOADED_FORGET, str(copy)], cwd=copy, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["record"] >= 1
    late = sorted({m for m in result["imported"] if m.split(".")[0] in _FIRST_BATCH_IMPORTS})
    assert late == [], f"imported inside the first erasure, not by preload: {late[:20]}"
