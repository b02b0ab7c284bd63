"""The workspace's MLflow store (issue 21): created crash-safely, rebuilt when an earlier version
left it half-made, tied to its workspace when the workspace is copied, and the served model
logged without MLflow's warnings. Real MLflow, real SQLite, a real SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import warnings

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from lmeraser import tracking
from lmeraser.errors import LmeraserError
from lmeraser.workspace import Workspace

from helpers import BIN


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each workspace's own store
    monkeypatch.delenv("LMERASER_FAILPOINT", raising=False)
    yield
    mlflow.set_tracking_uri("")  # leave no process-wide store behind


def _copy(trained_workspace, dest) -> Workspace:
    shutil.copytree(trained_workspace[0].root, dest)
    return Workspace(dest)


def _schema(db) -> str | None:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _leftovers(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.root.glob(".mlflow.db.*"))


def test_a_process_killed_while_creating_the_store_leaves_none_and_the_next_command_works(trained_workspace, tmp_path):
    ws = _copy(trained_workspace, tmp_path / "ws")
    env = {**os.environ, "LMERASER_FAILPOINT": "mlflow:store-initialized"}
    killed = subprocess.run(
        [str(BIN / "lmeraser"), "stage", "validate", "--root", str(ws.root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Killed with the tables made and migrated, before the experiment and the rename: no store.
    assert not ws.mlflow_db.exists()
    assert _leftovers(ws), "the kill did not happen inside the store's creation"
    done = subprocess.run(
        [str(BIN / "lmeraser"), "stage", "validate", "--root", str(ws.root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _schema(ws.mlflow_db) == _head() and _leftovers(ws) == []
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(ws))
    [experiment] = [e for e in client.search_experiments() if e.name == tracking.EXPERIMENT]
    assert experiment.artifact_location == ws.mlflow_artifacts.resolve().as_uri()
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags["lmeraser.stage"] == "validate" and run.info.status == "FINISHED"


def test_a_half_made_store_from_an_earlier_version_is_rebuilt(trained_workspace, tmp_path):
    """What MLflow's own creation leaves when killed between making its first tables and migrating
    them: every later command failed ("table ... already exists")."""
    import sqlalchemy
    from mlflow.store.db.utils import InitialBase

    ws = _copy(trained_workspace, tmp_path / "ws")
    engine = sqlalchemy.create_engine(f"sqlite:///{ws.mlflow_db}")
    InitialBase.metadata.create_all(engine)
    engine.dispose()
    tracking.ensure_store(ws, create=False)  # what the batch's preflight check does first
    assert not ws.mlflow_db.exists()
    with tracking.stage_run(ws, "validate", {"seed": 0}) as run:
        tracking.log_metrics({"x": 1.0})
    assert _schema(ws.mlflow_db) == _head()
    assert MlflowClient(tracking_uri=tracking.default_tracking_uri(ws)).get_run(run.info.run_id).data.metrics == {
        "x": 1.0
    }


def test_an_outdated_store_that_holds_runs_is_never_rebuilt(trained_workspace, tmp_path):
    ws = _copy(trained_workspace, tmp_path / "ws")
    with tracking.stage_run(ws, "validate", {"seed": 0}):
        pass
    mlflow.set_tracking_uri("")
    with sqlite3.connect(ws.mlflow_db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'an-older-one'")
    before = ws.mlflow_db.read_bytes()
    with pytest.raises(LmeraserError) as refused:
        tracking.ensure_store(ws)
    assert "schema is at revision an-older-one" in str(refused.value) and "mlflow db upgrade" in str(refused.value)
    assert ws.mlflow_db.read_bytes() == before


@pytest.fixture(scope="module")
def registered(trained_workspace, tmp_path_factory):
    """A trained workspace whose served model is logged and registered, and what it warned."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ws = _copy(trained_workspace, tmp_path_factory.mktemp("registered") / "ws")
    example = ws.split("test").images[:8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.stage_run(ws, "register", {"seed": 0}) as run:
            version = tracking.register_serving_model(ws, run.info.run_id, example, "test", log=lambda m: None)
    mlflow.set_tracking_uri("")
    return ws, version, caught


def test_logging_the_served_model_warns_nothing(registered):
    ws, version, caught = registered
    assert version == 1
    user = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert user == [], user
    assert not any("\x1b" in str(w.message) for w in caught)
    # The fix is real: the logged model carries its input example (and its signature).
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(ws))
    model = client.get_model_version(tracking.REGISTERED_MODEL, "1")
    logged = client.get_logged_model(model.source.removeprefix("models:/"))
    folder = logged.artifact_location.removeprefix("file://")
    assert os.path.exists(os.path.join(folder, "input_example.json")) and os.path.exists(
        os.path.join(folder, "MLmodel")
    )


def test_a_copied_workspace_logs_into_and_purges_from_its_own_artifacts(registered, tmp_path, monkeypatch):
    original, _, _ = registered
    copy = Workspace(tmp_path / "copy")
    shutil.copytree(original.root, copy.root)
    with tracking.stage_run(copy, "validate", {"seed": 0}) as run:
        tracking.log_artifacts([copy.params_file])
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(copy))
    [experiment] = [e for e in client.search_experiments() if e.name == tracking.EXPERIMENT]
    assert experiment.artifact_location == copy.mlflow_artifacts.resolve().as_uri()
    new_run = client.get_run(run.info.run_id)
    assert new_run.info.artifact_uri.startswith(copy.mlflow_artifacts.resolve().as_uri() + "/")
    assert (copy.mlflow_artifacts / run.info.run_id / "artifacts" / "params.yaml").is_file()
    assert not (original.mlflow_artifacts / run.info.run_id).exists()
    # The registered version's files, as the copy's store names them, are the copy's.
    version = client.get_model_version(tracking.REGISTERED_MODEL, "1")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith(copy.mlflow_artifacts.resolve().as_uri() + "/")
    original_files = sorted(p.relative_to(original.root) for p in original.mlflow_artifacts.rglob("*"))
    # A purge in the copy deletes the copy's files of that version, never the original's.
    served = client.download_artifacts(version.run_id, tracking.PROMPTS_ARTIFACT, str(tmp_path))
    prompts = set(json.loads(open(served).read())["prompt_sha256"])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    purged = tracking.purge_registry(copy, prompts, log=lambda m: None)
    assert purged["versions_deleted"] == [1]
    assert list(scratch.iterdir()) == []  # the downloaded prompt lists went with the purge
    assert not os.path.exists(logged.artifact_location.removeprefix("file://"))
    assert sorted(p.relative_to(original.root) for p in original.mlflow_artifacts.rglob("*")) == original_files
    original_client = MlflowClient(tracking_uri=tracking.default_tracking_uri(original))
    assert int(original_client.get_model_version(tracking.REGISTERED_MODEL, "1").version) == 1  # still registered there


def test_the_tracking_backlog_keeps_what_failed_and_never_raises(tmp_path):
    """Runs deferred until after the record: tracked in order; one that fails stays with the ones
    after it (a warning, no exception); tracked on the next try; an altered file is left alone."""
    ws = Workspace(tmp_path)
    tracking.defer_run(ws, "train", {"accuracy": np.float32(0.5)})
    tracking.defer_run(ws, "evaluate", {"accuracy": 0.9})
    tracking.defer_run(ws, "unlearn", {"scan_hits": 0}, {"params": {"batch_id": "b"}, "tags": {"lmeraser.record": "3"}})
    seen, lines = [], []

    def flaky(entry):
        if entry["stage"] == "evaluate" and not seen.count("evaluate-failed"):
            seen.append("evaluate-failed")
            raise ConnectionError("tracking server unreachable\nsecond line")
        seen.append(entry["stage"])

    first = tracking.track_backlog(ws, flaky, lines.append)
    assert first == {"tracked": ["train"], "waiting": ["evaluate", "unlearn"]}
    assert len(lines) == 1 and "tracking server unreachable" in lines[0] and "\n" not in lines[0]
    second = tracking.track_backlog(ws, flaky, lines.append)
    assert second == {"tracked": ["evaluate", "unlearn"], "waiting": []} and not tracking.backlog_file(ws).exists()
    assert seen == ["train", "evaluate-failed", "evaluate", "unlearn"]
    assert tracking.track_backlog(ws, flaky, lines.append) == {"tracked": [], "waiting": []}
    tracking.backlog_file(ws).write_text("{not json")
    altered = tracking.track_backlog(ws, flaky, lines.append)
    assert (
        altered["waiting"] == ["unreadable backlog"]
        and tracking.backlog_file(ws).exists()
        and "not a tracking backlog" in lines[-1]
    )


def test_only_a_finished_run_counts_as_tracked_and_one_left_running_is_marked_failed(tmp_path):
    """A tracker killed while it logged leaves its run RUNNING; a store that failed mid-run leaves
    it FAILED: neither counts, so the entry is logged again (found by a stranger's attack: the
    half-made run counted, and the served model's registration was lost for good)."""
    ws = Workspace(tmp_path)
    tags = {"lmeraser.stage": "train", tracking.ENTRY_TAG: "batch-1/train"}
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(ws))
    tracking.ensure_store(ws)
    experiment = client.create_experiment(tracking.EXPERIMENT, artifact_location=ws.mlflow_artifacts.as_uri())
    assert not tracking.tracked(ws, "train", "batch-1/train")  # no run at all
    killed = client.create_run(experiment, tags=tags)  # what a SIGKILL mid-run leaves: RUNNING
    failed = client.create_run(experiment, tags=tags)
    client.set_terminated(failed.info.run_id, status="FAILED")
    assert not tracking.tracked(ws, "train", "batch-1/train")
    assert client.get_run(killed.info.run_id).info.status == "FAILED"  # no longer shown as running
    other = client.create_run(experiment, tags={**tags, tracking.ENTRY_TAG: "batch-2/train"})
    client.set_terminated(other.info.run_id, status="FINISHED")
    assert not tracking.tracked(ws, "train", "batch-1/train")  # another entry's run
    done = client.create_run(experiment, tags=tags)
    client.set_terminated(done.info.run_id, status="FINISHED")
    assert tracking.tracked(ws, "train", "batch-1/train")
    mlflow.set_tracking_uri("")


def test_an_unreadable_backlog_never_stops_a_batch_from_handing_on_its_runs(tmp_path):
    """defer_run (inside an erasure's batch) moves an unreadable backlog to .lmeraser/ with a
    warning and starts a new one; `backlog_stages` says it is unreadable instead of raising."""
    ws = Workspace(tmp_path)
    tracking.backlog_file(ws).parent.mkdir(parents=True)
    for garbage in ("not json {{{", '{"stages": 3}', '{"stages": [1, 2]}'):
        tracking.backlog_file(ws).write_text(garbage)
        assert tracking.backlog_stages(ws) == ["unreadable backlog"]
        lines = []
        left = tracking.track_backlog(ws, lambda entry: None, lines.append)  # the tracker leaves it in place
        assert left == {"tracked": [], "waiting": ["unreadable backlog"]} and "not a tracking backlog" in lines[0]
        assert tracking.backlog_file(ws).read_text() == garbage
        lines.clear()
        tracking.defer_run(ws, "train", {"accuracy": 0.5}, entry_id="batch-1/train", log=lines.append)
        assert tracking.backlog_stages(ws) == ["train"]
        aside = [p for p in (ws.root / ".lmeraser").iterdir() if p.read_text() == garbage]
        assert len(aside) == 1 and aside[0].name.startswith("tracking-backlog.unreadable-")
        assert len(lines) == 1 and aside[0].name in lines[0] and "not a tracking backlog" in lines[0]
        tracking.backlog_file(ws).unlink()
        aside[0].unlink()


def test_a_version_registered_before_a_kill_is_reused_not_registered_twice(registered):
    """Killed after the version was created, before the alias moved: the next registration of the
    same served bundle points the alias at that version instead of adding one."""
    ws, version, _ = registered
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(ws))
    client.delete_registered_model_alias(tracking.REGISTERED_MODEL, tracking.ALIAS)
    before = len(client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}'"))
    example = ws.split("test").images[:8]
    with tracking.stage_run(ws, "register", {"seed": 0}) as run:
        again = tracking.register_serving_model(ws, run.info.run_id, example, "test", log=lambda m: None)
    mlflow.set_tracking_uri("")
    assert again == version
    assert len(client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}'")) == before
    assert int(client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.ALIAS).version) == version
