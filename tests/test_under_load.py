"""Issue 21, under load and for a user: one standing Prefect server per workspace, shared by every
process that runs a flow (no temporary server per process to time out on a busy machine); its
start, reuse, restart, idle stop and explicit stop; `lmeraser serve` stopped by SIGTERM leaves no
child behind; an expected error inside a flow is one sentence; `data init --source` is recorded;
piped tables are not cut; generated files are git-ignored.

These tests run the real CLI without the session's PREFECT_API_URL (conftest.py sets one for every
other test), so the CLI starts and reuses the workspace's own server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmeraser.workspace import Workspace

from helpers import (
    BIN,
    REPO,
    TINY,
    build_workspace,
    clone_repo,
    copy_repo,
    dvc,
    free_port,
    lmeraser_cli,
    lmeraser_warm,
    ran_stages,
)

STATE = Path(".lmeraser") / "prefect" / "state.json"


def _env(**extra: str) -> dict:
    """This test run's environment without its Prefect server: the CLI chooses its own."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "LMERASER_PREFECT_IDLE_TIMEOUT": "600", **extra}


def _cli(*args: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lmeraser"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _state(root: Path) -> dict | None:
    path = root / STATE
    return json.loads(path.read_text()) if path.exists() else None


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return not _alive(pid)


def _flow_runs(url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=json.dumps({"limit": 200}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


def _stop(root: Path) -> None:
    _cli("prefect", "stop", cwd=root, env=_env(), timeout=120)


@pytest.fixture(scope="module")
def standing_repo(tiny_repo_template, tmp_path_factory):
    """A copy of the TINY repository after `dvc repro`, whose first two stages run again in one
    `dvc repro --force backbone` without PREFECT_API_URL: two stage processes show one server
    shared as well as the seven of a whole pipeline, at a third of the cost."""
    root = clone_repo(tiny_repo_template[0], tmp_path_factory.mktemp("standing") / "repo")
    assert _state(root) is None  # the template was built on the test run's own server
    repro = subprocess.run(
        [str(BIN / "dvc"), "repro", "--force", "backbone"],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    yield root, repro
    _stop(root)


def test_every_stage_of_one_dvc_repro_shares_one_standing_server(standing_repo):
    root, repro = standing_repo
    output = repro.stdout + repro.stderr
    assert ran_stages(repro.stdout) == ["validate", "backbone"]
    state = _state(root)
    assert state is not None, "no standing server was recorded"
    # One start for two stage processes, and every stage's flow run is on that one server.
    assert output.count("started the workspace's Prefect server") == 1, output[-3000:]
    assert "Starting temporary server" not in output and "View at" not in output
    names = {run["name"].split("-")[0] for run in _flow_runs(state["url"])}
    assert {"validate", "backbone"} <= names
    # Detached: its own session, so the `dvc repro` (and this test) did not wait for it.
    assert _alive(state["pid"]) and os.getsid(state["pid"]) == state["pid"]
    # The database and log live in the workspace, git-ignored (`git status` stays clean of them).
    assert (root / ".lmeraser" / "prefect" / "prefect.db").exists()
    assert (
        ".lmeraser"
        not in subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    )
    # A later command reuses it; `prefect status` reports it.
    status = _cli("prefect", "status", "--json", cwd=root, env=_env())
    assert json.loads(status.stdout) == {
        **json.loads(status.stdout),
        "running": True,
        "pid": state["pid"],
        "url": state["url"],
        "healthy": True,
    }


def test_the_users_own_prefect_url_is_used_and_nothing_is_started(tmp_path):
    """With PREFECT_API_URL set (here: the test session's server), no workspace server starts."""
    build_workspace(tmp_path, TINY)
    done = lmeraser_cli("stage", "validate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / ".lmeraser").exists()


def _ensure_script(root: Path, hold: float = 0.0) -> list[str]:
    code = (
        "import json, os, sys, time; from pathlib import Path; from lmeraser import prefect_server as p; "
        f"url = p.ensure(Path({str(root)!r})); "
        f"print(json.dumps({{'url': url, 'started': p._held['started']}}), flush=True); time.sleep({hold})"
    )
    return [sys.executable, "-c", code]


def test_processes_starting_at_once_start_one_server_and_a_dead_one_is_replaced(tmp_path):
    root = tmp_path
    # A caller of cli.run keeps the key and the token in its environment: the server never gets them.
    env = _env(LMERASER_SIGNING_KEY="-----BEGIN PRIVATE KEY-----not-for-children", LMERASER_API_TOKEN="t" * 32)
    procs = [
        subprocess.Popen(_ensure_script(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    answers = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    try:
        assert len({a["url"] for a in answers}) == 1, answers
        assert sum(a["started"] for a in answers) == 1, answers
        first = _state(root)
        environ = Path(f"/proc/{first['pid']}/environ").read_bytes()
        assert b"not-for-children" not in environ and b"LMERASER_API_TOKEN" not in environ
        # A server killed outright (a crash, an OOM kill) is found dead and replaced.
        os.killpg(first["pid"], signal.SIGKILL)
        assert _gone(first["pid"], 30)
        again = json.loads(
            subprocess.run(_ensure_script(root), env=env, capture_output=True, text=True, timeout=600).stdout
        )
        second = _state(root)
        assert (
            again["started"]
            and second["pid"] != first["pid"]
            and again["url"] == second["url"]
            and _alive(second["pid"])
        )
    finally:
        _stop(root)
    assert _state(root) is None


def test_a_process_on_one_workspace_s_server_is_refused_another_workspace_s_in_one_sentence(tmp_path, monkeypatch):
    """Prefect reads its API URL once per process, so a process (a caller of cli.run running
    several workspaces) that holds one workspace's server cannot move to another's: the second
    workspace is refused in one sentence, never silently run on the first one's server."""
    from lmeraser import prefect_server
    from lmeraser.errors import LmeraserError

    first, second = (tmp_path / "first").resolve(), tmp_path / "second"
    monkeypatch.setattr(prefect_server, "_held", {"url": "http://127.0.0.1:9/api", "started": False, "root": first})
    assert prefect_server.ensure(first) == "http://127.0.0.1:9/api"
    with pytest.raises(LmeraserError) as refused:
        prefect_server.ensure(second)
    message = str(refused.value)
    assert str(first) in message and str(second.resolve()) in message and "PREFECT_API_URL" in message
    assert "\n" not in message
    # Through the CLI in that process: refused before the request is journaled (a stranger found it
    # journaled first, then refused); `--no-process` runs no flow, so it is accepted.
    ws = build_workspace(second, TINY)
    sample = str(ws.manifest("private")["sample_id"][0])
    done = lmeraser_warm("forget", "--sample-id", sample, "--no-git-commit", cwd=second)
    assert done.returncode == 1 and done.stderr.startswith("error: this process runs its flows"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not ws.journal_file.exists()
    queued = lmeraser_warm("forget", "--sample-id", sample, "--no-process", cwd=second)
    assert queued.returncode == 0 and ws.journal_file.exists(), queued.stderr


def test_a_copied_workspace_never_uses_or_stops_the_original_s_server(tmp_path):
    """A workspace copied with its `.lmeraser/prefect/state.json` names the original's server:
    the copy treats it as no server of its own (a stranger saw `prefect stop` in the copy stop
    the original's)."""
    from lmeraser import prefect_server

    original, copy = (tmp_path / "original").resolve(), (tmp_path / "copy").resolve()
    state = {"url": "http://127.0.0.1:9/api", "pid": os.getpid(), "started_at": 0.0, "root": str(original)}
    for root in (original, copy):
        prefect_server.state_dir(root).mkdir(parents=True)
        (prefect_server.state_dir(root) / "state.json").write_text(json.dumps(state))
    assert prefect_server.read_state(original) == state
    assert prefect_server.read_state(copy) is None
    assert prefect_server.status(copy)["running"] is False
    assert prefect_server.stop(copy) is None and _alive(os.getpid())


def test_a_server_that_cannot_start_in_time_is_one_sentence_and_leaves_nothing_running(tmp_path):
    build_workspace(tmp_path, TINY)
    done = _cli("stage", "validate", cwd=tmp_path, env=_env(LMERASER_PREFECT_START_TIMEOUT="0.5"))
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("started the workspace")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "LMERASER_PREFECT_START_TIMEOUT" in lines[0], (
        done.stderr
    )
    assert "Traceback" not in done.stderr and _state(tmp_path) is None
    assert not (tmp_path / "artifacts" / "validation").exists()
    # A bad setting is one sentence too.
    done = _cli("stage", "validate", cwd=tmp_path, env=_env(LMERASER_PREFECT_START_TIMEOUT="soon"))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: $LMERASER_PREFECT_START_TIMEOUT='soon': expected a number of seconds."
    ]


def test_an_idle_server_stops_by_itself_but_never_under_a_process_using_it(tmp_path):
    env = _env(LMERASER_PREFECT_IDLE_TIMEOUT="2")
    holder = subprocess.Popen(
        _ensure_script(tmp_path, hold=12), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        json.loads(holder.stdout.readline())
        pid = _state(tmp_path)["pid"]
        time.sleep(8)  # idle well past 2 s, but a process still holds it
        assert _alive(pid) and _state(tmp_path) is not None
        holder.wait(timeout=60)
        assert _gone(pid, 60), "the idle server did not stop"
        assert _state(tmp_path) is None
    finally:
        holder.kill()
        _stop(tmp_path)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def test_serve_stopped_by_sigterm_stops_every_child_it_started(trained_workspace, tmp_path):
    """The batch worker runs a flow (here a batch that fails: the copy has no DVC), which needs a
    Prefect server; SIGTERM must leave none of the service's children running."""
    import shutil

    source, _ = trained_workspace
    root = tmp_path / "ws"
    shutil.copytree(source.root, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["service"] = {"batch_window_s": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sample = source.manifest("private")["sample_id"].iloc[0]
    env = _env(LMERASER_API_TOKEN="t" * 32)
    submitted = _cli("forget", "--sample-id", sample, "--no-process", cwd=root, env=env)
    assert submitted.returncode == 0, submitted.stderr
    port = free_port()
    serve = subprocess.Popen(
        [str(BIN / "lmeraser"), "serve", "--port", str(port), "--no-git-commit"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    seen: set[int] = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (seen := seen | _children(serve.pid)):
            assert serve.poll() is None, "serve exited"
            time.sleep(0.5)
        assert seen, "serve started no Prefect server"
        while time.time() < deadline:  # the service answers: it started all it starts
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5)
                break
            except OSError:
                assert serve.poll() is None, "serve exited"
                time.sleep(0.5)
        time.sleep(5)  # the worker's first batch (it fails: no DVC here) runs its flow
        seen |= _children(serve.pid)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0
        left = [pid for pid in seen if not _gone(pid, 60)]
        assert not left, f"left running after SIGTERM: {left}"
        assert _state(root) is None
    finally:
        serve.kill()
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_expected_error_inside_a_flow_is_one_sentence_once(tmp_path):
    """A forget before any `dvc repro`: the batch's capture task refuses; the sentence is printed
    once, without Prefect's task traceback (which `--debug` shows, and the run's log keeps)."""
    root = copy_repo(tmp_path / "repo", TINY)
    lmeraser_cli("data", "init", cwd=root, check=True)

    sample = Workspace(root).manifest("private").sample_id[0]
    done = lmeraser_cli("forget", "--sample-id", sample, "--no-git-commit", cwd=root)
    assert done.returncode == 1
    sentence = "run `dvc repro` first, then `lmeraser unlearn`"
    assert (done.stdout + done.stderr).count(sentence) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith(
        "error: the pipeline is not up to date"
    )
    debug = lmeraser_cli("--debug", "unlearn", "--no-git-commit", cwd=root)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "LmeraserError" in debug.stderr


def test_debug_shows_an_expected_error_s_traceback_even_after_a_command_without_it(monkeypatch):
    """The filter that keeps an expected error to one sentence stays on Prefect's handler for the
    process's life; a later `--debug` command in the same process (cli.run) must still see it all."""
    import logging

    from lmeraser import cli
    from lmeraser.errors import LmeraserError

    try:
        raise LmeraserError("the pipeline is not up to date")
    except LmeraserError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", None, None)
        record.exc_info = sys.exc_info()
    monkeypatch.setitem(cli._settings, "debug", False)
    assert cli._ExpectedErrorsOnce().filter(record) is False
    monkeypatch.setitem(cli._settings, "debug", True)
    assert cli._ExpectedErrorsOnce().filter(record) is True


def test_prefect_s_drain_progress_at_exit_does_not_follow_the_error_line(monkeypatch):
    """CI: `stage validate` on a deleted shard printed its one `error:` line, then Prefect's
    "EventsWorker - Still processing items: 1 items remaining..." (its event queue drained at exit).
    The console handler now drops that progress line; a full queue dropping an item still shows."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from lmeraser import cli

    handler = PrefectConsoleHandler()
    logging.getLogger().addHandler(handler)
    try:
        cli._one_sentence_on_console()
        cli._one_sentence_on_console()  # idempotent: one filter of each kind
        assert sum(isinstance(f, cli._NoDrainProgress) for f in handler.filters) == 1

        def shown(name: str, message: str) -> bool:
            return bool(handler.filter(logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)))

        monkeypatch.setitem(cli._settings, "debug", False)
        assert not shown("EventsWorker", "Still processing items: 1 items remaining...")
        assert not shown("APILogWorker", "Still processing items: 3 items remaining...")
        assert shown("EventsWorker", "Service 'EventsWorker' queue is full (1000 items), dropping item")
        monkeypatch.setitem(cli._settings, "debug", True)
        assert shown("EventsWorker", "Still processing items: 1 items remaining...")
    finally:
        logging.getLogger().removeHandler(handler)


def test_data_init_source_is_recorded_for_the_next_data_init(tmp_path):
    from test_sources import make_idx_dir

    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text)
    directory = make_idx_dir(tmp_path / "idx", n=60)
    done = lmeraser_cli("data", "init", "--source", f"idx:{directory}", "--no-dvc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "data.source set to" in done.stdout
    after = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(after)["data"]["source"] == f"idx:{directory}"
    # Only that value changed: every comment and every other line is as it was.
    changed = [(a, b) for a, b in zip(text.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and "# digits | fashion-mnist" in changed[0][1], changed
    # A plain `data init` keeps the real data (it used to switch silently to digits).
    again = lmeraser_cli("data", "init", "--no-dvc", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "data" / "source.json").read_text())["source"] == f"idx:{directory}"


def test_data_init_source_that_cannot_be_recorded_changes_nothing(tmp_path):
    from test_sources import make_idx_dir

    params = {**TINY, "data": {**TINY["data"]}}
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(params, default_flow_style=True)
    )  # data: {source: digits, ...}
    before = (tmp_path / "params.yaml").read_text()
    done = lmeraser_cli("data", "init", "--source", f"idx:{make_idx_dir(tmp_path / 'idx')}", "--no-dvc", cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "no `source:` line" in done.stderr
    assert (tmp_path / "params.yaml").read_text() == before and not (tmp_path / "data").exists()


def test_piped_tables_are_not_cut_at_80_columns(tmp_path):
    ws = build_workspace(tmp_path, TINY)
    samples = ws.manifest("private")["sample_id"].tolist()[:3]
    for sample in samples:
        assert lmeraser_cli("forget", "--sample-id", sample, "--no-process", cwd=tmp_path).returncode == 0
    done = lmeraser_cli("requests", cwd=tmp_path)  # stdout is a pipe here
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["request_id"] for line in ws.journal_file.read_text().splitlines() if line.strip()]
    assert "…" not in done.stdout
    for request_id in set(ids):
        assert request_id in done.stdout
    rows = [line for line in done.stdout.splitlines() if "req-" in line]
    assert rows and all("forget" in row and "received" in row for row in rows) and max(map(len, rows)) > 80


def test_generated_files_are_git_ignored(tmp_path):
    root = copy_repo(tmp_path / "repo")
    paths = ["audit/report.html", ".lmeraser/prefect/state.json", ".lmeraser/prefect/prefect.db"]
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    done = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == paths
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""


def test_dvc_status_ignores_the_standing_server(standing_repo):
    """The server's files change while it runs; `dvc status` of the repository stays clean."""
    root, _ = standing_repo
    assert _state(root) is not None
    assert "up to date" in dvc("status", cwd=root).stdout.lower()
