"""Hostile and broken input, the cases of bench/reliability_inputs.py: one clear sentence, a
non-zero exit, no traceback or hang, nothing raw echoed, and data/ and audit/ byte-identical.
(One slow case, a second `unlearn` process on another broken file, runs in the bench only.)"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from reliability_inputs import CASES, restore, run_case  # noqa: E402


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
