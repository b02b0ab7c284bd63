"""The stage registry: the one list of pipeline stages, with what each reads, writes and
depends on.

`dvc.yaml` is checked against it by a test (including that each stage's code deps cover every
library module the stage's code imports); the CLI (`lmeraser stage NAME`), the Prefect flows
(lmeraser/flows/stages.py), the benchmarks and the tests run stages through it. Importing this module
imports no stage: a stage's code is loaded when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# Modules that move bytes, name places or validate settings but compute nothing a stage outputs,
# so a change to them re-runs no stage: errors, atomic I/O, the workspace layout and readers,
# the typed params (their values are what DVC tracks, and params.yaml spells every one of them
# out: a test keeps it equal to the defaults), and the progress bar.
NEUTRAL_MODULES = (
    "lmeraser/__init__.py",
    "lmeraser/errors.py",
    "lmeraser/io.py",
    "lmeraser/failpoints.py",  # crash points for reliability tests
    "lmeraser/workspace.py",
    "lmeraser/config.py",
    "lmeraser/progress.py",
)


@dataclass(frozen=True)
class Out:
    path: str
    kind: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True
    persist: bool = False
    plot: dict = field(default_factory=dict)  # template, x, y for DVC's plots

    def dvc_entry(self) -> str | dict:
        options = {
            **({"cache": False} if not self.cache else {}),
            **({"persist": True} if self.persist else {}),
            **self.plot,
        }
        return {self.path: options} if options else self.path


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]  # data and artifacts it reads (DVC syntax, ${...} interpolation allowed)
    code: tuple[str, ...]  # library files and folders whose code determines its outputs
    params: tuple[str, ...]  # params.yaml keys it reads (DVC tracks them; MLflow logs them)
    outs: tuple[Out, ...]
    logged: tuple[str, ...] = ()  # small outputs also logged to MLflow as artifacts
    # Computes with torch or faiss: its process checks their numeric pins before its flow starts
    # (importing them costs ~1.5 s). A stage that does not only reads, hashes and counts.
    kernels: bool = True

    @property
    def module(self) -> str:
        return f"lmeraser.pipeline.{self.name}"

    @property
    def function(self) -> Callable[..., dict]:
        """The stage's `run(params, ws, log, ...)`, imported on first use."""
        return importlib.import_module(self.module).run

    @property
    def cmd(self) -> str:
        return f"lmeraser stage {self.name}"

    def param_values(self, params: dict) -> dict:
        """The values of the params this stage reads (dotted keys, interpolation resolved)."""
        out = {}
        for key in self.params:
            key = interpolate(key, params)
            value = params
            for part in key.split("."):
                value = value[part]
            out[key] = value
        return out

    def dvc_entry(self) -> dict:
        """The stage as dvc.yaml must declare it."""
        entry: dict = {"cmd": self.cmd, "deps": [*self.deps, *self.code]}
        if self.params:
            entry["params"] = list(self.params)
        for kind in ("outs", "metrics", "plots"):
            outs = [out.dvc_entry() for out in self.outs if out.kind == kind]
            if outs:
                entry[kind] = outs
        return entry


def interpolate(text: str, params: dict) -> str:
    """Resolve DVC's `${a.b}` references against the params (as dvc.yaml does)."""
    while "${" in text:
        start = text.index("${")
        end = text.index("}", start)
        value = params
        for part in text[start + 2 : end].split("."):
            value = value[part]
        text = text[:start] + str(value) + text[end + 1 :]
    return text


_BAR = {"template": "bar_horizontal"}
_ON = "${clustering.fit_on}"  # the split the prototypes are fitted on (public by default)
_PEFT = ("prompt.kind", "prompt.${prompt.kind}")  # the chosen PEFT kind's settings only

STAGES: tuple[Stage, ...] = (
    Stage(
        "validate",
        deps=("data",),
        code=(
            "lmeraser/pipeline/validate.py",
            "lmeraser/data",
            "lmeraser/salt.py",
            "lmeraser/suppression.py",
            "lmeraser/numerics.py",
        ),
        params=("data",),
        outs=(Out("artifacts/validation", cache=False),),
        logged=("artifacts/validation",),
        kernels=False,
    ),
    Stage(
        "backbone",
        deps=("artifacts/validation/public.json", "data/public"),
        code=(
            "lmeraser/pipeline/backbone.py",
            "lmeraser/models/backbone.py",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        # The device and precision change the backbone's bits, and every pass over it runs there.
        params=("seed", "backbone", "runtime.device", "runtime.precision", "runtime.numerics"),
        outs=(Out("artifacts/backbone"),),
        logged=("artifacts/backbone/backbone.json",),
    ),
    Stage(
        "prototypes",
        deps=("artifacts/backbone", f"artifacts/validation/{_ON}.json", f"data/{_ON}"),
        code=(
            "lmeraser/pipeline/prototypes.py",
            "lmeraser/clustering.py",
            "lmeraser/models/backbone.py",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        params=("seed", "clustering", "runtime.threads"),
        outs=(Out("artifacts/clusters/prototypes.npy"), Out("artifacts/clusters/prototypes.json")),
        logged=("artifacts/clusters/prototypes.json",),
    ),
    Stage(
        "assign",
        deps=(
            "artifacts/backbone",
            "artifacts/clusters/prototypes.npy",
            "artifacts/validation/private.json",
            "data/private",
        ),
        code=(
            "lmeraser/pipeline/assign.py",
            "lmeraser/feature_cache.py",
            "lmeraser/clustering.py",
            "lmeraser/models/backbone.py",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        params=(),
        outs=(
            Out("artifacts/clusters/assignments.csv"),
            Out("reports/clusters.json", "metrics", cache=False),
            Out("reports/plots/cluster_sizes.csv", "plots", cache=False, plot={**_BAR, "x": "size", "y": "cluster"}),
        ),
        logged=("reports/clusters.json",),
    ),
    Stage(
        "train",
        deps=(
            "artifacts/backbone",
            "artifacts/clusters/assignments.csv",
            "artifacts/clusters/prototypes.json",
            "data/private",
        ),
        code=(
            "lmeraser/pipeline/train.py",
            "lmeraser/training.py",
            "lmeraser/code_identity.py",
            "lmeraser/store.py",
            "lmeraser/models",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        params=("seed", *_PEFT, "runtime.threads"),
        outs=(
            Out("artifacts/prompts/store", cache=False, persist=True),
            Out("artifacts/prompts/index.json", cache=False),
        ),
        logged=("artifacts/prompts/index.json",),
    ),
    Stage(
        "evaluate",
        deps=("artifacts/backbone", "artifacts/clusters/prototypes.npy", "artifacts/prompts/index.json", "data/test"),
        code=(
            "lmeraser/pipeline/evaluate.py",
            "lmeraser/inference.py",
            "lmeraser/score_cache.py",
            "lmeraser/evaluation.py",
            "lmeraser/overlay.py",
            "lmeraser/clustering.py",
            "lmeraser/training.py",
            "lmeraser/code_identity.py",
            "lmeraser/store.py",
            "lmeraser/models",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        params=("evaluate.batch_size",),
        outs=(
            Out("metrics.json", "metrics", cache=False),
            Out(
                "reports/plots/confusion.csv",
                "plots",
                cache=False,
                plot={"template": "confusion", "x": "predicted", "y": "actual"},
            ),
            Out(
                "reports/plots/per_cluster_accuracy.csv",
                "plots",
                cache=False,
                plot={**_BAR, "x": "accuracy", "y": "cluster"},
            ),
            Out("reports/confusion_matrix.json", cache=False),
        ),
        logged=("metrics.json", "reports/plots"),
    ),
    Stage(
        # Reference models on the same private split; not on the serving path, so an unlearning
        # request does not re-run it (until the next full `dvc repro`, `dvc status` lists it).
        "baselines",
        deps=("artifacts/backbone", "artifacts/validation/private.json", "data/private", "data/test"),
        code=(
            "lmeraser/pipeline/baselines.py",
            "lmeraser/evaluation.py",
            "lmeraser/training.py",
            "lmeraser/code_identity.py",
            "lmeraser/models",
            "lmeraser/compute.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
            "lmeraser/determinism.py",
        ),
        params=("seed", *_PEFT, "evaluate", "runtime.threads"),
        outs=(Out("reports/baselines.json", "metrics", cache=False),),
        logged=("reports/baselines.json",),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
# DVC's cache: false outputs are meant to be committed to git, except the local working state
# under artifacts/ (ignored): the metrics, plots and reports a run is compared by.
GIT_TRACKED_OUTPUTS: tuple[str, ...] = tuple(
    o.path for s in STAGES for o in s.outs if not o.cache and not o.path.startswith("artifacts/")
)
SERVING_TARGET = "evaluate"  # what an unlearning batch reproduces: the serving path, not the baselines


def upstream(target: str) -> tuple[Stage, ...]:
    """The stages `dvc repro TARGET` may run, in pipeline order (the registry is topologically sorted)."""
    return STAGES[: STAGE_NAMES.index(target) + 1]


def stage(name: str) -> Stage:
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise KeyError(name)
