"""What the tests (and the benchmarks, through bench/common.py) build with: tiny, fast
parameters, workspaces and git + DVC copies of this repository made with the real components,
the real CLI, and journal events. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import yaml

from lmeraser.config import parse_params
from lmeraser.data.splits import init_data
from lmeraser.stages import STAGE_NAMES, stage
from lmeraser.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent

# Small enough for seconds on 2 CPU cores, big enough that training does something.
TINY = {
    "seed": 0,
    "data": {"source": "digits", "public_fraction": 0.5, "test_fraction": 0.2, "n_subjects": 20, "subset": 400},
    "backbone": {
        "img_size": 8,
        "patch_size": 4,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "epochs": 3,
        "batch_size": 64,
        "threads": 1,
    },
    "clustering": {"target_cluster_size": 40, "min_clusters": 2, "max_clusters": 8, "niter": 10},
    "prompt": {"kind": "pad", "pad": {"width": 1, "epochs": 2, "batch_size": 16, "lr": 0.02}},
    "evaluate": {"baselines": True, "batch_size": 128},
    # MLflow tracked before a forget returns: the tests read MLflow right after, and a background
    # tracker per forget would cost the suite a process each (tests/test_background_tracking.py
    # covers the default, background).
    "runtime": {"threads": 1, "workers": 2, "tracking": "wait"},
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def received_event(request_id: str, at: float | None = None, method: str = "exact", **fields) -> dict:
    """A journal `received` event for a forget request `request_id` (fields of Request override)."""
    import time

    from lmeraser.journal import received
    from lmeraser.request import Request

    at = time.time() if at is None else at
    request = Request(**{"request_id": request_id, "kind": "forget", "sample_ids": (), "received_at": at, **fields})
    return received(request, method, at)


def tiny_backbone(depth: int = 1, device: str = "cpu"):
    """A seeded, frozen 8 px built-in ViT for 4 classes, for unit tests of prompts and influence."""
    import torch

    from lmeraser.config import BackboneParams
    from lmeraser.models.backbone import build_vit, freeze

    torch.manual_seed(0)
    return freeze(
        build_vit(BackboneParams(img_size=8, patch_size=4, embed_dim=16, depth=depth, num_heads=2), 4).to(device)
    )


def tiny_data(n: int):
    """`n` seeded grey 8 px inputs (already preprocessed) and labels of 4 classes, for tiny_backbone."""
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def random_timm_checkpoint(path: Path, model: str = "test_vit") -> Path:
    """A weights file as a user would bring one: a timm architecture with an ImageNet-sized
    classifier and seeded random weights (nothing can be downloaded here)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(
        {
            k: v.contiguous()
            for k, v in timm.create_model(model, pretrained=False, num_classes=1000).state_dict().items()
        },
        str(path),
    )
    return path


def build_workspace(root: Path, params: dict) -> Workspace:
    """Materialise data for `params` into `root` and return its Workspace (no DVC, no Prefect)."""
    root.mkdir(parents=True, exist_ok=True)
    parsed = parse_params(params)
    (root / "params.yaml").write_text(yaml.safe_dump(parsed.model_dump(mode="json"), sort_keys=False))
    ws = Workspace(root)
    init_data(parsed.data, parsed.seed, ws)
    return ws


def run_stages(params, ws: Workspace, stages=STAGE_NAMES, log=lambda message: None) -> dict:
    """The stages' library functions in order, through the registry (no Prefect, no MLflow)."""
    return {name: stage(name).function(params, ws, log) for name in stages}


def copy_repo(dest: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC checkout of this repository's tracked pipeline files in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "configs", dest / "configs")
    for name in ("lmeraser", ".dvc"):
        shutil.copytree(
            REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local")
        )
    if params is not None:
        # Every key spelled out: dvc.yaml interpolates some of them (e.g. clustering.fit_on).
        (dest / "params.yaml").write_text(yaml.safe_dump(parse_params(params).model_dump(mode="json"), sort_keys=False))
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def shared_build(tmp_path_factory, name: str, build: Callable[[Path], str]) -> tuple[Path, str]:
    """`build(dest)` run once per test run, not once per xdist worker: the first worker to ask
    builds it under a file lock in the run's shared temporary directory, the others wait and reuse
    it. `build` returns text to keep (e.g. the `dvc repro` output); a build that failed is retried
    by the next worker that asks, so it fails there too with its own error. The result is a
    template: tests work on copies (`clone_repo`), never on it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    dest, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(dest, ignore_errors=True)
            output = build(dest)
            done.write_text(output)
    return dest, done.read_text()


def clone_repo(template: Path, dest: Path) -> Path:
    """A copy of a built repository (git, DVC cache, MLflow store, artifacts): a copied workspace
    tracks into its own MLflow artifacts (lmeraser/tracking.py relocates the store)."""
    from lmeraser import tracking

    shutil.copytree(template, dest, symlinks=True)
    tracking.ensure_store(Workspace(dest))  # what the copy's first command does: its own MLflow artifacts
    return dest


def commit_all(root: Path, message: str) -> None:
    """`git add -A` and commit everything in `root` (as a user does after `dvc repro`)."""
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", message],
    ):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


def lmeraser_cli(*args: str, cwd: Path, check: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """`lmeraser *args` in `cwd`, as a user runs it: a child process."""
    done = subprocess.run([str(BIN / "lmeraser"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return _checked(done) if check else done


def lmeraser_warm(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """`lmeraser *args` in `cwd`, run in this process (`cli.run`, what `lmeraser` itself runs): it
    skips the 5-8 s a child spends importing torch, timm, peft, Prefect, MLflow and Great
    Expectations and computing the numeric fingerprint, so the end-to-end modules run their many
    forgets at the cost of their batches. What only a child shows stays with `lmeraser_cli`: Prefect's
    own log lines on the terminal (here they go to the test's log, not to the result), settings read
    at import, and the key and token moved out of the environment at start (here they stay in it)."""
    import contextlib
    import io
    import traceback

    from lmeraser import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.run(list(args))
        except Exception:  # what a child prints and exits 1 with
            traceback.print_exc()
            code = 1
    done = subprocess.CompletedProcess(["lmeraser", *args], code, out.getvalue(), err.getvalue())
    return _checked(done) if check else done


def _checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise AssertionError(f"lmeraser {' '.join(done.args[1:])} failed:\n{done.stdout}\n{done.stderr}")
    return done


def dvc(*args, cwd, check=True):
    # The demo's `dvc repro` takes 2-4.4 min here under portable numerics on a 2-core machine,
    # and timed out at 900 s beside two other heavy jobs: a hang guard, not a benchmark.
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=1800)
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def repro_in_process(root: Path, target: str = "evaluate") -> list[str]:
    """`dvc repro <target>` as the product's in-process rebuild runs it (lmeraser/unlearning/
    rebuild.py: the same stage functions, recorded in dvc.lock through DVC's API, each stage
    tracked in MLflow as its stage process would track it), in this process: without a Python
    process, its imports and a Prefect flow run per stage. For fixtures whose subject is not
    `dvc repro` itself (test_e2e and test_under_load run it as a user does); the names of the
    stages that ran."""
    from prefect import flow

    from lmeraser.config import load_params
    from lmeraser.flows.common import track_stage
    from lmeraser.unlearning.rebuild import reproduce

    ws = Workspace(root)
    params = load_params(ws.params_file)

    @flow(name="repro-in-process")  # the model's registration logs to its run, as a stage's flow does
    def run() -> list[str]:
        return reproduce(
            ws,
            params,
            target,
            log=lambda m: None,
            after_stage=lambda name, result: track_stage(name, params, ws, result),
        )

    return run()


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def cli_ok(*args, cwd):
    return _ok(lmeraser_cli(*args, cwd=cwd))


def warm_ok(*args, cwd):
    """`lmeraser_warm`, asserted to succeed."""
    return _ok(lmeraser_warm(*args, cwd=cwd))


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args[1:]}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done
