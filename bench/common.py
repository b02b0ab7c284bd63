"""What the benchmarks share, imported first by each (`import common`; a script's own folder is on
its path): the repository root on sys.path, so a benchmark runs the working tree's lmeraser (from
a git worktree too), and the test suite's helpers (tests/helpers.py), which build the scratch
copies of the demo the benchmarks measure."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "tests", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
