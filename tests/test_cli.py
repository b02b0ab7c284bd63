"""Bad input through the real CLI: one sentence naming the culprit, non-zero exit, nothing half-written."""

import numpy as np
import pandas as pd
import yaml

from lmeraser.workspace import Workspace

from helpers import TINY, build_workspace, lmeraser_cli
from test_sources import make_idx_dir


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted((root / "data").rglob("*")) if p.is_file()}


def _one_sentence(done, *needles):
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_source_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    done = lmeraser_cli("data", "init", "--source", "imagenet", "--no-dvc", cwd=tmp_path)
    _one_sentence(done, "'imagenet'")
    assert not (tmp_path / "data").exists()


def test_truncated_idx_keeps_the_previous_data(tmp_path):
    build_workspace(tmp_path, TINY)
    before = _snapshot(tmp_path)
    directory = make_idx_dir(tmp_path / "idx", gz=False)
    target = directory / "train-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:-3])
    done = lmeraser_cli("data", "init", "--source", f"idx:{directory}", "--no-dvc", cwd=tmp_path)
    _one_sentence(done, str(target), "truncated")
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_wrong_shapes_in_npz(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    np.savez(tmp_path / "flat.npz", x_train=np.zeros((10, 64), np.uint8), y_train=np.zeros(10, int))
    done = lmeraser_cli("data", "init", "--source", f"npz:{tmp_path / 'flat.npz'}", "--no-dvc", cwd=tmp_path)
    _one_sentence(done, "flat.npz:x_train", "(N, H, W)")


def test_missing_debian_package_names_it(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setenv("LMERASER_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    done = lmeraser_cli("data", "init", "--source", "fashion-mnist", "--no-dvc", cwd=tmp_path)
    _one_sentence(done, "apt-get install dataset-fashion-mnist")


def test_out_of_range_param_is_refused_before_any_work(tmp_path):
    build_workspace(tmp_path, TINY)
    bad = {**TINY, "prompt": {"kind": "pad", "pad": {"epochs": 0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    done = lmeraser_cli("stage", "train", cwd=tmp_path)
    _one_sentence(done, "params.yaml", "prompt.pad.epochs")
    done = lmeraser_cli("data", "init", "--no-dvc", cwd=tmp_path)
    _one_sentence(done, "prompt.pad.epochs")
    # --params names another file: that one is read (and refused), wherever the workspace is.
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**TINY, "backbone": {"depht": 2}}))
    done = lmeraser_cli(
        "stage", "train", "--root", str(tmp_path), "--params", str(tmp_path / "other.yaml"), cwd=tmp_path.parent
    )
    _one_sentence(done, "other.yaml", "backbone.depht")


def test_validation_failure_exits_with_reason_and_docs_path(tmp_path):
    build_workspace(tmp_path, TINY)
    victim = Workspace(tmp_path).manifest("private").iloc[0]
    tombstone = {"sample_id": victim.sample_id, "content_key": "", "reason": "forget", "label": ""}
    pd.DataFrame([tombstone]).to_csv(tmp_path / "data" / "tombstones.csv", index=False)
    done = lmeraser_cli("stage", "validate", cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data validation failed") and "data_docs/index.html" in last
    assert not (tmp_path / "artifacts" / "validation" / "private.json").exists()


def test_stage_validate_runs_without_torch_timm_or_faiss_in_its_process(tmp_path):
    """`lmeraser stage validate` reads, hashes and counts: its process never imports torch, timm
    or faiss (3-4 s of its ~10 s were timm, through the flows' shared module, and torch, for a
    numerics check of kernels it never runs). A stage that computes still checks them first."""
    import json
    import subprocess
    import sys

    from lmeraser.stages import STAGES

    assert [s.name for s in STAGES if not s.kernels] == ["validate"]
    build_workspace(tmp_path, TINY)
    child = (
        "import json, sys\n"
        "from lmeraser import cli\n"
        "code = cli.run(['stage', 'validate'])\n"
        "print(json.dumps([code, sorted(m for m in ('torch', 'timm', 'faiss') if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, []], done.stderr[-3000:]
    assert (tmp_path / "artifacts" / "validation" / "private.json").exists()


def test_unknown_stage_and_missing_metrics(tmp_path):
    _one_sentence(lmeraser_cli("stage", "deploy", cwd=tmp_path), "unknown stage 'deploy'")
    _one_sentence(lmeraser_cli("metrics", cwd=tmp_path), "metrics.json")


def test_the_fast_exit_stops_idle_executor_threads_and_keeps_the_exit_code():
    """The CLI skips the interpreter's module teardown; it must still shut threads down as a normal
    exit does (an idle ThreadPoolExecutor's workers once made it wait forever) and keep the code."""
    import subprocess
    import sys

    code = (
        "from concurrent.futures import ThreadPoolExecutor; pool = ThreadPoolExecutor(2); "
        "pool.submit(print, 'worked').result(); "
        "import atexit; atexit.register(print, 'atexit ran'); from lmeraser.cli import _exit; _exit(3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stdout.split() == ["worked", "atexit", "ran"]


def test_data_samples_lists_the_ids_a_request_names(tmp_path):
    """`lmeraser data samples`: where a forget's ids and subjects come from (split, subject, label)."""
    import json

    ws = build_workspace(tmp_path, TINY)
    private = ws.manifest("private")
    done = lmeraser_cli("data", "samples", "--json", "--limit", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert (
        listed["total"] == len(private) and [r["sample_id"] for r in listed["samples"]] == private["sample_id"].tolist()
    )
    assert {r["split"] for r in listed["samples"]} == {"private"}
    subject = private["subject_id"].iloc[0]
    mine = json.loads(lmeraser_cli("data", "samples", "--json", "--subject", subject, cwd=tmp_path).stdout)
    assert {r["subject_id"] for r in mine["samples"]} == {subject} and mine["total"] == int(
        (private["subject_id"] == subject).sum()
    )
    every = json.loads(lmeraser_cli("data", "samples", "--split", "all", "--json", "--limit", "3", cwd=tmp_path).stdout)
    assert (
        every["total"] == sum(len(ws.manifest(s)) for s in ("public", "private", "test")) and len(every["samples"]) == 3
    )
    table = lmeraser_cli("data", "samples", "--limit", "2", cwd=tmp_path)
    assert private["sample_id"].iloc[0] in table.stdout and f"{len(private) - 2} more" in table.stdout
    _one_sentence(lmeraser_cli("data", "samples", "--subject", "s99999", cwd=tmp_path), "subject s99999")
    _one_sentence(lmeraser_cli("data", "samples", "--split", "nope", cwd=tmp_path), "--split nope")


def test_data_samples_and_audit_schema_refuse_what_a_stranger_tried(tmp_path):
    """A damaged manifest is one sentence; an id holding a terminal escape is shown escaped; the
    hint to forget is for private samples only; `audit schema --out` never writes into audit/ and
    says why it cannot write."""
    import json

    ws = build_workspace(tmp_path, TINY)
    manifest = ws.shard_dirs("private")[0] / "manifest.csv"
    frame = pd.read_csv(manifest, dtype=str)
    frame.loc[0, "sample_id"] = "\x1b[2Jevil"
    frame.to_csv(manifest, index=False)
    table = lmeraser_cli("data", "samples", "--limit", "3", cwd=tmp_path)
    assert table.returncode == 0 and "\x1b" not in table.stdout and "Forget one" in table.stdout
    assert "Forget one" not in lmeraser_cli("data", "samples", "--split", "test", cwd=tmp_path).stdout
    frame.loc[0, "label"] = "notanint"
    frame.to_csv(manifest, index=False)
    _one_sentence(lmeraser_cli("data", "samples", cwd=tmp_path), "manifest.csv", "not a manifest")
    manifest.write_text("garbage\n")
    _one_sentence(lmeraser_cli("data", "samples", "--json", cwd=tmp_path), "not a manifest")

    (tmp_path / "audit").mkdir(exist_ok=True)
    log = tmp_path / "audit" / "lineage.jsonl"
    log.write_text("the signed log\n")
    _one_sentence(lmeraser_cli("audit", "schema", "--out", str(log), cwd=tmp_path), "audit/")
    assert log.read_text() == "the signed log\n"
    _one_sentence(lmeraser_cli("audit", "schema", "--out", "/proc/version", cwd=tmp_path), "/proc/version")
    _one_sentence(
        lmeraser_cli("audit", "schema", "--out", str(tmp_path / "no" / "such" / "s.json"), cwd=tmp_path),
        "does not exist",
    )
    printed = lmeraser_cli("audit", "schema", "--out", "-", cwd=tmp_path)
    assert printed.returncode == 0 and json.loads(printed.stdout)["title"] == "lmeraser lineage record predicate"
    written = lmeraser_cli("audit", "schema", "--out", str(tmp_path / "schema.json"), cwd=tmp_path)
    assert written.returncode == 0 and json.loads((tmp_path / "schema.json").read_text()) == json.loads(printed.stdout)


def test_an_idle_unlearn_finishes_an_interrupted_write_as_the_error_advises(tmp_path):
    """A data directory left moved aside by a killed writer: `data samples` says "run `lmeraser
    unlearn`: it finishes the interrupted write", and an `unlearn` with nothing pending does so
    (a stranger found it said "no pending requests" and left the data unrepaired)."""
    import subprocess

    build_workspace(tmp_path, TINY)
    dead = subprocess.Popen(["true"])
    dead.wait()
    private = tmp_path / "data" / "private"
    private.rename(tmp_path / "data" / f".private.{dead.pid}.old")
    advice = lmeraser_cli("data", "samples", cwd=tmp_path)
    assert advice.returncode == 1 and "run `lmeraser unlearn`: it finishes the interrupted write" in advice.stderr
    done = lmeraser_cli("unlearn", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recovery: rolled private back" in done.stdout and done.stdout.strip().endswith("no pending requests")
    assert (Workspace(tmp_path).shard_dirs("private")[0] / "manifest.csv").exists()
    assert lmeraser_cli("data", "samples", cwd=tmp_path).returncode == 0


def test_a_deleted_shard_is_one_sentence_from_stage_validate(tmp_path):
    """A stranger deleted data/private/0003: `data samples` said so in one sentence, `stage
    validate` printed a traceback (the fingerprints hashed the files before any reader ran)."""
    import shutil

    ws = build_workspace(tmp_path, {**TINY, "data": {**TINY["data"], "shard_size": 20}})
    shutil.rmtree(ws.shard_dirs("private")[3])
    done = lmeraser_cli("stage", "validate", cwd=tmp_path)
    problems = [line for line in done.stderr.splitlines() if line.strip() and " | INFO    | " not in line]  # progress
    assert done.returncode == 1 and len(problems) == 1, done.stderr
    assert problems[0].startswith("error: ") and "data/private/0003: not found" in problems[0]
