"""Atomic writes, their crash recovery, and content hashing.

Every file the pipeline produces goes through here, so a crash leaves either the old file or
the new one, never a torn one. Temporary names carry the writer's PID (`.NAME.<pid>.*.tmp`,
`.NAME.<pid>.*.staging`, `.NAME.<pid>.new`, `.NAME.<pid>.old`), so whatever a killed writer
left behind can be told from a live writer's work and finished or removed on the next run
(`recover_directory`, `remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmeraser.errors import KERNEL_TREES, LmeraserError, shown
from lmeraser.failpoints import failpoint


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_identity(st: os.stat_result) -> list[int]:
    """A file's identity as the scan index and the validation summary keep it: device, inode,
    size, mtime and ctime (nanoseconds). A write changes its ctime, which no user-space call can
    set back, so a kept hash of a file whose identity is unchanged still holds.

    Args:
        st: the file's `os.stat` result, taken before the file is read.
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and no whitespace: the byte form we hash and sign."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    `mode` (for secrets: 0o600) is the file's mode from its first byte on."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; ordinary outputs get the usual umask-derived mode, secrets theirs.
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        failpoint(f"atomic:{target.name}")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def npy_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy file's header declares, read without decoding any data;
    ValueError when the bytes are no .npy file (versions 1.0 and 2.0)."""
    import io

    buffer = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in ((1, 0), (2, 0)):
            raise ValueError
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(buffer)
    except (ValueError, EOFError, SyntaxError, TypeError):
        raise ValueError("not a .npy file") from None
    return tuple(shape), dtype


class MissingFile(LmeraserError):
    """A file read by `read_trusted` does not exist (callers decide whether that is an error)."""


_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symbolic link"),
)
_LINK = "is a symbolic link, and a trust anchor is read only as a regular file (replace the link with the file itself)"


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def read_trusted(path: str | Path, what: str, limit: int, *, secret: bool = False, follow_links: bool = False) -> bytes:
    """The bytes of a file the product trusts (the pinned signer, the signed head, the salt, the
    signing key, the lineage log), refused in one sentence unless it is a regular file of at most
    `limit` bytes. It is never read through a symbolic link (unless `follow_links`, for a path the
    user named), opened without blocking (a FIFO cannot hang the reader, a device is never read)
    and checked on the open descriptor, so it cannot be swapped between the check and the read.
    With `secret`, a file that its group or others can read is refused too. A missing file raises
    MissingFile."""
    path = Path(path)
    where = shown(path, 200)
    try:
        resolved = path.resolve() if follow_links else path.absolute()
    except (OSError, RuntimeError):
        resolved = path
    if any(resolved == tree or tree in resolved.parents for tree in KERNEL_TREES):
        raise LmeraserError(f"{where}: the {what} is a kernel file (under /proc, /sys or /dev), not a regular file.")
    try:
        before = os.stat(path, follow_symlinks=follow_links)
    except FileNotFoundError:
        raise MissingFile(f"{where}: the {what} is missing.") from None
    except OSError as error:
        raise LmeraserError(f"{where}: the {what} cannot be read ({error.strerror}).") from None
    if stat.S_ISLNK(before.st_mode):
        raise LmeraserError(f"{where}: the {what} {_LINK}.")
    if not stat.S_ISREG(before.st_mode):
        raise LmeraserError(f"{where}: the {what} is not a regular file (a {_kind(before.st_mode)}).")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MissingFile(f"{where}: the {what} is missing.") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LmeraserError(f"{where}: the {what} {_LINK}.") from None
        raise LmeraserError(f"{where}: the {what} cannot be read ({error.strerror}).") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise LmeraserError(f"{where}: the {what} was replaced while it was read; run the command again.")
        if secret and opened.st_mode & 0o077:
            mode = stat.S_IMODE(opened.st_mode)
            raise LmeraserError(f"{where}: the {what} is readable by others (mode {mode:o}); run `chmod 600 {where}`.")
        if opened.st_size > limit:
            raise LmeraserError(f"{where}: the {what} is {opened.st_size} bytes, over the limit of {limit}.")
        chunks, size = [], 0
        while size <= limit:
            block = os.read(fd, limit + 1 - size)
            if not block:
                break
            chunks.append(block)
            size += len(block)
    except BlockingIOError:
        raise LmeraserError(f"{where}: the {what} could not be read without blocking (not a regular file).") from None
    except OSError as error:
        raise LmeraserError(
            f"{where}: the {what} cannot be read ({error.strerror or error.__class__.__name__})."
        ) from None
    finally:
        os.close(fd)
    if size > limit:
        raise LmeraserError(f"{where}: the {what} is over the limit of {limit} bytes.")
    return b"".join(chunks)


def read_secret(path: Path, what: str, limit: int = 64 << 10) -> bytes:
    """A secret file's bytes (an API token), refused unless it is a regular file of at most
    `limit` bytes no one but its owner can read; a link is followed (secret mounts use them), a
    FIFO or device never blocks or is read. Trust anchors use read_trusted, which follows none."""
    return read_trusted(path, what, limit, secret=True, follow_links=True)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray, mode: int | None = None) -> None:
    # np.save is byte-deterministic (unlike np.savez, whose zip entries carry timestamps).
    with atomic_path(path, mode) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def read_input_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """A user-supplied file, read once and refused unless it is a regular file of at most `limit`
    bytes: a directory, FIFO or device (which could block forever), or a kernel file under /proc,
    /sys or /dev (which may claim size 0 and fail or never end), is named and refused."""
    path = Path(path)
    where = shown(path, 200)
    try:
        if not path.exists():
            raise LmeraserError(f"{where}: {what} not found.")
        if not path.is_file():
            raise LmeraserError(f"{where}: {what} is not a regular file (a directory, FIFO or device).")
        resolved = path.resolve()
        if any(resolved == tree or tree in resolved.parents for tree in KERNEL_TREES):
            raise LmeraserError(f"{where}: {what} is a kernel file (under /proc, /sys or /dev), not a regular file.")
        size = path.stat().st_size
        if size > limit:
            raise LmeraserError(f"{where}: {what} is {size} bytes, over the limit of {limit}.")
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise LmeraserError(f"{where}: {what} cannot be read ({error.strerror or error.__class__.__name__}).") from None
    if len(data) > limit:
        raise LmeraserError(f"{where}: {what} is over the limit of {limit} bytes.")
    return data


def read_input_text(path: str | Path, what: str, limit: int) -> str:
    try:
        return read_input_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as error:
        raise LmeraserError(f"{shown(path, 200)}: {what} is not UTF-8 text (byte {error.start}).") from None


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in only if the block succeeds.

    Once the block succeeds the new directory is renamed complete (`.NAME.<pid>.new`), then the
    old one is moved aside (`.NAME.<pid>.old`), the new one into place, and the old one deleted.
    Killed at any point, `recover_directory` rolls forward (a complete new directory exists) or
    back (only the old one does): the directory is never lost.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{pid}.", suffix=".staging", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        new, old = _aside(target, pid, "new"), _aside(target, pid, "old")
        os.replace(staging, new)
        _fsync_dir(target.parent)
        failpoint("directory:staged")
        _swap_in(target, new, old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _aside(target: Path, pid: int, kind: str) -> Path:
    return target.with_name(f".{target.name}.{pid}.{kind}")


def _swap_in(target: Path, new: Path, old: Path) -> None:
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    failpoint("directory:swapped-out")
    os.replace(new, target)
    _fsync_dir(target.parent)
    failpoint("directory:swapped-in")
    if old.exists():
        shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _writer_gone(pid: str) -> bool:
    """Whether the PID written into a temporary name is no running process (or is us: a PID reused
    after a restart, as in containers, where we have written nothing yet)."""
    if not pid.isdigit():
        return False  # not a name of ours
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_directory(path: str | Path) -> list[str]:
    """Finish or undo what killed writers of `path` (an atomic_directory) left; what was done.

    A complete new directory rolls forward; a moved-aside old one with no new one rolls back (or
    is deleted once the new one is in place); an unfinished staging directory is deleted."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    done = []
    leftovers = sorted(
        p for p in target.parent.glob(f"{glob_escape(prefix)}*") if _writer_gone(p.name[len(prefix) :].split(".", 1)[0])
    )
    for path in [p for p in leftovers if p.name.endswith(".staging")]:
        shutil.rmtree(path)
        done.append(f"removed unfinished {path.name}")
    for new in [p for p in leftovers if p.name.endswith(".new")]:
        _swap_in(target, new, new.with_name(new.name.removesuffix(".new") + ".old"))
        done.append(f"rolled {target.name} forward to the complete {new.name}")
    for old in [p for p in leftovers if p.name.endswith(".old") and p.exists()]:
        if target.exists():
            shutil.rmtree(old)
            done.append(f"removed the replaced {old.name}")
        else:
            os.replace(old, target)
            done.append(f"rolled {target.name} back from {old.name}")
    return done


def remove_stale_temp_files(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of atomic writes whose writer is gone; the paths removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp"):
        parts = path.name.split(".")  # "", NAME..., PID, RANDOM, "tmp"
        if len(parts) >= 5 and _writer_gone(parts[-3]) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def atomic_write_csv(path: str | Path, frame) -> None:
    """A pandas DataFrame as CSV with '\\n' line ends (byte-identical across platforms)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
