"""One Prefect flow per pipeline stage (`train_pipeline`, in pipeline.py, runs them in order).

Flows hold no math: each runs its stage's function from the registry (lmeraser/stages.py) with
Prefect's run logger, so its progress shows in the terminal and the Prefect UI, and logs what the
stage returns to MLflow. `dvc repro` runs each stage through the CLI (`lmeraser stage NAME`),
which calls these.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from lmeraser.errors import LmeraserError
from lmeraser.flows.common import (
    map_jobs_for,
    timestamped_run_name,
    track_stage_task,
    untagged_task_runs,
    workspace_and_params,
)
from lmeraser.stages import stage


def _run(name: str, root: str, params_file: str, **options) -> dict | State:
    """Run one stage with the run logger; a user-facing error fails the flow with its one sentence."""
    params, ws = workspace_and_params(root, params_file)
    with untagged_task_runs():
        try:
            result = stage(name).function(params, ws, get_run_logger().info, **options)
        except LmeraserError as error:
            return Failed(message=str(error))
        track_stage_task(name, params, ws, result)
    return result


@flow(name="validate", log_prints=True, flow_run_name=timestamped_run_name)
def validate(root: str = ".", params_file: str = "params.yaml") -> dict:
    """The Great Expectations suite over every split."""
    return _run("validate", root, params_file)


@flow(name="backbone", log_prints=True, flow_run_name=timestamped_run_name)
def backbone(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Train the ViT on the public split (or load a local checkpoint) and freeze it."""
    return _run("backbone", root, params_file)


@flow(name="prototypes", log_prints=True, flow_run_name=timestamped_run_name)
def prototypes(root: str = ".", params_file: str = "params.yaml") -> dict:
    """FAISS k-means prototypes on public features."""
    return _run("prototypes", root, params_file)


@flow(name="assign", log_prints=True, flow_run_name=timestamped_run_name)
def assign(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every private sample to its nearest prototype."""
    return _run("assign", root, params_file)


@flow(name="train", log_prints=True, flow_run_name=timestamped_run_name)
def train(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Per-cluster prompts: reuse every unchanged key, train the rest as mapped tasks (threads or Dask)."""
    params, _ = workspace_and_params(root, params_file)
    return _run("train", root, params_file, map_jobs=map_jobs_for(params, root, params_file))


@flow(name="evaluate", log_prints=True, flow_run_name=timestamped_run_name)
def evaluate(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Test accuracy of the served model; the served model is registered in MLflow."""
    return _run("evaluate", root, params_file)


@flow(name="baselines", log_prints=True, flow_run_name=timestamped_run_name)
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


def run_stage(name: str, root: str = ".", params_file: str = "params.yaml") -> State:
    """Run one stage's flow and return its final state (the CLI turns a failure into exit 1);
    clusters train concurrently on `runtime.workers` threads."""
    params, _ = workspace_and_params(root, params_file)
    from prefect import tags

    runner = ThreadPoolTaskRunner(max_workers=params.runtime.workers)
    with tags("lmeraser", f"stage:{name}"):
        return STAGE_FLOWS[name].with_options(task_runner=runner)(root=root, params_file=params_file, return_state=True)
