"""One Prefect flow per pipeline stage, plus `train_pipeline`, which runs them in order.

Flows hold no math: each calls a `lmeraser.pipeline.run_*` function and logs what it returns to
MLflow. `dvc repro` runs each stage through the CLI (`lmeraser stage NAME`), which calls these.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from lmeraser import pipeline, tracking
from lmeraser.config import Params, load_params
from lmeraser.errors import LmeraserError

STAGES = ("validate", "backbone", "prototypes", "assign", "train", "evaluate", "baselines")
# What each stage logs to MLflow besides its metrics.
_STAGE_PARAMS = {
    "validate": ("data",),
    "backbone": ("seed", "backbone"),
    "prototypes": ("seed", "clustering"),
    "assign": ("clustering",),
    "train": ("seed", "prompt", "runtime"),
    "evaluate": ("seed", "prompt", "evaluate"),
    "baselines": ("seed", "prompt", "evaluate"),
}


def _log():
    logger = get_run_logger()
    return logger.info


def _params(root: Path, params_file: str) -> tuple[Params, pipeline.Paths]:
    return load_params(root / params_file), pipeline.Paths(root)


def _tracked(stage: str, params: Params, paths: pipeline.Paths, result: dict, artifacts: list[Path]) -> None:
    dumped = params.model_dump()
    with tracking.stage_run(paths.root, stage, {k: dumped[k] for k in _STAGE_PARAMS[stage]}):
        tracking.log_metrics(result.get("metrics", {}))
        tracking.log_artifacts(artifacts)


@task(cache_policy=NO_CACHE, retries=0)
def train_cluster(ctx: pipeline.TrainContext, job: pipeline.ClusterJob) -> dict:
    return ctx.train(job)


def _stage_flow(stage: str):
    def run(root: str = ".", params_file: str = "params.yaml") -> dict:
        params, paths = _params(Path(root), params_file)
        log = _log()
        try:
            if stage == "train":
                result = _run_train(params, paths, log)
            else:
                result = getattr(pipeline, f"run_{stage}")(params, paths, log)
        except LmeraserError as error:
            # A user-facing problem: fail with its one sentence, not a traceback.
            return Failed(message=str(error))
        _tracked(stage, params, paths, result, _ARTIFACTS[stage](paths))
        if stage == "evaluate":
            result["model_version"] = _register(params, paths, result, log)
        return result

    run.__name__ = f"{stage}_flow"
    return flow(name=stage, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))(run)


def _run_train(params: Params, paths: pipeline.Paths, log) -> dict:
    def prefect_map(fn, jobs):
        jobs = list(jobs)
        if not jobs:
            return []
        ctx = fn.__self__
        futures = train_cluster.with_options(task_run_name="train-cluster-{job.cluster}").map(unmapped(ctx), jobs)
        return [future.result() for future in futures]

    return pipeline.run_train(params, paths, log, map_fn=prefect_map)


def _register(params: Params, paths: pipeline.Paths, result: dict, log) -> int:
    """Log the serving bundle (backbone, prototypes, prompt index and artifacts) and register it."""
    with tracking.stage_run(paths.root, "register", {"seed": params.seed, "prompt": params.prompt.model_dump()}) as run:
        tracking.log_metrics(result["metrics"])
        tracking.log_artifacts([paths.backbone, paths.clusters / "prototypes.npy", paths.clusters / "prototypes.json", paths.prompts], "model")
        version = tracking.register_model(run.info.run_id, "model", f"test accuracy {result['metrics']['accuracy']:.4f}")
    log(f"registered model 'lmeraser' version {version}")
    return version


_ARTIFACTS = {
    "validate": lambda p: [p.validation],
    "backbone": lambda p: [p.backbone / "backbone.json"],
    "prototypes": lambda p: [p.clusters / "prototypes.json"],
    "assign": lambda p: [p.reports / "clusters.json"],
    "train": lambda p: [p.prompts / "index.json"],
    "evaluate": lambda p: [p.metrics, p.reports / "plots"],
    "baselines": lambda p: [p.reports / "baselines.json"],
}

STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}
validate_flow = STAGE_FLOWS["validate"]
backbone_flow = STAGE_FLOWS["backbone"]
prototypes_flow = STAGE_FLOWS["prototypes"]
assign_flow = STAGE_FLOWS["assign"]
train_flow = STAGE_FLOWS["train"]
evaluate_flow = STAGE_FLOWS["evaluate"]


def stage_flow(stage: str, params: Params):
    """The flow for `stage`, with the task runner sized from params (clusters train concurrently)."""
    return STAGE_FLOWS[stage].with_options(task_runner=ThreadPoolTaskRunner(max_workers=params.runtime.workers))


def run_stage(stage: str, root: str = ".", params_file: str = "params.yaml") -> State:
    """Run one stage's flow and return its final state (the CLI turns a failure into exit 1)."""
    params = load_params(Path(root) / params_file)
    return stage_flow(stage, params)(root=root, params_file=params_file, return_state=True)


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every stage in order, for scheduled production retraining (see flows/serve.py).

    Unlike `dvc repro` it does not skip unchanged stages, but per-cluster training still reuses
    every prompt whose content-addressed key is unchanged.
    """
    params = load_params(Path(root) / params_file)
    results = {}
    for stage in STAGES:
        state = stage_flow(stage, params)(root=root, params_file=params_file, return_state=True)
        if state.is_failed():
            return Failed(message=f"stage {stage}: {state.message}")
        results[stage] = state.result()
    return results
