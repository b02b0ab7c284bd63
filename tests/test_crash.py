"""SIGKILL the `unlearn` flow at several points; re-running finishes every request exactly once."""

import json
import os
import signal

import pandas as pd
import pytest

from conftest import BIN, TINY, copy_repo, lmeraser_cli
from lmeraser.data.splits import load_split, load_tombstones
from lmeraser.lineage.log import LineageLog
from lmeraser.unlearning.requests import Journal

pytestmark = pytest.mark.e2e


def test_killed_unlearn_resumes_and_finishes_exactly_once(tmp_path):
    import subprocess

    root = copy_repo(tmp_path / "repo", TINY)
    assert lmeraser_cli("data", "init", cwd=root).returncode == 0
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
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
