"""Shared fixtures: one Prefect server per session, tiny parameters, a trained workspace and an
end-to-end repository per module; the helpers they use are in helpers.py."""

from __future__ import annotations

import os
import subprocess

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import pytest

from lmeraser.config import parse_params

from helpers import BIN, TINY, build_workspace, clone_repo, commit_all, copy_repo, dvc, free_port, lmeraser_cli, run_stages


@pytest.fixture(autouse=True, scope="session")
def _isolated_services(tmp_path_factory):
    """Keep Prefect's database and every analytics call inside the test run, and run one real
    Prefect server on loopback for the session (as production would), instead of a temporary
    server per CLI process."""
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
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
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}") from None
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    yield
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # flows run in this process send their logs to the server: deliver them first
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()
    os.environ.pop("PREFECT_API_URL", None)


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
    `dvc repro` (Prefect flows, MLflow, GX, FAISS, timm) and a commit: built once per session;
    each module that needs one works on its own copy (`repo`, and test_honest_records' `root`).
    The demo's own parameters are rebuilt from scratch by `make reproduce` in CI."""
    root = copy_repo(tmp_path_factory.mktemp("tiny-template") / "repo", TINY)
    lmeraser_cli("data", "init", cwd=root, check=True)
    first = dvc("repro", cwd=root)
    commit_all(root, "pipeline run")
    return root, first.stdout


@pytest.fixture(scope="module")
def repo(tiny_repo_template, tmp_path_factory):
    """This module's own copy of the TINY repository after `dvc repro` (its output as second item)."""
    template, output = tiny_repo_template
    return clone_repo(template, tmp_path_factory.mktemp("e2e") / "repo"), output
