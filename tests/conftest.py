"""Shared fixtures: one Prefect server per test run, tiny parameters, a trained workspace, and an
end-to-end repository built once per run and copied per module; the order in which xdist hands
out the modules; the helpers they use are in helpers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import pytest

from lmeraser.config import parse_params

from helpers import (
    BIN,
    TINY,
    build_workspace,
    clone_repo,
    commit_all,
    copy_repo,
    dvc,
    free_port,
    lmeraser_warm,
    run_stages,
    shared_build,
)

# The modules that take longest (measured: seconds of one xdist worker on the 2-core machine),
# longest first: with --no-loadscope-reorder (pyproject's addopts), pytest-xdist's --dist loadfile hands
# out modules in collection order, so the long ones start first and the short ones fill the
# gaps, instead of one long module running alone at the end. (Without it, xdist orders modules by
# their number of tests, which puts these, with few long tests each, last.) test_e2e builds the
# shared TINY template while the other workers run modules that build their own workspaces
# (forgetting_e2e, large_models, numerics, flows); test_under_load and the modules after it copy
# the template, which is ready by then instead of being waited for.
LONGEST_FIRST = (
    "test_forgetting_e2e.py",  # 172
    "test_e2e.py",  # 345, builds the template
    "test_large_models.py",  # 46, its own build
    "test_numerics.py",  # 172, its own workspaces: no wait on the template
    "test_flows.py",  # 105, likewise
    "test_under_load.py",  # 329
    "test_honest_records.py",  # 187
    "test_production_stores.py",  # 154
)


def pytest_collection_modifyitems(config, items):
    """Longest modules first (LONGEST_FIRST), the rest in their usual order; the order of the
    tests inside a module is never changed (some modules' tests build on each other's state)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_SERVER: dict = {}
# The test server's loops that schedule, reschedule or expire runs of deployments: the tests run
# flows directly and never deploy one (idle, the server used 1.5 s of CPU a minute with them, 1.0
# without, on the 2-core machine). Events and task runs are still recorded.
IDLE_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "REPOSSESSOR",
    "PAUSE_EXPIRATIONS",
    "CANCELLATION_CLEANUP",
    "CLEANUP_RECONCILER",
    "TRIGGERS",
)


def pytest_configure(config):
    """Keep Prefect's database and every analytics call inside the test run, and run one real
    Prefect server on loopback for the whole run (as production would), instead of a temporary
    server per CLI process. Started by the controller before pytest-xdist spawns its workers,
    which inherit its environment: one server for the run, not one per worker (each cost ~12 s of
    CPU to start and ~1 s a minute idle on the 2-core machine)."""
    import tempfile
    import time
    import urllib.request

    if hasattr(config, "workerinput"):  # an xdist worker: the controller's server is in its environment
        return
    home = Path(tempfile.mkdtemp(prefix="lmeraser-tests-prefect-"))
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "GX_ANALYTICS_ENABLED": "false",
            "TQDM_DISABLE": "1",
        }
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    port = free_port()
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in IDLE_SERVICES}},
    )
    _SERVER.update(process=server, log=log, home=home)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                _stop_server(keep_log=True)
                raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}") from None
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url


def pytest_unconfigure(config):
    _stop_server()


def _stop_server(keep_log: bool = False) -> None:
    """Stop the run's Prefect server and remove its home (kept, with its log, when it failed to start)."""
    import shutil

    if not _SERVER:
        return
    try:
        os.killpg(_SERVER["process"].pid, 15)
    except ProcessLookupError:  # it exited by itself (a failed start)
        pass
    _SERVER["process"].wait(timeout=30)
    _SERVER["log"].close()
    os.environ.pop("PREFECT_API_URL", None)
    if not keep_log:
        shutil.rmtree(_SERVER["home"], ignore_errors=True)
    _SERVER.clear()


@pytest.fixture(autouse=True, scope="session")
def _deliver_flow_logs():
    """Flows run in this process send their logs to the server: deliver them before it stops."""
    yield
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


@pytest.fixture
def tiny_params():
    return parse_params(TINY)


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory):
    """A workspace where every stage has run once with TINY params (library calls, no Prefect)."""
    root = tmp_path_factory.mktemp("trained")
    ws = build_workspace(root, TINY)
    results = run_stages(parse_params(TINY), ws)
    return ws, results


@pytest.fixture(scope="session")
def tiny_repo_template(tmp_path_factory):
    """A git + DVC copy of this repository with TINY params after `lmeraser data init`, a full
    `dvc repro` (Prefect flows, MLflow, GX, FAISS, timm) and a commit: built once per test run;
    each module that needs one works on its own copy (`repo`, and test_honest_records' `root`).
    The demo's own parameters are rebuilt from scratch by `make reproduce` in CI."""

    def build(dest: Path) -> str:
        root = copy_repo(dest, TINY)
        lmeraser_warm("data", "init", cwd=root, check=True)
        first = dvc("repro", cwd=root)
        commit_all(root, "pipeline run")
        return first.stdout

    return shared_build(tmp_path_factory, "tiny-template", build)


@pytest.fixture(scope="module")
def repo(tiny_repo_template, tmp_path_factory):
    """This module's own copy of the TINY repository after `dvc repro` (its output as second item)."""
    template, output = tiny_repo_template
    return clone_repo(template, tmp_path_factory.mktemp("e2e") / "repo"), output
