"""Hostile and broken input, the cases of bench/reliability_inputs.py: one clear sentence, a
non-zero exit, no traceback or hang, nothing raw echoed, and data/ and audit/ byte-identical.
(One slow case, a second `unlearn` process on another broken file, runs in the bench only.)"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from reliability_inputs import (  # noqa: E402
    CASES,
    Case,
    _fifo,
    _forget,
    _init,
    _params,
    _rectify_input,
    _write,
    restore,
    run_case,
)


@pytest.fixture(scope="module")
def hostile(trained_workspace, tmp_path_factory):
    ws, _ = trained_workspace
    base = tmp_path_factory.mktemp("hostile")
    shutil.copytree(ws.root, base / "pristine")
    shutil.copytree(ws.root, base / "ws")
    (base / "scratch").mkdir()
    return base


TESTED = [c for c in CASES if not c.bench_only]


@pytest.mark.parametrize("case", TESTED, ids=[c.name for c in TESTED])
def test_hostile_input_is_refused_cleanly(hostile, case, monkeypatch):
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    restore(hostile / "ws", hostile / "pristine")
    outcome = run_case(case, hostile / "ws", hostile / "scratch")
    assert outcome.verdict == "refused", outcome
    assert outcome.exit_code and outcome.exit_code > 0 and "\x1b" not in outcome.message


# -- issue 21: bounded everything (params, data sources, roots) ---------------------------------


def _npz(path: Path, labels) -> Path:
    import numpy as np

    np.savez(path, x_train=np.zeros((len(labels), 8, 8), np.uint8), y_train=np.asarray(labels, np.int64))
    return path


def _idx_dir(scratch: Path, images: str) -> Path:
    """An IDX source directory whose training images file is `images` ("fifo" or "zero")."""
    folder = scratch / f"idx-{images}"
    folder.mkdir(exist_ok=True)
    target = folder / "train-images-idx3-ubyte"
    if images == "fifo":
        _fifo(target)
    elif not target.exists():
        target.symlink_to("/dev/zero")
    _write(folder / "train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x00\x01")
    return folder


BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
ISSUE_21 = [
    # A bomb under a real key: its expansion reached the error message (an hour of printing).
    Case("params bomb under a real key", _params(lambda s: _write(s / "bomb.yaml", BILLION_LAUGHS + "seed: *i\n"))),
    Case(
        "params anchor and alias", _params(lambda s: _write(s / "alias.yaml", "seed: &s 3\nbackbone:\n  epochs: *s\n"))
    ),
    Case("params duplicate key", _params(lambda s: _write(s / "dup.yaml", "seed: 1\nseed: 2\n"))),
    Case("params lr .inf", _params(lambda s: _write(s / "inf.yaml", "backbone:\n  lr: .inf\n"))),
    Case("params lr 1e400", _params(lambda s: _write(s / "huge.yaml", "backbone:\n  lr: 1e400\n"))),
    Case("params epochs true", _params(lambda s: _write(s / "bool.yaml", "backbone:\n  epochs: true\n"))),
    Case("npz labels up to 2^40", _init(lambda s: "npz:" + str(_npz(s / "big-labels.npz", [0, 1, 2**40])))),
    Case("npz path of 5,000 characters", _init("npz:/" + "a" * 5000)),
    Case("IDX images file is a FIFO", _init(lambda s: f"idx:{_idx_dir(s, 'fifo')}")),
    Case("IDX images file is /dev/zero", _init(lambda s: f"idx:{_idx_dir(s, 'zero')}")),
    Case(
        "--root is a file",
        lambda root, s: ["forget", "--root", str(_write(s / "not-a-dir", "x")), "--no-process", "--sample-id", "a"],
    ),
    Case("--root under /proc", lambda root, s: ["forget", "--root", "/proc/self", "--no-process", "--sample-id", "a"]),
    Case("--root under /proc (metrics)", lambda root, s: ["metrics", "--root", "/proc"]),
    Case("--file /proc/self/mem", _forget("--file", "/proc/self/mem")),
    Case("--input /proc/self/mem", _rectify_input(lambda s: Path("/proc/self/mem"))),
]


@pytest.mark.parametrize("case", ISSUE_21, ids=[c.name for c in ISSUE_21])
def test_issue_21_hostile_input_is_one_sentence(hostile, case, monkeypatch):
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    restore(hostile / "ws", hostile / "pristine")
    outcome = run_case(case, hostile / "ws", hostile / "scratch")
    assert outcome.verdict == "refused", outcome
    assert outcome.exit_code and outcome.exit_code > 0 and "\x1b" not in outcome.message
    assert len(outcome.message) < 400 and "Traceback" not in outcome.message, outcome


def test_a_refused_params_file_names_the_problem_in_one_sentence(tmp_path):
    import time

    from lmeraser.config import load_params
    from lmeraser.errors import ConfigError

    for text, needle in [
        (BILLION_LAUGHS + "seed: *i\n", "anchors and aliases"),
        ("seed: 1\nbackbone:\n  epochs: 3\n  epochs: 4\n", "line 4: key 'epochs' is given twice"),
        ("backbone:\n  lr: 1e400\n", "backbone.lr"),
        ("prompt:\n  pad:\n    epochs: true\n", "prompt.pad.epochs"),
    ]:
        (tmp_path / "p.yaml").write_text(text)
        started = time.monotonic()
        with pytest.raises(ConfigError) as refused:
            load_params(tmp_path / "p.yaml")
        assert needle in str(refused.value) and "\n" not in str(refused.value) and len(str(refused.value)) < 300, (
            refused.value
        )
        assert time.monotonic() - started < 5
