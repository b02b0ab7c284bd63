"""SIGKILL the `unlearn` flow at several points; re-running finishes every request exactly once."""

import json
import os
import signal
import subprocess

import pandas as pd
import pytest

from conftest import BIN, TINY, copy_repo, lmeraser_cli
from lmeraser.data.splits import load_split, load_tombstones
from lmeraser.lineage.log import LineageLog
from lmeraser.unlearning.requests import Journal

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("crash") / "repo", TINY)
    assert lmeraser_cli("data", "init", cwd=root).returncode == 0
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_killed_unlearn_resumes_and_finishes_exactly_once(tiny_repo):
    root = tiny_repo
    victims = load_split("private", root / "data").sample_ids[:2]
    for victim in victims:  # two requests, one batch
        assert lmeraser_cli("forget", "--sample-id", victim, "--no-process", cwd=root).returncode == 0

    for point in ["capture", "apply", "version", "record:appended"]:
        # The process SIGKILLs itself at `point`; then the rest of its tree (Prefect's temporary
        # server) is killed too, as a machine or container crash would.
        proc = subprocess.Popen(
            [str(BIN / "lmeraser"), "unlearn"], cwd=root, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LMERASER_KILL_AFTER_STEP": point},
        )
        assert proc.wait(timeout=600) == -signal.SIGKILL, point
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # Nothing half-written: no temporary files left beside the data or the log.
        assert not list(root.glob("data/**/.*.tmp")) and not list((root / "audit").glob(".*.tmp"))

    finished = lmeraser_cli("unlearn", cwd=root)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "lineage record 1" in finished.stdout

    records = LineageLog(root / "audit" / "lineage.jsonl").read_unverified()
    assert len(records) == 1  # the record appended before the last kill is not duplicated
    journal = Journal(root)
    states = {rid: entry["state"] for rid, entry in journal.requests().items()}
    assert sorted(states.values()) == ["verified", "verified"]
    verified = [e for e in journal.events() if e["state"] == "verified"]
    assert len(verified) == 2
    assert not set(victims) & set(load_split("private", root / "data").sample_ids)
    assert set(victims) <= set(load_tombstones(root / "data")["sample_id"])
    assert lmeraser_cli("audit", "verify", cwd=root).returncode == 0
    scan = lmeraser_cli("audit", "scan", cwd=root)
    assert scan.returncode == 0 and "0 hits" in scan.stdout
    assert not list((root / "audit" / "batches").glob("*.json"))
    assert lmeraser_cli("unlearn", cwd=root).stdout.strip().endswith("no pending requests")


def test_rectify_label_and_input_then_replay_and_report(tiny_repo, tmp_path):
    import numpy as np

    root = tiny_repo
    private = load_split("private", root / "data")
    assignments = pd.read_csv(root / "artifacts" / "clusters" / "assignments.csv", dtype={"sample_id": str}).set_index("sample_id")
    label_id, input_id = private.sample_ids[10], private.sample_ids[20]
    new_label = (int(private.labels[10]) + 1) % 10
    corrected = np.ascontiguousarray(private.images[20][::-1])  # a visibly different image
    np.save(tmp_path / "fixed.npy", corrected)
    old_hash = private.manifest["content_hash"][20]
    assert lmeraser_cli("rectify", "--sample-id", label_id, "--label", str(new_label), "--no-process", cwd=root).returncode == 0
    assert lmeraser_cli("rectify", "--sample-id", input_id, "--input", str(tmp_path / "fixed.npy"), "--no-process", cwd=root).returncode == 0
    done = lmeraser_cli("unlearn", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]

    after = load_split("private", root / "data").manifest.set_index("sample_id")
    assert int(after.loc[label_id, "label"]) == new_label
    from lmeraser.data.splits import content_hash

    assert after.loc[input_id, "content_hash"] == content_hash(corrected) != old_hash
    assert old_hash in set(load_tombstones(root / "data")["content_hash"])
    record = LineageLog(root / "audit" / "lineage.jsonl").read_unverified()[-1]
    rebuilt = {c["cluster"] for c in record.predicate["clusters_rebuilt"]}
    assert {int(assignments.loc[label_id, "cluster"]), int(assignments.loc[input_id, "cluster"])} <= rebuilt
    assert [r["kind"] for r in record.predicate["requests"]] == ["rectify", "rectify"]
    assert lmeraser_cli("audit", "verify", cwd=root).returncode == 0
    scan = lmeraser_cli("audit", "scan", cwd=root)
    assert scan.returncode == 0 and "0 hits" in scan.stdout  # the replaced pixels are gone too
    replay = lmeraser_cli("audit", "replay", "--record", str(record.number), cwd=root)
    assert replay.returncode == 0 and "sha256 matches" in replay.stdout, replay.stdout + replay.stderr
    report = lmeraser_cli("audit", "report", "--out", str(tmp_path / "report.html"), cwd=root)
    assert report.returncode == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and record.predicate["batch_id"] in page
