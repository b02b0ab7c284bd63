"""What code and which libraries made an artifact: the identity that keys trained prompts and
influence overlays (invariant 4) and that every lineage record states.

A change to any module listed in `TRAINING_CODE` (or to a PEFT kind's own module) re-keys that
kind's prompts; a change elsewhere (the CLI, the flows, another kind's module) does not. A test
(tests/test_architecture.py) checks the list against the import closure of the training code, as
the stage registry's code deps are checked against each stage's.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

# Relative to the lmeraser package.
TRAINING_CODE = (
    "training.py",
    "determinism.py",
    "compute.py",
    "models/backbone.py",
    "models/prompts.py",
    "models/peft/__init__.py",
)


def training_files(kind: str) -> tuple[str, ...]:
    """The modules whose source determines a trained artifact of PEFT `kind`."""
    return (*TRAINING_CODE, f"models/peft/{kind}.py")


def code_version(kind: str) -> str:
    """A digest of the source of the modules that train a `kind` prompt."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in training_files(kind):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """The libraries whose version changes what a prompt computes."""
    import torch  # here, not at the top: records and the overlay key need no torch to be imported first

    return {"torch": torch.__version__, "timm": version("timm"), "peft": version("peft")}
