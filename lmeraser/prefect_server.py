"""One standing Prefect API server per workspace, started on demand and shared by its processes.

Without `PREFECT_API_URL`, Prefect starts a temporary API server in every process that runs a
flow, and gives up when it does not answer within a fixed time: on a loaded machine every stage of
a `dvc repro`, every batch, paid that start-up and could fail on it. Instead, the first lmeraser
process that runs a flow starts one server for the workspace and every later one reuses it:

    .lmeraser/prefect/state.json   its URL and PID (git-ignored, like everything under .lmeraser/)
    .lmeraser/prefect/prefect.db   its database (PREFECT_HOME is .lmeraser/prefect)
    .lmeraser/prefect/server.log   what it printed
    .lmeraser/prefect/start.lock   held while one process checks, starts or stops it
    .lmeraser/prefect/users.lock   held shared by every process using it (never stopped under them)

The server runs detached, in its own session, with no terminal or pipe of its caller open, so no
caller (a pytest run, a CI step, `dvc repro`) waits for it. It stops by itself after
`LMERASER_PREFECT_IDLE_TIMEOUT` seconds (default 900; 0: never) with no request and no lmeraser
process using it, and on `lmeraser prefect stop`. A process that finds it dead or not answering
starts a new one. Start-up may take `LMERASER_PREFECT_START_TIMEOUT` seconds (default: 120 s times
the load per CPU core, at least 120 s). `PREFECT_API_URL` set by the user (environment or Prefect
profile) is used as it is and nothing is started; `LMERASER_PREFECT_SERVER=temporary` restores
Prefect's own temporary server per process (with the same scaled start-up timeout).

Stdlib only: it runs before Prefect is imported (Prefect reads its settings once, at import).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from lmeraser.errors import LmeraserError
from lmeraser.versioning import child_env

START_TIMEOUT_ENV = "LMERASER_PREFECT_START_TIMEOUT"
IDLE_TIMEOUT_ENV = "LMERASER_PREFECT_IDLE_TIMEOUT"
MODE_ENV = "LMERASER_PREFECT_SERVER"  # standing (default) | temporary
DEFAULT_IDLE_S = 900.0
BASE_START_S = 120.0
STATE_DIR = Path(".lmeraser") / "prefect"
_MARK = "lmeraser.prefect_server"  # in the server's command line: a PID is ours only if it shows this

_held: dict[str, object] = {}  # this process: the users.lock handle, the URL, whether it started the server


class PrefectServerError(LmeraserError):
    """The workspace's Prefect server could not be started or reached."""


def state_dir(root: Path) -> Path:
    return Path(root).resolve() / STATE_DIR


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise PrefectServerError(f"${env}={raw!r}: expected a number of seconds.") from None
    if not 0 <= value < 1e7:
        raise PrefectServerError(f"${env}={raw!r}: expected a number of seconds between 0 and 10000000.")
    return value


def start_timeout() -> float:
    """$LMERASER_PREFECT_START_TIMEOUT, or 120 s times the load per core (at least 120 s): a server
    on a machine twice as busy as it has cores gets twice as long."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    return _seconds(START_TIMEOUT_ENV, BASE_START_S * max(1.0, load))


def idle_timeout() -> float:
    return _seconds(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_S)


def user_api_url() -> str | None:
    """The API URL the user chose: $PREFECT_API_URL, or the active Prefect profile's (read without
    importing Prefect, which would freeze its settings before we set ours)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(profiles.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = data.get("profiles", {}).get(active, {})
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return url if isinstance(url, str) and url else None


# -- the state file and the server's process --------------------------------------------------


def read_state(root: Path) -> dict | None:
    try:
        state = json.loads((state_dir(root) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("pid"), int) and isinstance(state.get("url"), str)):
        return None
    if isinstance(state.get("root"), str) and Path(state["root"]) != Path(root).resolve():
        return None  # copied along with the workspace: it names the original's server, not this one's
    return state


def _write_state(root: Path, state: dict) -> None:
    path = state_dir(root) / "state.json"
    tmp = path.with_name(f".state.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_state(root: Path, pid: int | None = None) -> None:
    """Remove the state file (only if it still names `pid`, when given)."""
    state = read_state(root)
    if pid is None or (state is not None and state["pid"] == pid):
        with contextlib.suppress(FileNotFoundError):
            (state_dir(root) / "state.json").unlink()


def is_ours(pid: int) -> bool:
    """Whether `pid` is alive and is a server this module started (a reused PID is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc: alive is the best we can tell
    return _MARK.encode() in cmdline


def healthy(url: str, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, ValueError):
        return False


def _terminate(pid: int, wait_s: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it is still there after `wait_s`."""
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_ours(pid):
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child: reap it
            time.sleep(0.1)


@contextlib.contextmanager
def _locked(path: Path, kind: int, timeout: float, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held across the yield)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, kind | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise PrefectServerError(
                    f"{path}: {what} for {timeout:.0f} s; try again, or run `lmeraser prefect stop`."
                ) from None
            time.sleep(0.1)
    try:
        yield handle
    finally:
        handle.close()


def _use(root: Path, timeout: float):
    """Take users.lock shared for the rest of this process: the server does not stop under it. It
    waits while a server that decided to stop is stopping (it holds the lock exclusively)."""
    path = state_dir(root) / "users.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (kept open for the life of the process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise PrefectServerError(
                    f"{path}: the workspace's Prefect server did not finish stopping; run `lmeraser prefect stop`."
                ) from None
            time.sleep(0.1)


# -- what the CLI calls ------------------------------------------------------------------------


def refuse_another_workspace(root: Path) -> None:
    """Raise (one sentence) when this process already runs its flows on another workspace's
    server: Prefect reads its API URL once per process, so it cannot move to this one's."""
    if "url" in _held and Path(root).resolve() != _held["root"]:
        raise PrefectServerError(
            f"this process runs its flows on the Prefect server of {_held['root']}, not of {Path(root).resolve()}: "
            "run each workspace's commands in their own process, or set PREFECT_API_URL to one server for all."
        )


def ensure(root: Path, say=lambda message: None) -> str | None:
    """Make this process (and its children) use the workspace's standing Prefect server, starting
    it if needed; returns its API URL, or None when the user's URL or Prefect's temporary server
    is used. Call before Prefect is imported. A start that fails raises one sentence."""
    if "url" in _held:
        refuse_another_workspace(root)
        return _held["url"]  # type: ignore[return-value]
    if user_api_url():
        return None
    timeout = start_timeout()
    if os.environ.get(MODE_ENV, "standing") == "temporary":
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(int(timeout)))
        return None
    if os.environ.get(MODE_ENV, "standing") != "standing":
        raise PrefectServerError(f"${MODE_ENV}={os.environ[MODE_ENV]!r}: expected 'standing' or 'temporary'.")
    if "prefect.settings" in sys.modules:  # a programming error: too late to point Prefect anywhere
        raise PrefectServerError("Prefect was imported before its server was chosen; this is a bug in lmeraser.")
    root = Path(root).resolve()
    directory = state_dir(root)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        users = _use(root, timeout)
        url, started = _reuse(root) or _start_locked(root, timeout, say)
    except OSError as error:
        raise PrefectServerError(
            f"{directory}: cannot run the workspace's Prefect server there ({error.strerror or error})."
        ) from None
    _held.update(users=users, url=url, started=started, root=root)
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(int(timeout)))
    return url


def _reuse(root: Path) -> tuple[str, bool] | None:
    """The running server's URL if it answers now (no lock: the common, fast path)."""
    state = read_state(root)
    if state is not None and is_ours(state["pid"]) and healthy(state["url"], timeout=15.0):
        return state["url"], False
    return None


def _start_locked(root: Path, timeout: float, say) -> tuple[str, bool]:
    with _locked(
        state_dir(root) / "start.lock",
        fcntl.LOCK_EX,
        timeout + 60,
        "another process has been starting the Prefect server",
    ):
        state = read_state(root)  # someone may have started it while we waited for the lock
        if state is not None and is_ours(state["pid"]):
            # Alive but slow to answer (a loaded machine) is not dead: it gets the whole start-up
            # time before it is replaced, since others may be using it.
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if healthy(state["url"], timeout=30.0):
                    return state["url"], False
                time.sleep(1.0)
            say(f"the workspace's Prefect server (PID {state['pid']}) does not answer: restarting it")
            _terminate(state["pid"])
        _remove_state(root)
        return _start(root, timeout, say), True


def _start(root: Path, timeout: float, say) -> str:
    directory = state_dir(root)
    # The listening socket is made here and handed to the server: its port is known at once and
    # cannot be taken by anyone else while the server starts; early requests wait in its backlog.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    # Never the signing key or the API token (a caller of cli.run keeps them in its environment).
    env = {k: v for k, v in child_env().items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        PREFECT_HOME=str(directory),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")) if p
        ),
    )
    log = open(directory / "server.log", "ab")  # noqa: SIM115 (handed to the child)
    args = [
        sys.executable,
        "-m",
        _MARK,
        "serve",
        "--fd",
        str(sock.fileno()),
        "--root",
        str(root),
        "--idle",
        str(idle_timeout()),
    ]
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=[sock.fileno()],
            start_new_session=True,
            cwd=root,
        )
    finally:
        log.close()
        sock.close()
    _started.append(proc)  # never reaped here: it outlives this process
    _write_state(root, {"url": url, "pid": proc.pid, "started_at": time.time(), "root": str(root)})
    say(
        f"started the workspace's Prefect server at {url} (PID {proc.pid}; stops after {idle_timeout():.0f} s idle, "
        "or `lmeraser prefect stop`)"
    )
    try:
        return _wait_until_healthy(root, proc, url, timeout)
    except BaseException:  # a failed start, or this process interrupted (SIGTERM, Ctrl-C): none left behind
        _terminate(proc.pid)
        _remove_state(root, proc.pid)
        raise


def _wait_until_healthy(root: Path, proc: subprocess.Popen, url: str, timeout: float) -> str:
    directory = state_dir(root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _remove_state(root, proc.pid)
            raise PrefectServerError(
                f"the workspace's Prefect server exited at start-up (code {proc.returncode}): "
                f"see {directory / 'server.log'}, or start one yourself (`prefect server start`) "
                "and set PREFECT_API_URL."
            )
        if healthy(url, timeout=min(15.0, max(1.0, deadline - time.monotonic()))):
            return url
        time.sleep(0.2)
    raise PrefectServerError(
        f"the workspace's Prefect server did not answer within {timeout:g} s (the machine may be overloaded): "
        f"run the command again with a longer ${START_TIMEOUT_ENV} (seconds), or start one yourself "
        "(`prefect server start`) and set PREFECT_API_URL."
    )


_started: list[subprocess.Popen] = []


def release_on_exit() -> None:
    """At this process's exit, stop the server if this process started it and no other process
    uses it (for a long-running command, `lmeraser serve`: what it started ends with it)."""
    atexit.register(_release)


def _release() -> None:
    if not _held.get("started"):
        return
    users = _held.pop("users", None)
    if users is not None:
        users.close()  # our shared lock goes; exclusive succeeds only if nobody else holds one
    root: Path = _held["root"]  # type: ignore[assignment]
    try:
        with _locked(state_dir(root) / "users.lock", fcntl.LOCK_EX, 0.0, "in use"):
            stop(root)
    except PrefectServerError:
        pass  # another process uses it: it stops when idle


def stop(root: Path) -> int | None:
    """Stop the workspace's server; its PID, or None when none was running."""
    root = Path(root).resolve()
    if not state_dir(root).is_dir():
        return None
    with _locked(
        state_dir(root) / "start.lock", fcntl.LOCK_EX, 120.0, "another process has been starting the Prefect server"
    ):
        state = read_state(root)
        if state is None:
            return None
        pid = state["pid"]
        alive = is_ours(pid)
        if alive:
            _terminate(pid)
        _remove_state(root, pid)
        return pid if alive else None


def status(root: Path) -> dict:
    state = read_state(root)
    if state is None or not is_ours(state["pid"]):
        return {"running": False, "state_dir": str(state_dir(root))}
    return {
        "running": True,
        "url": state["url"],
        "pid": state["pid"],
        "healthy": healthy(state["url"]),
        "state_dir": str(state_dir(root)),
    }


# -- the server process -----------------------------------------------------------------------


class _Activity:
    """ASGI wrapper: when the last request started or ended, and how many are open."""

    def __init__(self, app):
        self.app, self.open, self.last = app, 0, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        self.last = time.monotonic()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()


def _watch_idle(server, activity: _Activity, root: Path, idle_s: float) -> None:
    """Stop the server once nothing used it for `idle_s`: no request, no lmeraser process holding
    users.lock. The exclusive lock taken then is kept until exit, so a process arriving meanwhile
    waits and starts a new server instead of using one that is going away."""
    users = open(state_dir(root) / "users.lock", "a+")  # noqa: SIM115 (kept until exit)
    period = max(0.2, min(5.0, idle_s / 4))
    while not server.should_exit:
        time.sleep(period)
        if activity.open or time.monotonic() - activity.last < idle_s:
            continue
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            activity.last = time.monotonic()  # in use: count from when it is released
            continue
        _remove_state(root, os.getpid())
        server.should_exit = True
        threading.Timer(60.0, os._exit, (0,)).start()  # a shutdown that hangs still ends
        return


def serve(fd: int, root: Path, idle_s: float) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    # The API Prefect's temporary server runs (no UI, no scheduling services), kept running.
    app = _Activity(create_app(ephemeral=True, final=True))
    sock = socket.socket(fileno=fd)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    if idle_s > 0:
        threading.Thread(target=_watch_idle, args=(server, app, root, idle_s), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        _remove_state(root, os.getpid())


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"python -m {_MARK}", description="the workspace's standing Prefect server (started by lmeraser)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve")
    run.add_argument("--fd", type=int, required=True)
    run.add_argument("--root", type=Path, required=True)
    run.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(argv)
    serve(args.fd, args.root, args.idle)


if __name__ == "__main__":
    main()
