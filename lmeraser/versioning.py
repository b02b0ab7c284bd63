"""DVC and git for a workspace: DVC through its Python API in this process (the same calls its
command line makes; a `dvc` process costs about half a second of imports each time), git through
its command line."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_write_bytes, sha256_file

# Secrets this process may hold; a child (dvc, git, a stage) never needs them.
SECRET_ENV = ("LMERASER_SIGNING_KEY", "LMERASER_API_TOKEN")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process, without secrets."""
    return {**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, **extra}


@contextmanager
def dvc_repo(root: Path) -> Iterator:
    """DVC's Python API on the workspace, quiet (its "Updating lock file" and "Removed N objects"
    lines; our log says what ran), run from the workspace's root: DVC resolves stage names and its
    stage cache's paths against the current directory, which need not be the workspace (a
    benchmark, a service started elsewhere), so it is changed for the duration and restored."""
    import logging
    from contextlib import chdir

    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    with chdir(Path(root).resolve()):
        repo = Repo(".")
        try:
            yield repo
        finally:
            repo.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # DVC colours its messages for a terminal


@contextmanager
def dvc_step(root: Path, command: str) -> Iterator[None]:
    """A DVC API call's failure as one sentence naming the command a person would run to see it."""
    try:
        yield
    except LmeraserError:
        raise
    except Exception as error:  # noqa: BLE001 - DVC, fsspec and remote clients raise their own kinds
        if error.__class__.__name__ == "LockError":  # dvc.lock.LockError: another DVC process is running here
            raise LmeraserError(
                f"`dvc {command}` failed in {root}: another DVC process holds the repository's lock "
                "(.dvc/tmp/lock); run the command again once it has finished."
            ) from None
        line = _ANSI.sub("", (str(error).strip().splitlines() or [error.__class__.__name__])[0])
        raise LmeraserError(f"`dvc {command}` failed in {root}: {line}") from None


def dvc_add(root: Path, target: str) -> None:
    """`dvc add TARGET`, in this process: the new version of TARGET into the cache and TARGET.dvc."""
    with dvc_step(root, f"add {target}"), dvc_repo(root) as repo:
        repo.add(target)


def data_md5(root: Path) -> str | None:
    path = root / "data.dvc"
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def file_sha256(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


def git_commit(root: Path) -> str:
    done = _git(root, "rev-parse", "HEAD")
    commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    # Changes to tracked files, except the audit trail itself (the journal receives each request
    # before its batch starts; the records extend the log): they are not the code or data version.
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)audit")
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def remotes(root: Path) -> dict[str, str]:
    """Every DVC remote of the project, from every config level DVC reads: name -> URL."""
    from dvc.config import Config

    # DVC's own merged configuration (system, global, repo, local), as `dvc config --list` reads it.
    with dvc_step(root, "config --list"):
        config = Config(dvc_dir=str(Path(root).resolve() / ".dvc")) if (Path(root) / ".dvc").is_dir() else {}
        return {name: str(conf["url"]) for name, conf in (config.get("remote") or {}).items() if "url" in conf}


def local_path(root: Path, url: str) -> Path | None:
    """A remote or artifact URL as a local directory, or None when it is not on this machine."""
    from urllib.parse import unquote, urlparse

    if url.startswith("file:"):
        return Path(unquote(urlparse(url).path))
    if len(urlparse(url).scheme) > 1:  # s3://, gs://, mlflow-artifacts:/, models:/ ...
        return None
    path = Path(url)
    return path if path.is_absolute() else (root / ".dvc" / path).resolve()


def cache_dir(root: Path) -> Path:
    """The DVC cache directory, as `dvc cache dir` prints it (cache.dir, else .dvc/cache)."""
    from dvc.config import Config

    dvc_dir = Path(root) / ".dvc"
    if not dvc_dir.is_dir():
        return dvc_dir / "cache"
    with dvc_step(root, "cache dir"):
        configured = Config(dvc_dir=str(dvc_dir.resolve())).get("cache", {}).get("dir")
    return Path(configured) if configured else dvc_dir / "cache"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=child_env())


def repair_dvc_rwlock(root: Path) -> list[str]:
    """Remove DVC's `.dvc/tmp/rwlock` if a killed dvc process left it torn; what was done.

    DVC rewrites that file in place (truncate, then write), so a SIGKILL in between leaves it empty
    or cut, and every later DVC command fails with RWLockFileCorruptedError. DVC drops the entries of
    dead processes itself; a torn file it cannot read, so it goes (DVC recreates it). The check
    holds DVC's own guard (`rwlock.lock`, an flock), so a live dvc process is never interfered with.
    """
    import fcntl
    import json

    tmp = Path(root) / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if not path.is_file():
        return []
    with open(tmp / "rwlock.lock", "a") as guard:
        try:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return []  # a live dvc process is editing it
        try:
            try:
                json.loads(path.read_bytes())
                return []
            except ValueError:  # empty, torn, not UTF-8
                path.unlink()
                return [f"removed DVC's torn lock file {path.relative_to(root)} (a killed dvc process was writing it)"]
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)


def repair_dvc_files(root: Path) -> list[str]:
    """Restore `dvc.lock` and the `*.dvc` files beside it from git HEAD where a killed process left
    them torn; what was done.

    DVC rewrites these YAML files in place (`dvc repro`/`dvc commit` the lock, `dvc add` the .dvc
    file), so a SIGKILL while it writes leaves a file no DVC command can read. The committed version
    is the last consistent one; with it back, the resumed step re-runs what changed since (`dvc add`,
    `dvc repro`) and records it again."""
    import yaml

    root = Path(root)
    done = []
    for path in [root / "dvc.lock", *sorted(root.glob("*.dvc"))]:
        if not path.is_file():
            continue
        try:
            if isinstance(yaml.safe_load(path.read_bytes()), dict):
                continue
        except (yaml.YAMLError, ValueError):
            pass
        committed = committed_bytes(root, path)
        if committed is None:
            continue  # nothing to restore from: DVC's own error will name the file
        atomic_write_bytes(path, committed)
        done.append(f"restored the torn {path.name} from git HEAD (a killed dvc process was writing it)")
    return done


def committed_bytes(root: Path, path: Path) -> bytes | None:
    """The bytes of `path` as committed at HEAD in the git repository at `root`; None when there
    is no repository or the file is not committed."""
    try:
        name = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    done = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=root, capture_output=True, env=child_env())
    return done.stdout if done.returncode == 0 else None


def commit_paths(root: Path, paths: list[Path], message: str) -> str | None:
    """Commit exactly `paths` (those that exist) in the git repository at `root`; the new commit
    id, or None when `root` is no git work tree or nothing in `paths` changed. Other staged or
    unstaged changes are left as they are."""
    if _git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        return None
    names = [str(p.relative_to(root)) for p in paths if p.exists()]
    # The .gitignore entries DVC wrote for the outputs it recorded (with core.autostage they are
    # already staged): part of the same version, and leaving them out would leave the tree dirty.
    staged = _git(root, "diff", "--cached", "--name-only").stdout.split()
    names += [name for name in staged if Path(name).name == ".gitignore" and name not in names]
    if not names:
        return None
    added = _git(root, "add", "--", *names)
    if added.returncode != 0:
        raise LmeraserError(f"`git add` failed in {root}: {(added.stderr.strip().splitlines() or ['?'])[-1]}")
    if _git(root, "diff", "--cached", "--quiet", "--", *names).returncode == 0:
        return None
    # The repository's own identity if it has one; else name the tool as the author.
    identity = (
        []
        if _git(root, "config", "user.email").stdout.strip()
        else ["-c", "user.name=lmeraser", "-c", "user.email=lmeraser@localhost"]
    )
    done = _git(root, *identity, "commit", "-q", "-m", message, "--", *names)
    if done.returncode != 0:
        raise LmeraserError(f"`git commit` failed in {root}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return _git(root, "rev-parse", "HEAD").stdout.strip()
