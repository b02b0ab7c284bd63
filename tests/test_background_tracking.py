"""runtime.tracking: an erasure's MLflow runs (the rebuilt stages, the served model's registration,
the batch's own run) are logged after its record is signed, by a background `lmeraser track`
(the default: the command returns once the record is signed) or before the command returns
(wait). Either way each run is logged once, and a kill or an unusable store loses nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import yaml

from lmeraser import tracking
from lmeraser.io import read_json
from lmeraser.workspace import Workspace

from helpers import commit_all, lmeraser_cli, lmeraser_warm


def _set_tracking(root, mode: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runtime"]["tracking"] = mode
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root, f"runtime.tracking: {mode}")


def _client(root):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return client, client.get_experiment_by_name("lmeraser").experiment_id


def _runs_of_batch(root, batch: dict) -> dict[str, int]:
    """How many finished MLflow runs each stage has for `batch` (its backlog entries' tag, its
    record); a run of it in any state but FINISHED or FAILED (one left RUNNING) fails the test."""
    client, experiment = _client(root)
    counts: dict[str, int] = {}
    for run in client.search_runs([experiment], max_results=1000):
        entry = run.data.tags.get(tracking.ENTRY_TAG, "")
        if entry.startswith(f"{batch['batch_id']}/") or run.data.tags.get("lmeraser.record") == str(batch["record"]):
            assert run.info.status in ("FINISHED", "FAILED"), (run.data.tags, run.info.status)
            if run.info.status == "FINISHED":
                stage = run.data.tags["lmeraser.stage"]
                counts[stage] = counts.get(stage, 0) + 1
    return counts


def _production(root) -> int:
    """The registered version the `production` alias names."""
    client, _ = _client(root)
    return int(client.get_model_version_by_alias("lmeraser", tracking.ALIAS).version)


def _tracked_counts(text: str) -> int:
    return sum(int(n) for n in re.findall(r"tracked (\d+) run\(s\)", text))


def _log_says_done(root, timeout: float = 180) -> str:
    """The background tracker's log once it printed its last line (it ends after the lock's release)."""
    log = tracking.background_log(Workspace(root))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "tracked " in text or "still wait" in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"the background tracker wrote no last line in {timeout} s: {text[-2000:]}")


def test_a_forget_returns_at_its_record_and_its_runs_are_tracked_once_in_the_background(repo):
    root, _ = repo
    victims = Workspace(root).split("private").sample_ids[:2]
    backlog = tracking.backlog_file(Workspace(root))

    # wait: tracked before the command returns, nothing left for anyone.
    _set_tracking(root, "wait")
    done = lmeraser_warm("forget", "--sample-id", victims[0], "--json", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    waited = json.loads(done.stdout)["batch"]
    assert {"train", "evaluate", "unlearn"} <= set(waited["tracking"]["tracked"])
    assert waited["tracking"]["waiting"] == [] and "background" not in waited["tracking"]
    assert not backlog.exists()
    assert _runs_of_batch(root, waited)["train"] == 1

    # background (the default): the command, a child as a user runs it, returns with the runs
    # waiting and a tracker started; `lmeraser track` waits for it.
    _set_tracking(root, "background")
    served = _production(root)
    done = lmeraser_cli("forget", "--sample-id", victims[1], "--json", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    batch = json.loads(done.stdout)["batch"]
    handed = batch["tracking"]
    assert handed["tracked"] == [] and {"validate", "train", "evaluate", "unlearn"} <= set(handed["waiting"])
    assert handed["background"]["log"] == ".lmeraser/tracking.log" and handed["background"]["pid"] > 0
    assert "goes on in the background" in done.stderr
    after = lmeraser_cli("track", cwd=root)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "nothing waits in the tracking backlog" in after.stdout
    assert not backlog.exists()
    log = _log_says_done(root)
    # Whichever of the two got the backlog's lock first tracked it; together, every run once.
    assert _tracked_counts(log) + _tracked_counts(after.stdout) == len(handed["waiting"])
    counts = _runs_of_batch(root, batch)
    assert all(counts.get(stage) == 1 for stage in handed["waiting"]), counts
    assert _production(root) == served + 1  # the rebuilt served model registered, once

    # Nothing waits: the command answers at once, without a flow.
    idle = lmeraser_warm("track", "--json", cwd=root)
    assert idle.returncode == 0 and json.loads(idle.stdout) == {"tracked": [], "waiting": []}


def test_a_killed_tracker_loses_nothing_and_track_names_what_still_waits(repo):
    root, _ = repo
    ws = Workspace(root)
    _set_tracking(root, "background")
    victim = ws.split("private").sample_ids[2]
    done = lmeraser_warm("forget", "--sample-id", victim, "--json", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    batch = json.loads(done.stdout)["batch"]
    pid = batch["tracking"]["background"]["pid"]
    os.kill(pid, signal.SIGKILL)  # before it logged anything: it spends seconds importing first
    try:
        os.waitpid(pid, 0)  # started from this process (the warm command): reap it
    except ChildProcessError:
        pass
    waiting = [entry["stage"] for entry in read_json(tracking.backlog_file(ws))["stages"]]
    assert waiting == batch["tracking"]["waiting"]  # nothing lost

    # An unusable store: `lmeraser track` logs nothing, keeps every run, and says so in one line.
    saved = (root / "mlflow.db").read_bytes()
    (root / "mlflow.db").write_bytes(b"not a database" * 100)
    try:
        failed = lmeraser_warm("track", cwd=root)
    finally:
        (root / "mlflow.db").write_bytes(saved)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "audit/batches/tracking-backlog.json" in last, failed.stderr[-2000:]
    assert [entry["stage"] for entry in read_json(tracking.backlog_file(ws))["stages"]] == waiting

    # A store that fails mid-run (its runs are created, their artifacts cannot be written): each
    # try leaves a FAILED run, none counts as tracked, and the command says so in one sentence.
    artifacts, saved_artifacts = root / "mlartifacts", root / "mlartifacts.saved"
    artifacts.rename(saved_artifacts)
    artifacts.write_text("not a directory")
    try:
        midway = lmeraser_cli("track", cwd=root)  # a child: what reaches the terminal is checked
    finally:
        artifacts.unlink()
        saved_artifacts.rename(artifacts)
    assert midway.returncode == 1 and "Traceback" not in midway.stdout + midway.stderr, midway.stderr[-3000:]
    assert "MLflow tracking of stage validate failed" in midway.stdout + midway.stderr
    assert [entry["stage"] for entry in read_json(tracking.backlog_file(ws))["stages"]] == waiting

    tracked = lmeraser_warm("track", cwd=root)
    assert tracked.returncode == 0, tracked.stderr[-3000:]
    assert _tracked_counts(tracked.stdout) == len(waiting) and not tracking.backlog_file(ws).exists()
    counts = _runs_of_batch(root, batch)
    assert all(counts.get(stage) == 1 for stage in waiting) and counts.get("register") == 1, counts


def test_the_background_tracker_starts_without_secrets_and_never_waits_on_its_log(tmp_path, monkeypatch):
    """What starts the tracker: its environment holds none of the command's secrets; a full log
    becomes tracking.log.1; a FIFO, symlink or directory where the log goes is left alone (the
    tracker's output discarded, the reason returned), and nothing waits on it."""
    from lmeraser import cli
    from lmeraser.config import parse_params

    from helpers import TINY

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(parse_params(TINY).model_dump(mode="json")))
    ws = Workspace(tmp_path)
    log = tracking.background_log(ws)
    log.parent.mkdir()
    log.write_bytes(b"x" * (tracking.BACKGROUND_LOG_MAX_BYTES + 1))
    monkeypatch.setenv("LMERASER_SIGNING_KEY", "-----BEGIN PRIVATE KEY----- k3y-9f1c")
    monkeypatch.setenv("LMERASER_API_TOKEN", "t0ken-77ae")

    def started() -> tuple[dict, bytes]:
        handed = cli._track_in_background(ws)
        environ = (Path("/proc") / str(handed["pid"]) / "environ").read_bytes()  # read while it imports
        _, status = os.waitpid(handed["pid"], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return handed, environ

    handed, environ = started()
    assert b"PATH=" in environ and b"k3y-9f1c" not in environ and b"t0ken-77ae" not in environ
    assert handed["log"] == ".lmeraser/tracking.log" and "log_problem" not in handed
    assert log.with_name("tracking.log.1").stat().st_size == tracking.BACKGROUND_LOG_MAX_BYTES + 1
    assert "nothing waits in the tracking backlog" in log.read_text()

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("someone else's file\n")
    for make in (os.mkfifo, lambda path: path.symlink_to(elsewhere), Path.mkdir):
        if log.is_dir() and not log.is_symlink():
            log.rmdir()
        else:
            log.unlink(missing_ok=True)
        make(log)
        handed, _ = started()  # a FIFO would block an open that waits for a reader
        assert handed["log"] is None and handed["log_problem"], handed
    assert elsewhere.read_text() == "someone else's file\n"


def test_track_names_a_root_that_is_no_workspace(tmp_path):
    done = lmeraser_warm("track", "--root", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().startswith("error:") and "params" in done.stderr
