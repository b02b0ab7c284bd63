"""One Prefect flow per pipeline stage, plus `train_pipeline`, which runs them in order.

Flows hold no math: each runs its stage's function from the registry (lmeraser/stages.py) with
Prefect's run logger, so its progress shows in the terminal and the Prefect UI, and logs what the
stage returns to MLflow. `dvc repro` runs each stage through the CLI (`lmeraser stage NAME`),
which calls these.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from lmeraser import tracking
from lmeraser.config import Params, load_params
from lmeraser.errors import LmeraserError
from lmeraser.pipeline.train import ClusterJob, ClusterTrainer
from lmeraser.progress import track
from lmeraser.stages import STAGES, stage
from lmeraser.workspace import Workspace


def _workspace(root: str, params_file: str) -> tuple[Params, Workspace]:
    ws = Workspace(Path(root), Path(root) / params_file)  # an absolute params_file stays as it is
    return load_params(ws.params_file), ws


def _run(name: str, root: str, params_file: str, **options) -> dict | State:
    """Run one stage with the run logger; a user-facing error fails the flow with its one sentence."""
    params, ws = _workspace(root, params_file)
    definition = stage(name)
    try:
        result = definition.function(params, ws, get_run_logger().info, **options)
    except LmeraserError as error:
        return Failed(message=str(error))
    with tracking.stage_run(ws, name, definition.param_values(params.model_dump(mode="json"))):
        tracking.log_metrics(result.get("metrics", {}))
        tracking.log_artifacts([ws.root / path for path in definition.logged])
    return result


@task(cache_policy=NO_CACHE, retries=0, task_run_name="train-cluster-{job.cluster}")
def train_cluster(trainer: ClusterTrainer, job: ClusterJob) -> dict:
    return trainer.train(job)


def _train_in_tasks(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
    """Clusters train as mapped Prefect tasks, concurrently on the flow's task runner."""
    futures = train_cluster.map(unmapped(trainer), jobs)
    return [future.result() for future in track(futures, "training clusters")]


@flow(name="validate", log_prints=True)
def validate(root: str = ".", params_file: str = "params.yaml") -> dict:
    """The Great Expectations suite over every split."""
    return _run("validate", root, params_file)


@flow(name="backbone", log_prints=True)
def backbone(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Train the ViT on the public split (or load a local checkpoint) and freeze it."""
    return _run("backbone", root, params_file)


@flow(name="prototypes", log_prints=True)
def prototypes(root: str = ".", params_file: str = "params.yaml") -> dict:
    """FAISS k-means prototypes on public features."""
    return _run("prototypes", root, params_file)


@flow(name="assign", log_prints=True)
def assign(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every private sample to its nearest prototype."""
    return _run("assign", root, params_file)


@flow(name="train", log_prints=True)
def train(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Per-cluster prompts: reuse every unchanged key, train the rest as mapped tasks."""
    return _run("train", root, params_file, map_jobs=_train_in_tasks)


@flow(name="evaluate", log_prints=True)
def evaluate(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Test accuracy of the served model; the serving bundle is registered in MLflow."""
    result = _run("evaluate", root, params_file)
    if isinstance(result, dict):
        params, ws = _workspace(root, params_file)
        result["model_version"] = _register(params, ws, result)
    return result


@flow(name="baselines", log_prints=True)
def baselines(root: str = ".", params_file: str = "params.yaml") -> dict:
    """The linear probe and the single-prompt reference models."""
    return _run("baselines", root, params_file)


STAGE_FLOWS = {
    "validate": validate,
    "backbone": backbone,
    "prototypes": prototypes,
    "assign": assign,
    "train": train,
    "evaluate": evaluate,
    "baselines": baselines,
}


def _register(params: Params, ws: Workspace, result: dict) -> int:
    """Log the serving bundle (backbone, prototypes, prompt index and artifacts) and register it."""
    with tracking.stage_run(ws, "register", {"seed": params.seed, **stage("train").param_values(params.model_dump(mode="json"))}) as run:
        tracking.log_metrics(result["metrics"])
        tracking.log_artifacts([ws.backbone_dir, ws.prototypes_file, ws.prototypes_meta_file, ws.prompts], "model")
        version = tracking.register_model(run.info.run_id, "model", f"test accuracy {result['metrics']['accuracy']:.4f}")
    get_run_logger().info(f"registered model 'lmeraser' version {version}")
    return version


def run_stage(name: str, root: str = ".", params_file: str = "params.yaml") -> State:
    """Run one stage's flow and return its final state (the CLI turns a failure into exit 1);
    clusters train concurrently on `runtime.workers` threads."""
    params, _ = _workspace(root, params_file)
    runner = ThreadPoolTaskRunner(max_workers=params.runtime.workers)
    return STAGE_FLOWS[name].with_options(task_runner=runner)(root=root, params_file=params_file, return_state=True)


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every stage in order, for scheduled production retraining (see flows/serve.py).

    Unlike `dvc repro` it does not skip unchanged stages, but per-cluster training still reuses
    every prompt whose content-addressed key is unchanged.
    """
    results = {}
    for definition in STAGES:
        state = run_stage(definition.name, root, params_file)
        if state.is_failed():
            return Failed(message=f"stage {definition.name}: {state.message}")
        results[definition.name] = state.result()
    return results
