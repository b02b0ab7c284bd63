"""Hostile and broken input: every case must be refused with one clear sentence, a non-zero exit,
no traceback, nothing echoed raw to the terminal, and not one byte changed in data/ or audit/.

    python bench/reliability_inputs.py            # builds a tiny trained workspace, runs every case

Each case runs the real CLI in this process (typer's runner; a FIFO or device that would block
is caught by a 30 s alarm and counted as a hang). tests/test_hostile_inputs.py runs the same cases.
Saves bench/results/reliability-inputs.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import cpu_model  # noqa: E402

MAX_OUTPUT = 1500  # characters: one sentence, not a traceback or an echoed 10 MB id


@dataclass
class Case:
    name: str
    args: Callable[[Path, Path], list[str]]  # (workspace root, scratch dir) -> CLI arguments
    setup: Callable[[Path, Path], None] | None = None  # breaks the workspace before the run
    subprocess: bool = False  # run `lmeraser` as its own process (commands that start a Prefect flow)
    bench_only: bool = False  # left out of tests/test_hostile_inputs.py (another case there covers it)


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _fifo(path: Path) -> Path:
    if not path.exists():
        os.mkfifo(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def _npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    """A valid .npy v1.0 header for `shape` with no data after it (claims whatever it likes)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _png(width: int, height: int, body: bytes | None = None) -> bytes:
    """A grayscale PNG; with `body` None its IDAT holds real zero rows, else `body` (e.g. nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height))) if body is None else body
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _rgb_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _private_id(root: Path) -> str:
    return (root / "data" / "private" / "manifest.csv").read_text().splitlines()[1].split(",")[0]


def _first(root: Path, split: str) -> str:
    return (root / "data" / split / "manifest.csv").read_text().splitlines()[1].split(",")[0]


def _requests(scratch: Path, name: str, *lines: str) -> Path:
    return _write(scratch / name, "\n".join(lines) + "\n")


def _forget_file(name: str, *lines: str) -> Callable:
    return lambda root, s: ["forget", "--root", str(root), "--no-process", "--file", str(_requests(s, name, *lines))]


def _rectify_input(make: Callable[[Path], Path]) -> Callable:
    return lambda root, s: ["rectify", "--root", str(root), "--no-process", "--sample-id", _private_id(root), "--input", str(make(s))]


def _forget(*extra: str) -> Callable:
    return lambda root, s: ["forget", "--root", str(root), "--no-process", *extra]


def _rectify(*extra: str) -> Callable:
    return lambda root, s: ["rectify", "--root", str(root), "--no-process", "--sample-id", _private_id(root), *extra]


def _params(make: Callable[[Path], Path]) -> Callable:
    return lambda root, s: ["forget", "--root", str(root), "--no-process", "--sample-id", _private_id(root), "--params", str(make(s))]


def _break_params(data: bytes) -> Callable:
    return lambda root, s: _write(root / "params.yaml", data) and None


CASES: list[Case] = [
    # forget: ids
    Case("unknown sample id", _forget("--sample-id", "no-such-id")),
    Case("10 MB sample id", _forget("--sample-id", "x" * 10_000_000)),
    Case("terminal escape in an id", _forget("--sample-id", "\x1b[2J\x1b[31mgotcha")),
    Case("rich markup in an id", _forget("--sample-id", "[bold red]not markup[/]")),
    Case("NUL byte in an id", _forget("--sample-id", "a\x00b")),
    Case("test-split sample", lambda root, s: _forget("--sample-id", _first(root, "test"))(root, s)),
    Case("public sample without --allow-backbone-rebuild", lambda root, s: _forget("--sample-id", _first(root, "public"))(root, s)),
    Case("unknown subject", _forget("--subject", "nobody")),
    Case("nothing named", _forget()),
    Case("unknown --method", _forget("--sample-id", "x", "--method", "magic")),
    Case(
        "influence with a public sample",
        lambda root, s: _forget("--sample-id", _first(root, "public"), "--allow-backbone-rebuild", "--method", "influence")(root, s),
    ),
    # forget --file
    Case("--file is a directory", lambda root, s: _forget("--file", str(s))(root, s)),
    Case("--file missing", _forget("--file", "/nonexistent/requests.jsonl")),
    Case("--file not UTF-8", lambda root, s: _forget("--file", str(_write(s / "latin1.jsonl", b'{"sample_ids": ["\xe9"]}\n')))(root, s)),
    Case("--file is a FIFO", lambda root, s: _forget("--file", str(_fifo(s / "requests.fifo")))(root, s)),
    Case("--file is a device", _forget("--file", "/dev/zero")),
    Case("--file over 16 MiB", lambda root, s: _forget("--file", str(_sparse(s / "huge.jsonl", (16 << 20) + 1)))(root, s)),
    Case("--file empty", lambda root, s: _forget("--file", str(_write(s / "empty.jsonl", b"")))(root, s)),
    Case(
        "--file bad JSON",
        _forget_file("bad.jsonl", '{"sample_ids": ["a"'),
    ),
    Case("--file 5000-digit number", _forget_file("digits.jsonl", '{"kind": "forget", "sample_ids": ["a"], "label": ' + "9" * 5000 + "}")),
    Case("--file 100,000-deep nesting", _forget_file("deep.jsonl", "[" * 100_000 + "]" * 100_000)),
    Case("--file 30,000-deep nesting (under the line limit)", _forget_file("deep2.jsonl", "[" * 30_000 + "]" * 30_000)),
    Case("--file line over 64 KiB", _forget_file("long.jsonl", '{"sample_ids": ["' + "a" * 70_000 + '"]}')),
    Case(
        "--file grants allow_backbone_rebuild",
        lambda root, s: _forget_file("grant.jsonl", json.dumps({"sample_ids": [_first(root, "public")], "allow_backbone_rebuild": True}))(root, s),
    ),
    Case(
        "--file holds a rectify line",
        lambda root, s: _forget_file("rect.jsonl", json.dumps({"kind": "rectify", "sample_ids": [_private_id(root)], "label": 1}))(root, s),
    ),
    Case("--file unknown key", _forget_file("key.jsonl", '{"sample_ids": ["a"], "because": "x"}')),
    Case("--file line is a list", _forget_file("list.jsonl", '["a", "b"]')),
    Case("--file sample_ids not a list", _forget_file("str.jsonl", '{"sample_ids": "abc"}')),
    Case(
        "--file one bad line of three",
        lambda root, s: _forget_file("mixed.jsonl", json.dumps({"sample_ids": [_private_id(root)]}), "{oops", json.dumps({"sample_ids": [_private_id(root)]}))(
            root, s
        ),
    ),
    Case("--file id with a control character", _forget_file("ctl.jsonl", json.dumps({"sample_ids": ["a\u0007b"]}))),
    Case("--file 257-character id", _forget_file("id257.jsonl", json.dumps({"sample_ids": ["a" * 257]}))),
    # params
    Case("--params binary", _params(lambda s: _write(s / "p.yaml", bytes(range(256))))),
    Case("--params directory", _params(lambda s: s)),
    Case("--params missing", _params(lambda s: s / "missing.yaml")),
    Case("--params FIFO", _params(lambda s: _fifo(s / "p.fifo"))),
    Case("--params unknown key", _params(lambda s: _write(s / "k.yaml", "backbone:\n  depthh: 3\n"))),
    Case("--params out of range", _params(lambda s: _write(s / "r.yaml", "clustering:\n  min_clusters: -4\n"))),
    Case(
        "--params YAML bomb",
        _params(
            lambda s: _write(
                s / "b.yaml",
                "a: &a ["
                + ",".join(["x"] * 10)
                + "]\n"
                + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
            )
        ),
    ),
    Case("params.yaml binary (forget)", lambda root, s: _forget("--sample-id", _private_id(root))(root, s), _break_params(bytes(range(256)) * 4)),
    Case(
        "params.yaml invalid (forget --process)",
        lambda root, s: ["forget", "--root", str(root), "--sample-id", _private_id(root)],
        _break_params(b"seed: many\n"),
    ),
    Case(
        "params.yaml invalid (influence)",
        lambda root, s: ["forget", "--root", str(root), "--sample-id", _private_id(root), "--method", "influence"],
        _break_params(b"seed: many\n"),
    ),
    Case("--root missing", lambda root, s: ["forget", "--root", "/nonexistent/ws", "--no-process", "--sample-id", "a"]),
    # rectify
    Case("--label 5000 digits", _rectify("--label", "9" * 5000)),
    Case("--label -1", _rectify("--label", "-1")),
    Case("--label outside the classes", _rectify("--label", "10")),
    Case("--label and --input", lambda root, s: _rectify("--label", "1", "--input", str(s / "x.npy"))(root, s)),
    Case("neither --label nor --input", _rectify()),
    Case("rectify without --sample-id", lambda root, s: ["rectify", "--root", str(root), "--label", "1"]),
    Case(
        "rectify --file with a forget line",
        lambda root, s: ["rectify", "--root", str(root), "--file", str(_requests(s, "f.jsonl", json.dumps({"sample_ids": [_private_id(root)]})))],
    ),
    Case("rectify --file and --sample-id", lambda root, s: ["rectify", "--root", str(root), "--sample-id", "a", "--file", str(_requests(s, "g.jsonl", "{}"))]),
    Case("rectify a forgotten-looking unknown id", lambda root, s: ["rectify", "--root", str(root), "--sample-id", "ghost", "--label", "1"]),
    Case("--input missing", _rectify_input(lambda s: s / "missing.npy")),
    Case("--input directory", _rectify_input(lambda s: s)),
    Case("--input FIFO", _rectify_input(lambda s: _fifo(s / "image.npy"))),
    Case("--input device", _rectify_input(lambda s: Path("/dev/zero"))),
    Case("--input empty .npy", _rectify_input(lambda s: _write(s / "empty.npy", b""))),
    Case("--input text named .npy", _rectify_input(lambda s: _write(s / "text.npy", "just text"))),
    # An object-dtype header followed by pickle bytes (written by hand: nothing here pickles anything).
    Case("--input pickled object array", _rectify_input(lambda s: _write(s / "obj.npy", _npy_header((8, 8), "|O") + b"\x80\x04N."))),
    Case("--input header claims 10^12 elements", _rectify_input(lambda s: _write(s / "claims.npy", _npy_header((1_000_000, 1_000_000))))),
    Case("--input header has the right shape, data truncated", _rectify_input(lambda s: _write(s / "trunc.npy", _npy_header((8, 8)) + b"\x00" * 10))),
    Case("--input wrong shape", _rectify_input(lambda s: _np_save(s / "shape.npy", np.zeros((9, 9), np.uint8)))),
    Case("--input float pixels", _rectify_input(lambda s: _np_save(s / "float.npy", np.zeros((8, 8), np.float32)))),
    Case("--input pixels over 255", _rectify_input(lambda s: _np_save(s / "big.npy", np.full((8, 8), 300, np.int16)))),
    Case("--input over 16 MiB", _rectify_input(lambda s: _sparse(s / "huge.npy", (16 << 20) + 1))),
    Case("--input PNG decompression bomb", _rectify_input(lambda s: _write(s / "bomb.png", _png(60_000, 60_000, body=b"")))),
    Case("--input PNG wrong size", _rectify_input(lambda s: _write(s / "wrong.png", _png(9, 9)))),
    Case("--input RGB PNG for grey data", _rectify_input(lambda s: _write(s / "rgb.png", _rgb_png(8, 8)))),
    Case("--input PNG truncated", _rectify_input(lambda s: _write(s / "cut.png", _png(8, 8)[:40]))),
    Case("--input not an image", _rectify_input(lambda s: _write(s / "noise.png", os.urandom(300)))),
    # audit
    Case("verify --pubkey directory", lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(s)]),
    Case("verify --pubkey not PEM", lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_write(s / "k.pem", "hello"))]),
    Case("verify --pubkey FIFO", lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_fifo(s / "k.fifo"))]),
    Case("verify --pubkey binary", lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_write(s / "k.bin", os.urandom(200)))]),
    Case("verify without records or pin", lambda root, s: ["audit", "verify", "--root", str(root)]),
    Case(
        "verify a garbage log",
        lambda root, s: ["audit", "verify", "--root", str(root)],
        lambda root, s: _write(root / "audit" / "lineage.jsonl", b"\xff\xfe garbage\n") and None,
    ),
    Case(
        "show a garbage log",
        lambda root, s: ["audit", "show", "--root", str(root)],
        lambda root, s: _write(root / "audit" / "lineage.jsonl", b'{"payload": "!!"}\n') and None,
    ),
    Case("show record 99", lambda root, s: ["audit", "show", "99", "--root", str(root)]),
    Case("replay record 0", lambda root, s: ["audit", "replay", "--record", "0", "--root", str(root)]),
    Case("export-key --out directory", lambda root, s: ["audit", "export-key", "--root", str(root), "--out", str(s)]),
    Case("report --out directory", lambda root, s: ["audit", "report", "--root", str(root), "--out", str(s)]),
    Case(
        "export-key with the configured key file missing",
        lambda root, s: ["audit", "export-key", "--root", str(root)],
        lambda root, s: os.environ.__setitem__("LMERASER_SIGNING_KEY_FILE", str(s / "vault" / "k.pem")),
    ),
    # broken state
    Case(
        "forget with a garbage journal",
        _forget("--sample-id", "a"),
        lambda root, s: _write(root / "audit" / "journal.jsonl", b'{"request_id": 1}\n\xff\n') and None,
    ),
    Case(
        "unlearn with a garbage journal",
        lambda root, s: ["unlearn", "--root", str(root)],
        lambda root, s: _write(root / "audit" / "journal.jsonl", b"not json\n") and None,
        True,
    ),
    Case(
        "unlearn with a garbage batch state",
        lambda root, s: ["unlearn", "--root", str(root)],
        lambda root, s: _write(root / "audit" / "batches" / "batch-0.json", b"[1, 2") and None,
        True,
    ),
    Case("verify a garbage log against the pinned signer", lambda root, s: ["audit", "verify", "--root", str(root)], lambda root, s: _pinned_garbage(root)),
    # other commands
    Case("stage with an unknown name", lambda root, s: ["stage", "nope", "--root", str(root)]),
    Case("data init with an unknown source", lambda root, s: ["data", "init", "--root", str(root), "--source", "imagenet", "--no-dvc"]),
    Case("data init from a missing IDX directory", lambda root, s: ["data", "init", "--root", str(root), "--source", "idx:/nonexistent", "--no-dvc"]),
    Case("data init from a device as npz", lambda root, s: ["data", "init", "--root", str(root), "--source", "npz:/dev/zero", "--no-dvc"]),
    Case("data init from a directory as npz", lambda root, s: ["data", "init", "--root", str(root), "--source", f"npz:{s}", "--no-dvc"]),
]


def _pinned_garbage(root: Path) -> None:
    from lmeraser.lineage.records import signing_key
    from lmeraser.workspace import Workspace

    signing_key(Workspace(root))  # makes and pins the key, as the first record would
    _write(root / "audit" / "lineage.jsonl", b'{"payloadType": "application/vnd.in-toto+json", "payload": "\xff\xfe", "signatures": []}\n')


def _np_save(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return path


def state_digest(root: Path) -> str:
    """Every byte under data/ and audit/ and of params.yaml (advisory lock files aside)."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "data").rglob("*"), *(root / "audit").rglob("*"), root / "params.yaml"]):
        if path.is_file() and not path.name.endswith(".lock"):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass
class Outcome:
    case: str
    exit_code: int | None
    verdict: str  # refused | traceback | hang | accepted | unclear | state-changed
    message: str


class _Hang(Exception):
    pass


def run_case(case: Case, root: Path, scratch: Path) -> Outcome:
    from typer.testing import CliRunner

    from lmeraser.cli import app
    from lmeraser.errors import LmeraserError

    saved_env = dict(os.environ)
    if case.setup:
        case.setup(root, scratch)
    before = state_digest(root)
    args = case.args(root, scratch)

    def alarm(*_):
        raise _Hang

    if case.subprocess:
        return _run_process(case, args, root, before, saved_env)
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=True)
    except _Hang:
        return Outcome(case.name, None, "hang", "no answer in 30 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.environ.clear()
        os.environ.update(saved_env)
    output = (result.stderr or "") + (result.stdout or "")
    error = result.exception
    if isinstance(error, _Hang):
        return Outcome(case.name, None, "hang", "no answer in 30 s")
    if isinstance(error, LmeraserError):  # main() prints it as one line and exits 1
        output, code = f"error: {error}", 1
    elif error is not None and not isinstance(error, SystemExit):
        return Outcome(case.name, None, "traceback", f"{error.__class__.__name__}: {str(error)[:300]}")
    else:
        code = result.exit_code
    return _judge(case, code, output, before, state_digest(root))


def _run_process(case: Case, args: list[str], root: Path, before: str, saved_env: dict) -> Outcome:
    import subprocess

    try:
        done = subprocess.run([str(Path(sys.executable).parent / "lmeraser"), *args], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return Outcome(case.name, None, "hang", "no answer in 300 s")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    if "Traceback (most recent call last)" in done.stderr + done.stdout:
        return Outcome(case.name, done.returncode, "traceback", done.stderr.strip().splitlines()[-1][:300])
    # Prefect's own INFO lines come first; the verdict is on the error line the command printed.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return _judge(case, done.returncode, "\n".join(errors), before, state_digest(root))


def _judge(case: Case, code: int, output: str, before: str, after: str) -> Outcome:
    message = " ".join(output.split())
    if code == 0:
        verdict = "accepted"
    elif after != before:
        verdict = "state-changed"
    elif "\x1b" in output or len(output) > MAX_OUTPUT or not message or "Traceback" in output or "Aborted" in output:
        verdict = "unclear"
    else:
        verdict = "refused"
    return Outcome(case.name, code, verdict, message[:300])


def build_workspace(root: Path) -> None:
    """A tiny trained workspace (digits), built with the library functions."""
    sys.path.insert(0, str(ROOT / "tests"))
    from lmeraser.config import parse_params

    from conftest import TINY, run_stages
    from conftest import build_workspace as build

    ws = build(root, TINY)
    run_stages(parse_params(TINY), ws)


def restore(root: Path, pristine: Path) -> None:
    import shutil

    for name in ("data", "audit", "artifacts"):
        shutil.rmtree(root / name, ignore_errors=True)
        if (pristine / name).exists():
            shutil.copytree(pristine / name, root / name)
    shutil.copy2(pristine / "params.yaml", root / "params.yaml")


def run_all(root: Path, scratch: Path, pristine: Path, cases: list[Case] = CASES) -> list[Outcome]:
    outcomes = []
    for case in cases:
        restore(root, pristine)
        outcomes.append(run_case(case, root, scratch))
    restore(root, pristine)
    return outcomes


def main() -> None:
    import shutil

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.pop("LMERASER_SIGNING_KEY_FILE", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_workspace(tmp / "pristine")
        shutil.copytree(tmp / "pristine", tmp / "ws")
        (tmp / "scratch").mkdir()
        outcomes = run_all(tmp / "ws", tmp / "scratch", tmp / "pristine")
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
    rows = ["| case | exit | verdict | message |", "|---|---:|---|---|"]
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    rows += [f"| {o.case} | {o.exit_code} | {o.verdict} | {o.message[:140].replace('|', '/')} |" for o in outcomes]
    out = ROOT / "bench" / "results" / "reliability-inputs"
    out.with_suffix(".md").write_text(f"{machine}\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"cases": len(outcomes), "verdicts": counts, "outcomes": [o.__dict__ for o in outcomes]}, indent=2) + "\n")
    print("\n".join(rows))
    print(f"{len(outcomes)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if set(counts) - {"refused"}:
        sys.exit(1)


if __name__ == "__main__":
    main()
