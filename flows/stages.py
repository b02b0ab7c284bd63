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
    try:
        result = stage(name).function(params, ws, get_run_logger().info, **options)
    except LmeraserError as error:
        return Failed(message=str(error))
    track_stage_task(name, params, ws, result)
    return result


def track_stage(name: str, params: Params, ws: Workspace, result: dict) -> None:
    """One MLflow run for a stage that ran (here or in an unlearning batch's rebuild): the params
    it reads, its metrics and small outputs; after evaluate, the served model's registration."""
    definition = stage(name)
    with tracking.stage_run(ws, name, definition.param_values(params.model_dump(mode="json"))):
        tracking.log_metrics(result.get("metrics", {}))
        tracking.log_artifacts([ws.root / path for path in definition.logged])
    if name == "evaluate":
        result["model_version"] = _register(params, ws, result)


# MLflow calls go over the network when the tracking server is remote: retried (a retry may
# leave one extra failed MLflow run, never a missing one).
track_stage_task = task(track_stage, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], task_run_name="track-{name}")


def timestamped_run_name() -> str:
    """`<stage>-<UTC time>`: readable in the Prefect UI (Prefect's default is two random words)."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    return f"{flow_run.flow_name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


@task(cache_policy=NO_CACHE, retries=0, task_run_name="train-cluster-{job.cluster}")
def train_cluster(trainer: ClusterTrainer, job: ClusterJob) -> dict:
    return trainer.train(job)


def _train_in_tasks(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
    """Clusters train as mapped Prefect tasks, concurrently on the flow's task runner."""
    futures = train_cluster.map(unmapped(trainer), jobs)
    return [future.result() for future in track(futures, "training clusters")]


@task(cache_policy=NO_CACHE, retries=0, task_run_name="train-cluster-{cluster}")
def train_cluster_on_worker(root: str, params_file: str, cluster: int, key: str) -> dict:
    from lmeraser.pipeline.train import train_from_workspace

    return train_from_workspace(root, params_file, cluster, key)


@flow(name="train-clusters", log_prints=True, flow_run_name=timestamped_run_name)
def train_clusters(root: str, params_file: str, clusters: list[int], keys: list[str]) -> list[dict]:
    """Clusters train as mapped tasks on this flow's task runner (Dask), each worker loading what
    it needs from the workspace."""
    futures = train_cluster_on_worker.map(unmapped(root), unmapped(params_file), clusters, keys)
    return [future.result() for future in track(futures, "training clusters")]


def dask_runner(params: Params):
    """prefect-dask's DaskTaskRunner: the cluster at runtime.dask_address, or a local one of
    runtime.workers single-threaded processes (torch threads: runtime.threads, as in threads mode)."""
    import logging

    from prefect_dask import DaskTaskRunner

    # distributed logs each worker's start and stop at INFO, and a closed connection's traceback
    # when the local cluster shuts down: keep the flow's output to the clusters it trains.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if params.runtime.dask_address:
        return DaskTaskRunner(address=params.runtime.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.runtime.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})


def map_jobs_for(params: Params, root: str, params_file: str):
    """How a stage's clusters train under runtime.executor: mapped tasks in threads of this flow,
    or the `train-clusters` subflow on Dask."""
    if params.runtime.executor == "threads":
        return _train_in_tasks

    def on_dask(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
        absolute = str(Path(root).resolve() / params_file)
        flow_with_dask = train_clusters.with_options(task_runner=dask_runner(params))
        return flow_with_dask(str(Path(root).resolve()), absolute, [job.cluster for job in jobs], [job.key for job in jobs])

    return on_dask


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
    params, _ = _workspace(root, params_file)
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


def _register(params: Params, ws: Workspace, result: dict) -> int:
    """Log the served model as an MLflow pyfunc and register it as `lmeraser@production`, when it
    changed (a version per served bundle, never per run)."""
    example = ws.split("test").images[:8]
    with tracking.stage_run(ws, "register", {"seed": params.seed, **stage("train").param_values(params.model_dump(mode="json"))}) as run:
        tracking.log_metrics(result["metrics"])
        description = f"test accuracy {result['metrics']['accuracy']:.4f}"
        return tracking.register_serving_model(ws, run.info.run_id, example, description, get_run_logger().info)


def run_stage(name: str, root: str = ".", params_file: str = "params.yaml") -> State:
    """Run one stage's flow and return its final state (the CLI turns a failure into exit 1);
    clusters train concurrently on `runtime.workers` threads."""
    params, _ = _workspace(root, params_file)
    from prefect import tags

    runner = ThreadPoolTaskRunner(max_workers=params.runtime.workers)
    with tags("lmeraser", f"stage:{name}"):
        return STAGE_FLOWS[name].with_options(task_runner=runner)(root=root, params_file=params_file, return_state=True)


def _before_retraining(root: str, params_file: str) -> State | None:
    from lmeraser import suppression
    from lmeraser.unlearning.journal import Journal

    _, ws = _workspace(root, params_file)
    try:
        pending = Journal(ws).pending() or (ws.batches.is_dir() and any(ws.batches.iterdir()))
        if pending:
            from flows.unlearn import run_unlearn

            get_run_logger().info("finishing the pending requests before retraining")
            state = run_unlearn(root, params_file)
            if state.is_failed():
                return Failed(message=f"the pending requests must be finished before retraining, and their batch failed: {state.message}")
        bad = suppression.violations(ws)
    except LmeraserError as error:
        return Failed(message=str(error))
    if bad:
        return Failed(
            message=f"data/ holds {len(bad)} sample(s) the suppression list erased or corrected ({', '.join(bad[:3])}); "
            "run `lmeraser data init`, which applies it, before retraining."
        )
    return None


@flow(name="train_pipeline", log_prints=True, flow_run_name=timestamped_run_name)
def train_pipeline(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every stage in order, for scheduled production retraining (see flows/serve.py).

    Unlike `dvc repro` it does not skip unchanged stages, but per-cluster training still reuses
    every prompt whose content-addressed key is unchanged. A scheduled retrain never leaves an
    erasure behind or brings one back: pending requests are finished first (the `unlearn` flow),
    and data/ must honour the suppression list.
    """
    refusal = _before_retraining(root, params_file)
    if refusal is not None:
        return refusal
    results = {}
    for definition in STAGES:
        state = run_stage(definition.name, root, params_file)
        if state.is_failed():
            return Failed(message=f"stage {definition.name}: {state.message}")
        results[definition.name] = state.result()
    return results
