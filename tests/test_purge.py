"""The scan finds forgotten pixels wherever an .npy holds them (even renamed, as in a DVC cache)
and superseded artifacts by sha256; membership-inference scores behave as defined."""

import numpy as np

from lmeraser.audit.scan import scan
from lmeraser.data.splits import content_hash
from lmeraser.evaluation import membership_inference
from lmeraser.io import sha256_file
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace


def test_scan_finds_forgotten_images_and_superseded_artifacts(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", images[1:])  # the forgotten image 0 is gone here
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    with open(cache / "cdef0123", "wb") as handle:  # a cache object: no extension, old data version
        np.save(handle, images)
    artifact = tmp_path / "mlartifacts" / "1" / "run" / "prompt.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"old prompt weights")
    ws = Workspace(tmp_path)
    forgotten = {Keyer(ws).content(content_hash(images[0]))}  # records name erased images by keyed hash only
    report = scan(ws, forgotten, {sha256_file(artifact)})
    hits, counts, not_searched = report.hits, report.counts, report.not_searched
    kinds = sorted((h.kind, h.location) for h in hits)
    assert kinds == [("forgotten sample", "dvc cache"), ("superseded artifact", "mlflow artifacts")]
    assert counts["data"] == 1
    (cache / "cdef0123").unlink()
    artifact.unlink()
    assert scan(Workspace(tmp_path), forgotten, set()).hits == [] and not_searched == []
    # RGB images (N, H, W, 3) are hashed the same way.
    rgb = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "data" / "rgb.npy", rgb)
    hits = scan(ws, {Keyer(ws).content(content_hash(rgb[2]))}, set()).hits
    assert [(h.location, h.kind) for h in hits] == [("data", "forgotten sample")]


def test_membership_inference_scores():
    separated = membership_inference(np.array([0.01, 0.02]), np.array([1.0, 2.0, 3.0]))
    assert separated["auc"] == 1.0 and separated["tpr_at_1pct_fpr"] == 1.0
    same = membership_inference(np.ones(10), np.ones(50))
    assert same["auc"] == 0.5 and same["tpr_at_1pct_fpr"] == 0.0
    inverted = membership_inference(np.array([5.0]), np.array([0.1, 0.2]))
    assert inverted["auc"] == 0.0
    assert np.isnan(membership_inference(np.array([]), np.ones(3))["auc"])


def test_scan_asks_the_stores_where_they_keep_things_and_says_what_it_cannot_reach(tmp_path, monkeypatch):
    """An MLflow artifact root outside the workspace and a second DVC remote are found through the
    stores themselves; a cloud remote is listed as not searched, and --strict makes that fatal."""
    import subprocess

    import mlflow
    from mlflow import MlflowClient

    from helpers import BIN, lmeraser_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # this workspace's own store, whatever ran before
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=ws.root, check=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    forgotten = {Keyer(ws).content(content_hash(images[0]))}
    # MLflow: the default SQLite store, its experiment's artifacts somewhere else entirely.
    elsewhere = tmp_path / "artifact-server"
    client = MlflowClient(tracking_uri=f"sqlite:///{ws.mlflow_db}")
    experiment = client.create_experiment("lmeraser", artifact_location=elsewhere.as_uri())
    run = client.create_run(experiment)
    np.save(tmp_path / "old.npy", images)
    client.log_artifact(run.info.run_id, str(tmp_path / "old.npy"))
    # DVC: a second, local remote holding an old object, and a cloud remote.
    second = tmp_path / "second-remote" / "files" / "md5" / "ab"
    second.mkdir(parents=True)
    np.save(second / "cdef", images)
    for args in (
        ["remote", "add", "second", str(tmp_path / "second-remote")],
        ["remote", "add", "cloud", "s3://bucket/lmeraser"],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=ws.root, check=True, capture_output=True)
    # No credentials for the cloud remote on this machine (tests/test_production_stores.py has them).
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(key, str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    report = scan(ws, forgotten, set())
    hits, counts, not_searched = report.hits, report.counts, report.not_searched
    assert sorted(h.location for h in hits) == ["dvc remote 'second'", "mlflow experiment 'lmeraser'"]
    assert counts["mlflow experiment 'lmeraser'"] == 1 and len(not_searched) == 1
    assert not_searched[0].startswith(
        "dvc remote 'cloud' (s3://bucket/lmeraser @ default endpoint): cannot be read from here (NoCredentialsError"
    )
    mlflow.set_tracking_uri("")  # leave no global state behind
    done = lmeraser_cli("audit", "scan", "--root", str(ws.root), cwd=tmp_path)
    assert (
        done.returncode == 0
        and "not searched: dvc remote 'cloud'" in done.stderr
        and "1 location(s) not searched" in done.stdout
    )
    strict = lmeraser_cli("audit", "scan", "--strict", "--root", str(ws.root), cwd=tmp_path)
    assert strict.returncode == 1 and "could not be searched (--strict)" in strict.stderr


def _dvc_workspace(tmp_path, monkeypatch) -> Workspace:
    import subprocess

    from helpers import BIN

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = Workspace(tmp_path / "ws")
    ws.data.mkdir(parents=True)
    for cmd in (
        ["git", "init", "-q"],
        [str(BIN / "dvc"), "init", "-q"],
        [str(BIN / "dvc"), "remote", "add", "-d", "backup", str(tmp_path / "remote")],
    ):
        subprocess.run(cmd, cwd=ws.root, check=True, capture_output=True)
    return ws


def _objects(root) -> set[str]:
    return {p.parent.name + p.name for p in root.rglob("*") if p.is_file() and len(p.parent.name) == 2}


def test_the_purge_collects_old_versions_from_the_cache_and_every_remote_in_process(tmp_path, monkeypatch):
    """`dvc add`, `dvc gc` and `dvc push` / `dvc gc --cloud` per remote, through DVC's Python API:
    an old data version's objects leave the cache and the remote, the current ones stay (and the
    remote gets them), and a remote that fails is named in one sentence, the others still collected."""
    import subprocess

    from lmeraser.unlearning.purge import purge
    from lmeraser.versioning import cache_dir, dvc_add

    from helpers import BIN

    ws = _dvc_workspace(tmp_path, monkeypatch)
    (ws.data / "a.txt").write_text("the forgotten version")
    dvc_add(ws.root, "data")
    subprocess.run([str(BIN / "dvc"), "push", "-q"], cwd=ws.root, check=True, capture_output=True)
    old = _objects(cache_dir(ws.root))
    assert old and old <= _objects(tmp_path / "remote")
    (ws.data / "a.txt").write_text("the version after the erasure")
    dvc_add(ws.root, "data")
    current = _objects(cache_dir(ws.root)) - old
    broken = tmp_path / "not-a-directory"
    broken.write_text("a file where a remote should be")
    subprocess.run(
        [str(BIN / "dvc"), "remote", "add", "broken", str(broken)], cwd=ws.root, check=True, capture_output=True
    )

    result = purge(ws, set(), log=lambda m: None)
    assert result["remotes_gc"] == ["backup"] and len(result["remotes_failed"]) == 1
    assert (
        result["remotes_failed"][0].startswith("broken: `dvc push -r broken` failed in ")
        and "\n" not in result["remotes_failed"][0]
    )
    assert _objects(cache_dir(ws.root)) == current
    assert _objects(tmp_path / "remote") == current  # pushed, then the old version collected


def test_dvc_add_outside_a_dvc_project_is_one_sentence(tmp_path):
    import pytest

    from lmeraser.errors import LmeraserError
    from lmeraser.versioning import dvc_add

    (tmp_path / "data").mkdir()
    with pytest.raises(
        LmeraserError, match=r"^`dvc add data` failed in .*: you are not inside of a DVC repository"
    ) as info:
        dvc_add(tmp_path, "data")
    assert "\n" not in str(info.value)


def test_another_process_holding_dvcs_lock_is_one_sentence_for_the_purge_and_the_rebuilds_dvc_calls(
    tmp_path, monkeypatch
):
    """Found by a stranger's attack: with a user's DVC command holding the repository's lock, a
    batch's `dvc status` (capture, rebuild) and `dvc commit` failed with tracebacks and DVC's
    terminal colour codes; the purge's sentence had the codes too. Each is one plain sentence."""
    import subprocess
    import sys

    import pytest

    from lmeraser.errors import LmeraserError
    from lmeraser.unlearning.purge import purge
    from lmeraser.unlearning.rebuild import record_stage
    from lmeraser.versioning import dvc_add

    ws = _dvc_workspace(tmp_path, monkeypatch)
    (ws.data / "a.txt").write_text("a version")
    dvc_add(ws.root, "data")
    (ws.root / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: cp data/a.txt out.txt\n    deps: [data]\n    outs: [out.txt]\n"
    )
    (ws.root / "out.txt").write_text("a version")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dvc.repo import Repo; repo = Repo(sys.argv[1]); repo.lock.lock(); "
            "print('held', flush=True); time.sleep(120)",
            str(ws.root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for call in (lambda: record_stage(ws, "train"), lambda: purge(ws, set(), log=lambda m: None)):
            with pytest.raises(LmeraserError) as info:
                call()
            message = str(info.value)
            assert "another DVC process holds the repository's lock" in message, message
            assert "\n" not in message and "\x1b" not in message
    finally:
        holder.kill()
        holder.wait()
    record_stage(ws, "train")  # the lock released: it records
    assert "out.txt" in (ws.root / "dvc.lock").read_text()
