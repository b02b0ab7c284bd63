"""A scratch git + DVC copy of this repository with the digits demo built in it, for the
benchmarks that load, kill or attack a real workspace (bench/results/work-NAME/repo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """A command to completion; with `check`, a failure stops the benchmark showing its output."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env or os.environ.copy(), timeout=3600)
    if check and done.returncode != 0:
        raise SystemExit(
            f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return done


def bench_env(**extra: str) -> dict:
    """The environment the benchmarks run commands in: this venv first, no analytics."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        **extra,
    }


def work_root(name: str) -> Path:
    """Where `build_demo(name, ...)` builds its copy."""
    return ROOT / "bench" / "results" / f"work-{name}" / "repo"


def build_demo(
    name: str,
    env: dict,
    params: Path | None = None,
    edit: Callable[[dict], None] | None = None,
    source: str | None = None,
    code_from: Path | None = None,
) -> Path:
    """A fresh copy at bench/results/work-NAME/repo with `params` (default: params.yaml), changed
    by `edit` if given, after `lmeraser data init` (`--source` if given) and `dvc repro`; its root.
    `code_from`: a folder whose lmeraser/ replaces the repository's in the copy (copies
    that must run the same code while the repository is being edited)."""
    import yaml

    import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
    from helpers import copy_repo

    work = work_root(name)
    shutil.rmtree(work.parent, ignore_errors=True)
    copy_repo(work)
    if code_from is not None:
        for package in ("lmeraser",):
            shutil.rmtree(work / package)
            shutil.copytree(code_from / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    if params:
        shutil.copy2(params, work / "params.yaml")
    if edit is not None:
        values = yaml.safe_load((work / "params.yaml").read_text())
        edit(values)
        (work / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run([str(BIN / "lmeraser"), "data", "init", *(["--source", source] if source else [])], work, env)
    t0 = time.perf_counter()
    run([str(BIN / "dvc"), "repro"], work, env)
    print(f"demo built (dvc repro {time.perf_counter() - t0:.0f}s)", flush=True)
    return work
