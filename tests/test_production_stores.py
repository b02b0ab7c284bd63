"""Production stores: a DVC remote on S3 and an MLflow tracking server whose artifacts live on S3,
both real servers the tests start on loopback (moto's S3 server, `mlflow server`), purged and
searched through their own APIs like the local ones."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lmeraser.audit.scan import scan, scan_targets
from lmeraser.data.splits import content_hash
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace

from helpers import BIN, clone_repo, dvc, free_port, lmeraser_warm

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lmeraser-test-key",
    "AWS_SECRET_ACCESS_KEY": "lmeraser-test-secret-0600",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start; see {log}") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback (what DVC's and MLflow's own suites use): its URL and a client."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "server.log"
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, "moto's S3 server", log)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key="x",
            region_name="us-east-1",
        )
        yield url, client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def aws(monkeypatch):
    """The credentials DVC, boto and MLflow read, from the environment (never from a file we write)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)


def _bucket(client, name: str) -> str:
    client.create_bucket(Bucket=name)
    return name


def _keys(client, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _npy(images: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, images)
    return buffer.getvalue()


def _dvc_workspace(root: Path, remote_url: str, endpoint: str | None) -> Workspace:
    ws = Workspace(root)
    ws.data.mkdir(parents=True)
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    for args in (
        ["remote", "add", "-d", "prod", remote_url],
        ["remote", "modify", "prod", "endpointurl", endpoint] if endpoint else None,
    ):
        if args:
            subprocess.run([str(BIN / "dvc"), *args], cwd=root, check=True, capture_output=True)
    return ws


def test_an_s3_remote_is_searched_through_dvc_incrementally_and_purged(tmp_path, s3, aws, monkeypatch):
    """A DVC remote on S3: an old data version's objects are found there (named by their s3://
    URL), the purge collects them through DVC, a second scan reads only new objects, and a copy
    planted back (a new object, or an indexed object overwritten) is read and found. The record's
    summary names the bucket and endpoint and no credential."""
    from lmeraser.unlearning.purge import purge
    from lmeraser.versioning import dvc_add

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url, client = s3
    bucket = _bucket(client, "lmeraser-remote")
    ws = _dvc_workspace(tmp_path / "ws", f"s3://{bucket}/dvc", url)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    forgotten = {Keyer(ws).content(content_hash(images[0]))}
    np.save(ws.data / "images.npy", images)
    dvc_add(ws.root, "data")
    subprocess.run([str(BIN / "dvc"), "push", "-q"], cwd=ws.root, check=True, capture_output=True)
    np.save(ws.data / "images.npy", images[1:])  # the erasure's new version
    dvc_add(ws.root, "data")

    before = scan(ws, forgotten, set())
    remote_hits = [h for h in before.hits if h.location == "dvc remote 'prod'"]
    assert len(remote_hits) == 1 and remote_hits[0].path.startswith(f"s3://{bucket}/dvc/files/md5/")
    assert before.not_searched == [] and before.counts["dvc remote 'prod'"] == len(_keys(client, bucket, "dvc/"))

    listed_before = _keys(client, bucket, "dvc/")
    result = purge(ws, set(), log=lambda m: None)
    assert result["remotes_gc"] == ["prod"] and result["remotes_failed"] == []
    pushed = _keys(client, bucket, "dvc/") - listed_before  # the new version: its .dir listing and its file
    assert len(pushed) == 2
    after = scan(ws, forgotten, set())
    assert after.hits == [] and after.not_searched == []
    summary = after.summary()
    assert summary["remote_stores"]["dvc remote 'prod'"] == {
        "kind": "dvc remote (s3)",
        "bucket": bucket,
        "prefix": "dvc",
        "endpoint": url,
    }
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(summary) and CREDENTIALS[
        "AWS_ACCESS_KEY_ID"
    ] not in json.dumps(summary)
    assert summary["index"]["mode"] == "incremental" and summary["files_read"]["dvc remote 'prod'"] == len(
        pushed
    )  # only what is new

    again = scan(ws, forgotten, set())
    assert (
        again.read["dvc remote 'prod'"] == 0 and again.counts["dvc remote 'prod'"] == after.counts["dvc remote 'prod'"]
    )
    # Someone writes the forgotten image back: as a new object, then over an indexed one.
    client.put_object(Bucket=bucket, Key="dvc/files/md5/00/planted", Body=_npy(images[:2]))
    planted = scan(ws, forgotten, set())
    assert [(h.location, h.path) for h in planted.hits] == [
        ("dvc remote 'prod'", f"s3://{bucket}/dvc/files/md5/00/planted")
    ]
    assert planted.read["dvc remote 'prod'"] == 1
    client.delete_object(Bucket=bucket, Key="dvc/files/md5/00/planted")
    # A key that a path parser would cut at "?versionId=" (found by a stranger: read by its exact key).
    client.put_object(Bucket=bucket, Key="dvc/copy?versionId=1", Body=_npy(images[:1]))
    assert [h.path for h in scan(ws, forgotten, set()).hits] == [f"s3://{bucket}/dvc/copy?versionId=1"]
    client.delete_object(Bucket=bucket, Key="dvc/copy?versionId=1")
    indexed = sorted(_keys(client, bucket, "dvc/files/md5/"))[0]
    client.put_object(Bucket=bucket, Key=indexed, Body=_npy(images[:1]))
    overwritten = scan(ws, forgotten, set())
    assert [h.path for h in overwritten.hits] == [f"s3://{bucket}/{indexed}"]
    # An object rewritten between its listing and its read is not read as the listed one (IfMatch):
    # what the index keeps for an identity is what that identity held.
    from lmeraser.audit.stores import storage_locations

    store = storage_locations(ws).stores["dvc remote 'prod'"]
    store.listing()
    client.put_object(Bucket=bucket, Key=indexed, Body=b"benign bytes, swapped in after the listing")
    with pytest.raises(Exception, match="pre-conditions|PreconditionFailed|412"):
        with store.local(indexed.removeprefix("dvc/")):
            pass


def test_a_remote_the_scan_cannot_list_is_not_searched_with_the_reason_and_strict_fails(tmp_path, s3, aws, monkeypatch):
    """Without credentials the S3 remote cannot be listed: it is "not searched", with the reason,
    and `audit scan --strict` exits non-zero; with them, the same scan is clean and strict passes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url, client = s3
    bucket = _bucket(client, "lmeraser-locked")
    ws = _dvc_workspace(tmp_path / "ws", f"s3://{bucket}/dvc", url)
    for key in CREDENTIALS:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    report = scan(ws, set(), set())
    [gap] = report.not_searched
    assert gap.startswith(
        f"dvc remote 'prod' (s3://{bucket}/dvc @ {url}): cannot be read from here (NoCredentialsError"
    )
    strict = lmeraser_warm("audit", "scan", "--strict", "--root", str(ws.root), cwd=tmp_path)
    assert (
        strict.returncode == 1
        and "could not be searched (--strict)" in strict.stderr
        and "NoCredentialsError" in strict.stderr
    )
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    assert lmeraser_warm("audit", "scan", "--strict", "--root", str(ws.root), cwd=tmp_path).returncode == 0


@contextlib.contextmanager
def _mlflow_server(home: Path, s3, bucket: str):
    """`mlflow server` on loopback: runs and the model registry in SQLite, artifacts proxied to S3."""
    url, client = s3
    _bucket(client, bucket)
    port = free_port()
    env = {**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": url}
    log = home / "server.log"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/artifacts",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    tracking = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{tracking}/health", proc, "mlflow server", log, timeout=180)
        yield tracking, bucket
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3):
    with _mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3, "lmeraser-mlflow") as server:
        yield server


def test_run_artifacts_on_a_tracking_server_are_searched_and_purged_through_mlflow(
    tmp_path, s3, mlflow_server, aws, monkeypatch
):
    """A tracking server whose artifacts live in S3 behind it (no file system access assumed):
    a forgotten image in a run artifact is found through MLflow's artifact repository, a superseded
    prompt file is deleted by the purge through it, and the record names the tracking URI without
    the password it was given with."""
    from mlflow import MlflowClient

    from lmeraser.unlearning.purge import purge

    tracking, bucket = mlflow_server
    url, client = s3
    host = tracking.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://reader:s3cret-pw@{host}")
    ws = _dvc_workspace(tmp_path / "ws", "s3://lmeraser-mlflow/dvc", url)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    forgotten = {Keyer(ws).content(content_hash(images[0]))}
    mlflow = MlflowClient(tracking_uri=tracking)
    experiment = mlflow.create_experiment(f"lmeraser-{tmp_path.name}")
    run = mlflow.create_run(experiment).info.run_id
    (tmp_path / "logged").mkdir()
    np.save(tmp_path / "logged" / "batch.npy", images)
    (tmp_path / "logged" / "prompt.safetensors").write_bytes(b"a superseded prompt's bytes")
    mlflow.log_artifacts(run, str(tmp_path / "logged"), artifact_path="outputs")
    superseded = {__import__("hashlib").sha256(b"a superseded prompt's bytes").hexdigest()}

    label = f"mlflow experiment 'lmeraser-{tmp_path.name}'"
    found = scan(ws, forgotten, superseded)
    assert sorted((h.location, h.kind) for h in found.hits) == [
        (label, "forgotten sample"),
        (label, "superseded artifact"),
    ]
    assert all(h.path.startswith("mlflow-artifacts:/") for h in found.hits) and found.not_searched == []
    summary = json.dumps(found.summary())
    assert "s3cret-pw" not in summary and f"http://{host}" in summary

    result = purge(ws, superseded, log=lambda m: None)
    assert result["artifact_files_removed"] == 1 and "artifact_stores_unreachable" not in result
    assert [f.path for f in mlflow.list_artifacts(run, "outputs")] == ["outputs/batch.npy"]
    assert not any(
        k.endswith("prompt.safetensors") for k in _keys(client, bucket, "artifacts/")
    )  # gone from S3 behind the server
    again = scan(ws, forgotten, superseded)
    assert [(h.location, h.kind) for h in again.hits] == [(label, "forgotten sample")]
    assert again.read[label] == again.counts[label] == 1  # MLflow lists no modification time: read every time


def test_what_a_stranger_found_in_the_stores_is_covered(tmp_path, s3, aws, monkeypatch):
    """Cases found by attacking the feature: deleted experiments are searched (their artifacts stay
    until `mlflow gc`); a path the tracking server reports is its disk, not ours (not searched, never
    walked here); a file and a folder of the same name in a run are both read; an experiment named
    like Rich markup does not break `audit scan`; a non-S3 remote is "not searched", not searched
    and clean; credentials and tokens in URLs never reach a reason or a summary."""
    # A server of its own: what this test leaves there (a deleted experiment, a server-disk
    # location) must not reach the other tests'.
    with _mlflow_server(tmp_path, s3, "lmeraser-mlflow-odd") as (tracking, _):
        _odd_cases(tmp_path, tracking, monkeypatch)


def _odd_cases(tmp_path, tracking: str, monkeypatch) -> None:
    from mlflow import MlflowClient

    from lmeraser.errors import reason, without_credentials

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    ws = _dvc_workspace(tmp_path / "ws", "http://huser:HTTPPW@127.0.0.1:1/store?token=QUERYTOKEN", None)
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    forgotten = {Keyer(ws).content(content_hash(images[0]))}
    mlflow = MlflowClient(tracking_uri=tracking)
    np.save(tmp_path / "copy.npy", images)
    gone = mlflow.create_experiment(f"deleted-{tmp_path.name}")
    mlflow.log_artifact(mlflow.create_run(gone).info.run_id, str(tmp_path / "copy.npy"))
    mlflow.delete_experiment(gone)
    mlflow.create_experiment(f"server-disk-{tmp_path.name}", artifact_location="/sys/bus")
    odd = mlflow.create_experiment(f"evil[/]-{tmp_path.name}")
    run = mlflow.create_run(odd).info.run_id
    (tmp_path / "x").write_bytes(b"a file")
    (tmp_path / "dir" / "x").mkdir(parents=True)
    (tmp_path / "dir" / "x" / "y.npy").write_bytes((tmp_path / "copy.npy").read_bytes())
    mlflow.log_artifact(run, str(tmp_path / "x"), artifact_path="dup")  # dup/x, a file
    mlflow.log_artifacts(run, str(tmp_path / "dir"), artifact_path="dup")  # dup/x/y.npy under a folder dup/x

    report = scan(ws, forgotten, set())
    located = sorted((h.location, h.path.rsplit("/", 1)[-1]) for h in report.hits)
    assert located == [
        (f"mlflow experiment 'deleted-{tmp_path.name}' (deleted)", "copy.npy"),
        (f"mlflow experiment 'evil[/]-{tmp_path.name}'", "y.npy"),
    ]
    gaps = " | ".join(report.not_searched)
    assert (
        f"mlflow experiment 'server-disk-{tmp_path.name}' (/sys/bus): a path on the tracking server's own disk" in gaps
    )
    assert (
        "dvc remote 'prod' (http://127.0.0.1:1/store): the scan reads S3 remotes; "
        "a http remote is purged by DVC, not read back"
    ) in gaps
    assert (
        report.counts[f"mlflow experiment 'evil[/]-{tmp_path.name}'"] == 2 and "dvc remote 'prod'" not in report.counts
    )
    shown = json.dumps(report.summary()) + gaps
    assert "HTTPPW" not in shown and "QUERYTOKEN" not in shown
    # The CLI searches for what signed records name (none here): it must print the odd names as they are.
    done = lmeraser_warm("audit", "scan", "--root", str(ws.root), cwd=tmp_path)
    assert (
        done.returncode == 0
        and "evil[/]" in done.stdout
        and "Traceback" not in done.stderr
        and "HTTPPW" not in done.stdout + done.stderr
    )
    # MLflow's own messages repeat the tracking URI as given, password and all: reasons strip it.
    error = RuntimeError("API request to http://reader:TRACKPW@127.0.0.1:1/api/2.0/x?token=T0K failed\nmore")
    assert reason(error) == "RuntimeError: API request to http://127.0.0.1:1/api/2.0/x failed"
    assert without_credentials("https://u:p@h:9/a?t=1#f") == "https://h:9/a"
    assert without_credentials("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"  # a local store as it is


def test_a_forget_on_production_stores_purges_and_proves_them_clean_and_a_planted_copy_fails_the_batch(
    tmp_path, s3, mlflow_server, aws, monkeypatch, tiny_repo_template
):
    """End to end on the S3 remote and the tracking server: a built workspace whose evaluate stage
    runs again tracked and registered on the server, a forget (purged from both, `audit scan
    --strict` clean, the record names both stores), then the forgotten image planted back in the
    S3 remote: the next batch's scan finds it and signs nothing; removed, the batch finishes.
    Planted in a run artifact on the tracking server, `audit scan` finds it."""
    from mlflow import MlflowClient

    from lmeraser.lineage.log import LineageLog

    tracking, _ = mlflow_server
    url, client = s3
    bucket = _bucket(client, f"lmeraser-e2e-{tmp_path.name[-8:].lower().replace('_', '-')}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    root = clone_repo(tiny_repo_template[0], tmp_path / "repo")
    for args in (
        ["remote", "add", "-d", "prod", f"s3://{bucket}/dvc"],
        ["remote", "modify", "prod", "endpointurl", url],
    ):
        dvc(*args, cwd=root)
    # The evaluate stage run again against the tracking server: the served model is registered there.
    dvc("repro", "--force", "--single-item", "evaluate", cwd=root)
    dvc("push", cwd=root)
    assert MlflowClient(tracking_uri=tracking).search_model_versions("name='lmeraser'"), (
        "evaluate registered nothing on the server"
    )
    ws = Workspace(root)
    victim, second = ws.split("private").sample_ids[:2]
    image, second_image = ws.split("private").images[:2]  # before the split changes
    forgotten = lmeraser_warm("forget", "--sample-id", victim, cwd=root)
    assert forgotten.returncode == 0, forgotten.stderr[-3000:]
    record = LineageLog(root / "audit" / "lineage.jsonl").read_unverified()[-1].predicate
    scanned = record["verification"]["scan"]
    assert scanned["hits"] == 0 and scanned["not_searched"] == []
    assert scanned["remote_stores"]["dvc remote 'prod'"]["bucket"] == bucket
    assert any(v.get("tracking_uri") == tracking for v in scanned["remote_stores"].values())
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(record)
    strict = lmeraser_warm("audit", "scan", "--strict", cwd=root)
    assert strict.returncode == 0, strict.stderr[-2000:]
    records = len(LineageLog(root / "audit" / "lineage.jsonl").read_unverified())

    # A copy of the next request's image planted in the S3 remote, beside DVC's objects (where
    # `dvc gc --cloud` does not collect; an object in DVC's own layout is collected by the purge
    # first): that batch's scan finds it and signs nothing. (A batch searches for what it erases;
    # `audit scan` for everything the records erased, below.)
    client.put_object(Bucket=bucket, Key="dvc/exports/copy.npy", Body=_npy(second_image[None]))
    failed = lmeraser_warm("forget", "--sample-id", second, cwd=root)
    assert failed.returncode != 0 and "scan hit(s): forgotten data survives in dvc remote 'prod'" in failed.stderr
    assert len(LineageLog(root / "audit" / "lineage.jsonl").read_unverified()) == records
    client.delete_object(Bucket=bucket, Key="dvc/exports/copy.npy")
    finished = lmeraser_warm("unlearn", cwd=root)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(LineageLog(root / "audit" / "lineage.jsonl").read_unverified()) == records + 1

    # The first request's image planted back in the S3 remote: `audit scan` finds it.
    client.put_object(Bucket=bucket, Key="dvc/exports/old.npy", Body=_npy(image[None]))
    found = lmeraser_warm("audit", "scan", cwd=root)
    assert (
        found.returncode == 1
        and "HIT forgotten sample" in found.stderr
        and f"s3://{bucket}/dvc/exports/old.npy" in found.stderr
    )
    client.delete_object(Bucket=bucket, Key="dvc/exports/old.npy")
    # Planted in a run artifact on the tracking server: found through MLflow's artifact API.
    mlflow = MlflowClient(tracking_uri=tracking)
    run = mlflow.search_runs([mlflow.get_experiment_by_name("lmeraser").experiment_id], max_results=1)[0].info.run_id
    np.save(tmp_path / "copy.npy", image[None])
    mlflow.log_artifact(run, str(tmp_path / "copy.npy"))
    hit = lmeraser_warm("audit", "scan", cwd=root)
    assert hit.returncode == 1 and "HIT forgotten sample" in hit.stderr and "mlflow experiment 'lmeraser'" in hit.stderr
    targets = scan_targets(ws)
    assert Keyer(ws).content(content_hash(image)) in targets.sample_keys
