"""DVC and git, through their command-line interfaces (the same commands a person would run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from lmeraser.errors import LmeraserError
from lmeraser.io import sha256_file


def _bin_path() -> str:
    # Stage commands call `lmeraser`; make sure the interpreter's bin directory comes first.
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": _bin_path()},
    )
    if check and done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit {done.returncode}"]
        raise LmeraserError(f"`dvc {' '.join(args)}` failed in {root}: {tail[0]}")
    return done


def data_md5(root: Path) -> str | None:
    path = root / "data.dvc"
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def file_sha256(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


def git_commit(root: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def remote_path(root: Path) -> Path | None:
    """The default DVC remote when it is a local directory (what the purge can reach)."""
    done = dvc(root, "remote", "default", check=False)
    name = done.stdout.strip()
    if done.returncode != 0 or not name:
        return None
    url = dvc(root, "remote", "list", check=False).stdout
    for line in url.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name and "://" not in parts[1]:
            path = Path(parts[1])
            return path if path.is_absolute() else (root / ".dvc" / path).resolve()
    return None
