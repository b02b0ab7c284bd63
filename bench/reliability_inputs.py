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

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
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
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def _rgb_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _private_id(root: Path) -> str:
    from lmeraser.workspace import Workspace

    return Workspace(root).manifest("private")["sample_id"][0]


def _first(root: Path, split: str) -> str:
    from lmeraser.workspace import Workspace

    return Workspace(root).manifest(split)["sample_id"][0]


def _requests(scratch: Path, name: str, *lines: str) -> Path:
    return _write(scratch / name, "\n".join(lines) + "\n")


def _forget_file(name: str, *lines: str) -> Callable:
    return lambda root, s: ["forget", "--root", str(root), "--no-process", "--file", str(_requests(s, name, *lines))]


def _rectify_input(make: Callable[[Path], Path]) -> Callable:
    return lambda root, s: [
        "rectify",
        "--root",
        str(root),
        "--no-process",
        "--sample-id",
        _private_id(root),
        "--input",
        str(make(s)),
    ]


def _forget(*extra: str) -> Callable:
    return lambda root, s: ["forget", "--root", str(root), "--no-process", *extra]


def _rectify(*extra: str) -> Callable:
    return lambda root, s: ["rectify", "--root", str(root), "--no-process", "--sample-id", _private_id(root), *extra]


def _params(make: Callable[[Path], Path]) -> Callable:
    return lambda root, s: [
        "forget",
        "--root",
        str(root),
        "--no-process",
        "--sample-id",
        _private_id(root),
        "--params",
        str(make(s)),
    ]


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
    Case(
        "public sample without --allow-backbone-rebuild",
        lambda root, s: _forget("--sample-id", _first(root, "public"))(root, s),
    ),
    Case("unknown subject", _forget("--subject", "nobody")),
    Case("nothing named", _forget()),
    Case("unknown --method", _forget("--sample-id", "x", "--method", "magic")),
    Case(
        "influence with a public sample",
        lambda root, s: _forget(
            "--sample-id", _first(root, "public"), "--allow-backbone-rebuild", "--method", "influence"
        )(root, s),
    ),
    # forget --file
    Case("--file is a directory", lambda root, s: _forget("--file", str(s))(root, s)),
    Case("--file missing", _forget("--file", "/nonexistent/requests.jsonl")),
    Case(
        "--file not UTF-8",
        lambda root, s: _forget("--file", str(_write(s / "latin1.jsonl", b'{"sample_ids": ["\xe9"]}\n')))(root, s),
    ),
    Case("--file is a FIFO", lambda root, s: _forget("--file", str(_fifo(s / "requests.fifo")))(root, s)),
    Case("--file is a device", _forget("--file", "/dev/zero")),
    Case(
        "--file over 16 MiB", lambda root, s: _forget("--file", str(_sparse(s / "huge.jsonl", (16 << 20) + 1)))(root, s)
    ),
    Case("--file empty", lambda root, s: _forget("--file", str(_write(s / "empty.jsonl", b"")))(root, s)),
    Case(
        "--file bad JSON",
        _forget_file("bad.jsonl", '{"sample_ids": ["a"'),
    ),
    Case(
        "--file 5000-digit number",
        _forget_file("digits.jsonl", '{"kind": "forget", "sample_ids": ["a"], "label": ' + "9" * 5000 + "}"),
    ),
    Case("--file 100,000-deep nesting", _forget_file("deep.jsonl", "[" * 100_000 + "]" * 100_000)),
    Case("--file 30,000-deep nesting (under the line limit)", _forget_file("deep2.jsonl", "[" * 30_000 + "]" * 30_000)),
    Case("--file line over 64 KiB", _forget_file("long.jsonl", '{"sample_ids": ["' + "a" * 70_000 + '"]}')),
    Case(
        "--file grants allow_backbone_rebuild",
        lambda root, s: _forget_file(
            "grant.jsonl", json.dumps({"sample_ids": [_first(root, "public")], "allow_backbone_rebuild": True})
        )(root, s),
    ),
    Case(
        "--file holds a rectify line",
        lambda root, s: _forget_file(
            "rect.jsonl", json.dumps({"kind": "rectify", "sample_ids": [_private_id(root)], "label": 1})
        )(root, s),
    ),
    Case("--file unknown key", _forget_file("key.jsonl", '{"sample_ids": ["a"], "because": "x"}')),
    Case("--file line is a list", _forget_file("list.jsonl", '["a", "b"]')),
    Case("--file sample_ids not a list", _forget_file("str.jsonl", '{"sample_ids": "abc"}')),
    Case(
        "--file one bad line of three",
        lambda root, s: _forget_file(
            "mixed.jsonl",
            json.dumps({"sample_ids": [_private_id(root)]}),
            "{oops",
            json.dumps({"sample_ids": [_private_id(root)]}),
        )(root, s),
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
                + "".join(
                    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                    for p, c in zip("abcdefgh", "bcdefghi")
                ),
            )
        ),
    ),
    Case(
        "params.yaml binary (forget)",
        lambda root, s: _forget("--sample-id", _private_id(root))(root, s),
        _break_params(bytes(range(256)) * 4),
    ),
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
        lambda root, s: [
            "rectify",
            "--root",
            str(root),
            "--file",
            str(_requests(s, "f.jsonl", json.dumps({"sample_ids": [_private_id(root)]}))),
        ],
    ),
    Case(
        "rectify --file and --sample-id",
        lambda root, s: [
            "rectify",
            "--root",
            str(root),
            "--sample-id",
            "a",
            "--file",
            str(_requests(s, "g.jsonl", "{}")),
        ],
    ),
    Case(
        "rectify a forgotten-looking unknown id",
        lambda root, s: ["rectify", "--root", str(root), "--sample-id", "ghost", "--label", "1"],
    ),
    Case("--input missing", _rectify_input(lambda s: s / "missing.npy")),
    Case("--input directory", _rectify_input(lambda s: s)),
    Case("--input FIFO", _rectify_input(lambda s: _fifo(s / "image.npy"))),
    Case("--input device", _rectify_input(lambda s: Path("/dev/zero"))),
    Case("--input empty .npy", _rectify_input(lambda s: _write(s / "empty.npy", b""))),
    Case("--input text named .npy", _rectify_input(lambda s: _write(s / "text.npy", "just text"))),
    # An object-dtype header followed by pickle bytes (written by hand: nothing here pickles anything).
    Case(
        "--input pickled object array",
        _rectify_input(lambda s: _write(s / "obj.npy", _npy_header((8, 8), "|O") + b"\x80\x04N.")),
    ),
    Case(
        "--input header claims 10^12 elements",
        _rectify_input(lambda s: _write(s / "claims.npy", _npy_header((1_000_000, 1_000_000)))),
    ),
    Case(
        "--input header has the right shape, data truncated",
        _rectify_input(lambda s: _write(s / "trunc.npy", _npy_header((8, 8)) + b"\x00" * 10)),
    ),
    Case("--input wrong shape", _rectify_input(lambda s: _np_save(s / "shape.npy", np.zeros((9, 9), np.uint8)))),
    Case("--input float pixels", _rectify_input(lambda s: _np_save(s / "float.npy", np.zeros((8, 8), np.float32)))),
    Case("--input pixels over 255", _rectify_input(lambda s: _np_save(s / "big.npy", np.full((8, 8), 300, np.int16)))),
    Case("--input over 16 MiB", _rectify_input(lambda s: _sparse(s / "huge.npy", (16 << 20) + 1))),
    Case(
        "--input PNG decompression bomb",
        _rectify_input(lambda s: _write(s / "bomb.png", _png(60_000, 60_000, body=b""))),
    ),
    Case("--input PNG wrong size", _rectify_input(lambda s: _write(s / "wrong.png", _png(9, 9)))),
    Case("--input RGB PNG for grey data", _rectify_input(lambda s: _write(s / "rgb.png", _rgb_png(8, 8)))),
    Case("--input PNG truncated", _rectify_input(lambda s: _write(s / "cut.png", _png(8, 8)[:40]))),
    Case("--input not an image", _rectify_input(lambda s: _write(s / "noise.png", os.urandom(300)))),
    # audit
    Case("verify --pubkey directory", lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(s)]),
    Case(
        "verify --pubkey not PEM",
        lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_write(s / "k.pem", "hello"))],
    ),
    Case(
        "verify --pubkey FIFO",
        lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_fifo(s / "k.fifo"))],
    ),
    Case(
        "verify --pubkey binary",
        lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", str(_write(s / "k.bin", os.urandom(200)))],
    ),
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
    Case(
        "verify a garbage log against the pinned signer",
        lambda root, s: ["audit", "verify", "--root", str(root)],
        lambda root, s: _pinned_garbage(root),
    ),
    # other commands
    Case("stage with an unknown name", lambda root, s: ["stage", "nope", "--root", str(root)]),
    Case(
        "data init with an unknown source",
        lambda root, s: ["data", "init", "--root", str(root), "--source", "imagenet", "--no-dvc"],
    ),
    Case(
        "data init from a missing IDX directory",
        lambda root, s: ["data", "init", "--root", str(root), "--source", "idx:/nonexistent", "--no-dvc"],
    ),
    Case(
        "data init from a device as npz",
        lambda root, s: ["data", "init", "--root", str(root), "--source", "npz:/dev/zero", "--no-dvc"],
    ),
    Case(
        "data init from a directory as npz",
        lambda root, s: ["data", "init", "--root", str(root), "--source", f"npz:{s}", "--no-dvc"],
    ),
]


# -- issue 21: bounded everything. Our own variants of each class the product now refuses (the
# test suite's cases for it are in tests/test_hostile_inputs.py; these run in the bench only).


def _laughs(depth: int, key: str) -> str:
    """A YAML 'billion laughs': `depth` levels of ten aliases each, the last bound to `key`."""
    names = [f"l{i}" for i in range(depth + 1)]
    text = f"{names[0]}: &{names[0]} [lol,lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
    text += "".join(f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip(names, names[1:], strict=False))
    return text + f"{key}: *{names[-1]}\n"


def _npz_labels(path: Path, labels: list) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, x_train=np.zeros((len(labels), 8, 8), np.uint8), y_train=np.asarray(labels, np.int64))
    return path


def _idx_source(scratch: Path, name: str, images: str = "ok", labels: str = "ok") -> str:
    """An IDX directory whose images or labels file is "fifo", "urandom" (a link to /dev/urandom)
    or "ok" (a valid 2-image file)."""
    folder = scratch / f"idx-{name}"
    folder.mkdir(exist_ok=True)
    for file, how, valid in (
        ("train-images-idx3-ubyte", images, b"\x00\x00\x08\x03" + struct.pack(">III", 2, 8, 8) + bytes(128)),
        ("train-labels-idx1-ubyte", labels, b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01"),
    ):
        path = folder / file
        if path.exists() or path.is_symlink():
            continue
        if how == "fifo":
            os.mkfifo(path)
        elif how == "urandom":
            path.symlink_to("/dev/urandom")
        else:
            _write(path, valid)
    return f"idx:{folder}"


def _init(source: Callable[[Path], str] | str) -> Callable:
    return lambda root, s: [
        "data",
        "init",
        "--root",
        str(root),
        "--source",
        source(s) if callable(source) else source,
        "--no-dvc",
    ]


def _fifo_journal(root: Path, scratch: Path) -> None:
    journal = root / "audit" / "journal.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.unlink(missing_ok=True)
    os.mkfifo(journal)


def _signed_log_and_fifo_journal(root: Path, scratch: Path) -> None:
    """A genuine signed record and pinned signer (so `audit verify` gets as far as the journal), then
    the journal a FIFO."""
    from lmeraser.lineage.records import lineage_log, signing_key
    from lmeraser.workspace import Workspace

    ws = Workspace(root)
    lineage_log(ws).append(
        {"artifacts/prompts/index.json": "0" * 64}, {"requests": [{"request_id": "r1"}]}, signing_key(ws)
    )
    _fifo_journal(root, scratch)


ISSUE_21: list[Case] = [
    # params: aliases, bombs, repeated keys, non-finite and wrongly typed numbers
    Case(
        "params: 12-level billion laughs under prompt",
        _params(lambda s: _write(s / "laughs.yaml", _laughs(12, "prompt"))),
    ),
    Case(
        "params: merge key <<: *alias",
        _params(lambda s: _write(s / "merge.yaml", "base: &b {epochs: 2}\nbackbone:\n  <<: *b\n")),
    ),
    Case(
        "params: alias of a scalar in a list",
        _params(lambda s: _write(s / "alias-list.yaml", "seed: &n 4\nclustering:\n  min_clusters: *n\n")),
    ),
    Case(
        "params.yaml a billion laughs (forget, no --params)",
        lambda root, s: _forget("--sample-id", _private_id(root))(root, s),
        _break_params(_laughs(9, "seed").encode()),
    ),
    Case(
        "params: a section given twice",
        _params(lambda s: _write(s / "dup-section.yaml", "backbone:\n  epochs: 2\nseed: 0\nbackbone:\n  lr: 0.1\n")),
    ),
    Case(
        "params: a nested key given twice",
        _params(lambda s: _write(s / "dup-nested.yaml", "backbone:\n  lr: 0.1\n  lr: 0.2\n")),
    ),
    Case("params: lr -.inf", _params(lambda s: _write(s / "ninf.yaml", "backbone:\n  lr: -.inf\n"))),
    Case("params: lr .nan", _params(lambda s: _write(s / "nan.yaml", "backbone:\n  lr: .NaN\n"))),
    Case("params: lr -1e999", _params(lambda s: _write(s / "nhuge.yaml", "backbone:\n  lr: -1e999\n"))),
    Case("params: seed a bool (yes)", _params(lambda s: _write(s / "yes.yaml", "seed: true\n"))),
    Case("params: epochs false", _params(lambda s: _write(s / "false.yaml", "backbone:\n  epochs: false\n"))),
    Case("params: --params /proc/self/mem", _params(lambda s: Path("/proc/self/mem"))),
    # data sources: IDX files that block or never end, huge labels, over-long paths
    Case("IDX labels file is a FIFO", _init(lambda s: _idx_source(s, "labels-fifo", labels="fifo"))),
    Case("IDX images file links to /dev/urandom", _init(lambda s: _idx_source(s, "images-urandom", images="urandom"))),
    Case("IDX labels file links to /dev/urandom", _init(lambda s: _idx_source(s, "labels-urandom", labels="urandom"))),
    Case("npz label 2^33", _init(lambda s: "npz:" + str(_npz_labels(s / "label-2-33.npz", [0, 1, 2**33])))),
    Case("npz label 2^62", _init(lambda s: "npz:" + str(_npz_labels(s / "label-2-62.npz", [0, 2**62])))),
    Case(
        "npz label just over the class limit (100,000)",
        _init(lambda s: "npz:" + str(_npz_labels(s / "label-100000.npz", [0, 100_000]))),
    ),
    Case("npz path with a 300-character name", _init(lambda s: f"npz:{s}/{'n' * 300}.npz")),
    Case("npz path of 20,000 characters", _init("npz:" + "/d" * 10_000)),
    Case("idx path of 5,000 characters", _init("idx:/" + "i" * 5000)),
    # roots and user files inside the kernel's trees
    Case(
        "--root a file (audit verify)", lambda root, s: ["audit", "verify", "--root", str(_write(s / "root-file", "x"))]
    ),
    Case("--root a file (unlearn)", lambda root, s: ["unlearn", "--root", str(_write(s / "root-file2", "x"))]),
    Case("--root /proc/1", lambda root, s: ["audit", "verify", "--root", "/proc/1"]),
    Case("--root /sys", lambda root, s: ["forget", "--root", "/sys", "--no-process", "--sample-id", "a"]),
    Case("--root /dev/shm", lambda root, s: ["audit", "show", "--root", "/dev/shm"]),
    Case(
        "rectify --file /proc/self/mem",
        lambda root, s: ["rectify", "--root", str(root), "--no-process", "--file", "/proc/self/mem"],
    ),
    Case("forget --file /proc/self/environ", _forget("--file", "/proc/self/environ")),
    Case("rectify --input /proc/self/fd/0", _rectify_input(lambda s: Path("/proc/self/fd/0"))),
    Case(
        "verify --pubkey /proc/self/mem",
        lambda root, s: ["audit", "verify", "--root", str(root), "--pubkey", "/proc/self/mem"],
    ),
    # a journal that is a FIFO: forget, verify and a batch must not block on it
    Case("forget with a FIFO journal", _forget("--sample-id", "a"), _fifo_journal),
    Case(
        "forget a real sample with a FIFO journal",
        lambda root, s: _forget("--sample-id", _private_id(root))(root, s),
        _fifo_journal,
    ),
    Case(
        "audit verify with a FIFO journal",
        lambda root, s: ["audit", "verify", "--root", str(root)],
        _signed_log_and_fifo_journal,
    ),
    Case("unlearn with a FIFO journal", lambda root, s: ["unlearn", "--root", str(root)], _fifo_journal, True),
]
for _case in ISSUE_21:
    _case.bench_only = True
CASES += ISSUE_21


def _pinned_garbage(root: Path) -> None:
    from lmeraser.lineage.records import signing_key
    from lmeraser.workspace import Workspace

    signing_key(Workspace(root))  # makes and pins the key, as the first record would
    _write(
        root / "audit" / "lineage.jsonl",
        b'{"payloadType": "application/vnd.in-toto+json", "payload": "\xff\xfe", "signatures": []}\n',
    )


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
        done = subprocess.run(
            [str(Path(sys.executable).parent / "lmeraser"), *args], capture_output=True, text=True, timeout=300
        )
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
    from lmeraser.config import parse_params

    from helpers import TINY, run_stages
    from helpers import build_workspace as build

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
        try:
            outcomes = run_all(tmp / "ws", tmp / "scratch", tmp / "pristine")
        finally:
            from lmeraser import prefect_server

            prefect_server.stop(tmp / "ws")  # the standing server the `unlearn` cases started
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
    rows = ["| case | exit | verdict | message |", "|---|---:|---|---|"]
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    rows += [f"| {o.case} | {o.exit_code} | {o.verdict} | {o.message[:140].replace('|', '/')} |" for o in outcomes]
    out = ROOT / "bench" / "results" / "reliability-inputs"
    out.with_suffix(".md").write_text(f"{machine}\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"cases": len(outcomes), "verdicts": counts, "outcomes": [o.__dict__ for o in outcomes]}, indent=2)
        + "\n"
    )
    print("\n".join(rows))
    print(f"{len(outcomes)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if set(counts) - {"refused"}:
        sys.exit(1)


if __name__ == "__main__":
    main()
