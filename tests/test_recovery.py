"""Crash windows: a process SIGKILLed at each named failpoint, then recovery on the next run.

The writers run in a small child process (only lmeraser.io and its imports), so each kill is a
real SIGKILL at the exact point: no `finally` runs, as after a power cut.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmeraser.errors import LmeraserError
from lmeraser.failpoints import FAILPOINT_ENV, NAMED
from lmeraser.io import recover_directory, remove_stale_temp_files
from lmeraser.workspace import Workspace

from helpers import received_event

REPO = Path(__file__).resolve().parents[1]


def _killed_at(point: str, code: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, FAILPOINT_ENV: point, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -signal.SIGKILL, (point, done.stderr[-2000:])


REPLACE = """
    from pathlib import Path
    from lmeraser.io import atomic_directory
    with atomic_directory(Path("split")) as staging:
        (staging / "images.npy").write_text("new")
"""


def _split(tmp_path: Path) -> Path:
    target = tmp_path / "split"
    target.mkdir()
    (target / "images.npy").write_text("old")
    return target


@pytest.mark.parametrize("point", ["directory:staged", "directory:swapped-out", "directory:swapped-in"])
def test_a_directory_swap_killed_at_any_point_rolls_forward(tmp_path, point):
    target = _split(tmp_path)
    _killed_at(point, REPLACE, tmp_path)
    if point == "directory:swapped-out":
        assert not target.exists()  # the window: before, every resume failed here
    assert recover_directory(target)
    assert (target / "images.npy").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no .new, .old or staging left
    assert recover_directory(target) == []


def test_a_directory_killed_while_being_built_rolls_back(tmp_path):
    target = _split(tmp_path)
    code = REPLACE.replace(
        '(staging / "images.npy").write_text("new")',
        '(staging / "images.npy").write_text("half"); import os, signal; os.kill(os.getpid(), signal.SIGKILL)',
    )
    _killed_at("none", code, tmp_path)
    staging = [p.name for p in tmp_path.iterdir() if p.name.endswith(".staging")]
    assert len(staging) == 1
    assert recover_directory(target) == [f"removed unfinished {staging[0]}"]
    assert (target / "images.npy").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_an_old_directory_left_without_a_new_one_rolls_back(tmp_path):
    """What the swap of an older version left between its two renames: only `.NAME.<pid>.old`."""
    target = _split(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    os.replace(target, tmp_path / f".split.{dead}.old")
    recover_directory(target)
    assert (target / "images.npy").read_text() == "old"


def test_a_live_writer_is_left_alone(tmp_path):
    target = _split(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        staging = tmp_path / f".split.{sleeper.pid}.abc.staging"
        staging.mkdir()
        temp = tmp_path / f".tombstones.csv.{sleeper.pid}.abc.tmp"
        temp.write_text("x")
        assert recover_directory(target) == [] and remove_stale_temp_files(tmp_path) == []
        assert staging.exists() and temp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temp_files(tmp_path) == [temp] and recover_directory(target)


def test_a_temporary_file_of_a_killed_write_is_removed(tmp_path):
    code = """
        from lmeraser.io import atomic_write_text
        atomic_write_text("tombstones.csv", "sample_id\\n")
    """
    _killed_at("atomic:tombstones.csv", code, tmp_path)
    leftovers = list(tmp_path.glob(".tombstones.csv.*.tmp"))
    assert len(leftovers) == 1 and not (tmp_path / "tombstones.csv").exists()
    assert remove_stale_temp_files(tmp_path) == leftovers and not list(tmp_path.iterdir())


def test_leftovers_are_never_versioned_by_dvc(tmp_path):
    import shutil

    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True)
    shutil.copy2(REPO / ".dvcignore", tmp_path / ".dvcignore")
    repo = Repo(str(tmp_path))
    names = [
        "data/.private.123.old/images.npy",
        "data/.private.123.abc.staging/x",
        "data/.private.123.new/x",
        "data/.tombstones.csv.1.a.tmp",
    ]
    ignored = {
        name: repo.dvcignore.is_ignored(repo.fs, str(tmp_path / name)) for name in [*names, "data/private/images.npy"]
    }
    assert ignored == {**dict.fromkeys(names, True), "data/private/images.npy": False}


def test_every_named_failpoint_is_reached_in_the_code():
    sources = "".join(p.read_text() for p in (REPO / "lmeraser").rglob("*.py"))
    for point in NAMED:
        name = point.split(":")[0] + ":" if point.startswith(("after:", "atomic:")) else point
        assert f'failpoint("{name}' in sources or f'failpoint(f"{name}' in sources, point


# -- the journal --------------------------------------------------------------------------------


def test_the_journal_never_repeats_a_state_and_names_a_damaged_line(tmp_path):
    from lmeraser.journal import Journal

    journal = Journal(Workspace(tmp_path))
    journal.append([received_event("r1")])
    verified = [{"request_id": "r1", "state": "verified", "time": 1.0, "record": 3}]
    journal.append(verified)
    journal.append(verified)  # a resumed record step (killed after the journal, before the batch file went)
    assert [e["state"] for e in journal.events()] == ["received", "verified"]
    with open(journal.path, "ab") as handle:
        handle.write(b'{"request_id": "r2", "sta')  # a torn append: ignored, then repaired
    assert len(journal.events()) == 2
    raw = journal.path.read_bytes()
    journal.path.write_bytes(raw.replace(b"verified", b"verif\xffed"))
    with pytest.raises(LmeraserError, match="journal.jsonl line 2: not a journal event"):
        journal.events()


# -- the influence overlay and its record -------------------------------------------------------


def _influence_workspace(tmp_path, monkeypatch):
    from lmeraser.journal import Journal
    from lmeraser.overlay import Overlay

    monkeypatch.delenv("LMERASER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    ws = Workspace(tmp_path)
    before = {"3": {"key": "k-old", "base_key": "b3", "edits": []}}
    Overlay(ws).write(before)
    ws.overlay_dir.mkdir(parents=True, exist_ok=True)
    (ws.overlay_dir / "k-old.safetensors").write_bytes(b"old")
    Journal(ws).append([received_event("req-1", method="influence")])
    # What the update wrote before it was killed: its intent, the new overlay and its file.
    ws.batches.mkdir(parents=True, exist_ok=True)
    ws.influence_intent_file.write_text(
        json.dumps({"batch_id": "influence-x", "request_ids": ["req-1"], "overlay_before": before})
    )
    Overlay(ws).write({"3": {"key": "k-new", "base_key": "b3", "edits": [{"request_id": "req-1"}]}})
    (ws.overlay_dir / "k-new.safetensors").write_bytes(b"new")
    return ws, before


def test_an_influence_update_killed_before_its_record_is_undone(tmp_path, monkeypatch):
    from lmeraser.journal import Journal
    from lmeraser.overlay import Overlay
    from lmeraser.unlearning.recovery import recover_influence

    ws, before = _influence_workspace(tmp_path, monkeypatch)
    assert "before its record" in recover_influence(ws)[0]
    assert Overlay(ws).read() == before and sorted(p.name for p in ws.overlay_dir.glob("*.safetensors")) == [
        "k-old.safetensors"
    ]
    assert not ws.influence_intent_file.exists()
    assert [r.request_id for r in Journal(ws).awaiting_influence()] == ["req-1"]  # applied again next time


def test_an_influence_update_killed_after_its_record_is_journaled(tmp_path, monkeypatch):
    from lmeraser.journal import Journal
    from lmeraser.lineage.log import LineageLog
    from lmeraser.lineage.records import signing_key
    from lmeraser.unlearning.recovery import recover_influence

    ws, _ = _influence_workspace(tmp_path, monkeypatch)
    LineageLog(ws.lineage_file).append({"x": "0" * 64}, {"batch_id": "influence-x"}, signing_key(ws))
    assert "record 1 was appended" in recover_influence(ws)[0]
    journal = Journal(ws)
    assert (
        journal.requests()["req-1"].state == "approximated" and journal.requests()["req-1"].history[-1]["record"] == 1
    )
    assert not journal.awaiting_influence() and not ws.influence_intent_file.exists()
    assert (ws.overlay_dir / "k-new.safetensors").exists()  # the recorded update stands


def test_a_torn_dvc_rwlock_is_removed_and_a_sound_one_kept(tmp_path):
    """Found by bench/reliability_kill.py: a dvc process killed while rewriting `.dvc/tmp/rwlock`
    left it empty, and every later batch failed with DVC's RWLockFileCorruptedError."""
    from lmeraser.unlearning.recovery import recover
    from lmeraser.versioning import repair_dvc_rwlock

    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True)
    rwlock.write_text('{"read": {}, "write": {}}')
    assert repair_dvc_rwlock(tmp_path) == [] and rwlock.exists()
    rwlock.write_bytes(b"")
    assert any("torn lock file" in line for line in recover(Workspace(tmp_path), log=lambda m: None))
    assert not rwlock.exists()
    rwlock.write_bytes(b'{"read": {"data": [{"pid"')
    import fcntl

    with open(rwlock.parent / "rwlock.lock", "a") as guard:  # a live dvc process editing it
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        assert repair_dvc_rwlock(tmp_path) == [] and rwlock.exists()
    assert repair_dvc_rwlock(tmp_path) and not rwlock.exists()


@pytest.mark.parametrize(
    "name, sound",
    [
        ("dvc.lock", "schema: '2.0'\nstages:\n  train:\n    cmd: {}\n"),
        ("data.dvc", "outs:\n- md5: {}.dir\n  path: data\n"),
    ],
)
def test_a_torn_dvc_file_is_restored_from_git(tmp_path, name, sound):
    """Found by bench/reliability_kill.py: killed while DVC rewrote dvc.lock (`dvc repro`) or
    data.dvc (`dvc add`) in place, every later batch failed with DVC's YAMLValidationError."""
    from lmeraser.versioning import repair_dvc_files

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    path = tmp_path / name
    path.write_text(sound.format("x"))
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", name], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", name], cwd=tmp_path, check=True)
    path.write_text(sound.format("y"))
    assert repair_dvc_files(tmp_path) == [] and "y" in path.read_text()  # a sound file is kept
    path.write_text(sound.format("y")[:-12] + ": [unclosed\n")
    assert repair_dvc_files(tmp_path) == [
        f"restored the torn {name} from git HEAD (a killed dvc process was writing it)"
    ]
    assert path.read_text() == sound.format("x")
    path.write_bytes(b"")
    assert repair_dvc_files(tmp_path) and path.read_text() == sound.format("x")


INFLUENCE = """
    from lmeraser.unlearning.influence_update import influence_pending
    from lmeraser.workspace import Workspace
    influence_pending(Workspace("."), log=lambda message: None)
"""


@pytest.fixture
def influence_ws(trained_workspace, tmp_path, monkeypatch):
    """A copy of the trained tiny workspace with one influence request waiting."""
    import shutil

    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import submit

    monkeypatch.delenv("LMERASER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    submit([RequestSpec(sample_ids=[ws.split("private").sample_ids[0]])], ws, method="influence")
    return ws


def _edited_files(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.overlay_dir.glob("*.safetensors")) if ws.overlay_dir.exists() else []


def test_an_influence_update_killed_while_it_edits_leaves_no_unsigned_prompt(influence_ws):
    """Killed after the edited prompts are written, before the audit and the overlay: the intent is
    already on disk, so the next run deletes those files (before, they stayed until an unlearn)."""
    from lmeraser.journal import Journal
    from lmeraser.unlearning.recovery import recover

    ws = influence_ws
    _killed_at("influence:edited", INFLUENCE, ws.root)
    assert ws.influence_intent_file.exists() and _edited_files(ws) and not ws.overlay_file.exists()
    assert any("before its record" in line for line in recover(ws, log=lambda m: None))
    assert _edited_files(ws) == [] and not ws.influence_intent_file.exists() and not ws.overlay_file.exists()
    assert len(Journal(ws).awaiting_influence()) == 1  # applied again next time


def test_an_influence_update_that_fails_undoes_itself_at_once(influence_ws, monkeypatch):
    from lmeraser.journal import Journal
    from lmeraser.unlearning import influence_update
    from lmeraser.unlearning.influence_update import influence_pending

    def broken(*args, **kwargs):
        raise RuntimeError("the audit broke")

    monkeypatch.setattr(influence_update, "_audit", broken)
    with pytest.raises(RuntimeError, match="the audit broke"):
        influence_pending(influence_ws, log=lambda m: None)
    assert _edited_files(influence_ws) == [] and not influence_ws.influence_intent_file.exists()
    assert not influence_ws.overlay_file.exists() and len(Journal(influence_ws).awaiting_influence()) == 1


def test_audit_influence_false_answers_without_references_and_says_why(influence_ws):
    """`audit.influence: false`: the influence update trains no reference (its answer stays fast)
    and its record says why there is no audit; the exact batch's audit is untouched."""
    import yaml

    from lmeraser.lineage.records import lineage_log
    from lmeraser.unlearning.influence_update import influence_pending

    ws = influence_ws
    params = yaml.safe_load(ws.params_file.read_text())
    params["audit"]["influence"] = False
    ws.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    lines = []
    result = influence_pending(ws, lines.append)
    expected = {
        "status": "no reference audit",
        "reason": "audit.influence is false: the exact batch that follows is audited",
    }
    assert result["forgetting_audit"] == expected
    assert lineage_log(ws).read_unverified()[-1].predicate["forgetting_audit"] == expected
    assert not any("reference" in line for line in lines)
