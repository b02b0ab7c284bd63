"""What the flows share: the workspace and params a flow runs on, its run name, one MLflow run per
stage, and how a stage's clusters train (threads of the flow, or Dask)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from lmeraser import tracking
from lmeraser.config import Params, load_params
from lmeraser.errors import LmeraserError, shown
from lmeraser.progress import track
from lmeraser.stages import stage
from lmeraser.workspace import Workspace

if TYPE_CHECKING:  # torch and timm (~3 s): only the stages that train import them (validate never does)
    from lmeraser.pipeline.train import ClusterJob, ClusterTrainer


def workspace_and_params(root: str, params_file: str) -> tuple[Params, Workspace]:
    ws = Workspace(Path(root), Path(root) / params_file)  # an absolute params_file stays as it is
    return load_params(ws.params_file), ws


@contextmanager
def untagged_task_runs() -> Iterator[None]:
    """Task runs started inside carry none of the tags the flow run was started with (the flow
    run keeps them: `lmeraser`, `stage:<name>`, `unlearn`). Prefect asks its server for a
    concurrency slot for each tag of a task run before the run starts: one API round trip per
    task run (0.1-0.3 s on a loaded 2-core machine, each of an unlearning batch's seven steps
    and each cluster of a train stage), though lmeraser sets no limit on its tags. A
    concurrency limit a user sets on these tags therefore applies to flow runs' tasks not at all
    (docs/architecture.md)."""
    from prefect.context import TagsContext

    with TagsContext(current_tags=set()):
        yield


def track_stage(name: str, params: Params, ws: Workspace, result: dict, entry_id: str | None = None) -> None:
    """One MLflow run for a stage that ran (here or in an unlearning batch's rebuild): the params
    it reads, its metrics and small outputs; after evaluate, the served model's registration.
    `entry_id` (a tracking backlog entry's): tagged on each run, and a run already logged under it
    (a kill came before the backlog was rewritten) is not logged again."""
    try:
        definition = stage(name)
        tags = tracking.entry_tags(entry_id)
        if not tracking.tracked(ws, name, entry_id):
            with tracking.stage_run(ws, name, definition.param_values(params.model_dump(mode="json")), tags=tags):
                tracking.log_metrics(result.get("metrics", {}))
                tracking.log_artifacts([ws.root / path for path in definition.logged])
        if name == "evaluate" and not tracking.tracked(ws, "register", entry_id):
            result["model_version"] = _register(params, ws, result, tags)
    except LmeraserError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds: one sentence, the traceback under --debug
        from lmeraser.errors import reason  # its first line, a tracking URI's credentials stripped

        raise LmeraserError(f"MLflow tracking of stage {name} failed ({shown(reason(error), 300)})") from error


# MLflow calls go over the network when the tracking server is remote: retried (a retry may
# leave one extra failed MLflow run, never a missing one).
track_stage_task = task(
    track_stage, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], task_run_name="track-{name}"
)


def timestamped_run_name() -> str:
    """`<stage>-<UTC time>`: readable in the Prefect UI (Prefect's default is two random words)."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    return f"{flow_run.flow_name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def _register(params: Params, ws: Workspace, result: dict, tags: dict | None = None) -> int:
    """Log the served model as an MLflow pyfunc and register it as `lmeraser@production`, when it
    changed (a version per served bundle, never per run)."""
    example = ws.split("test").images[:8]
    with tracking.stage_run(
        ws, "register", {"seed": params.seed, **stage("train").param_values(params.model_dump(mode="json"))}, tags=tags
    ) as run:
        tracking.log_metrics(result["metrics"])
        description = f"test accuracy {result['metrics']['accuracy']:.4f}"
        return tracking.register_serving_model(ws, run.info.run_id, example, description, get_run_logger().info)


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
    with untagged_task_runs():
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
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": params.runtime.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


def map_jobs_for(params: Params, root: str, params_file: str):
    """How a stage's clusters train under runtime.executor: mapped tasks in threads of this flow,
    or the `train-clusters` subflow on Dask."""
    if params.runtime.executor == "threads":
        return _train_in_tasks

    def on_dask(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
        absolute = str(Path(root).resolve() / params_file)
        flow_with_dask = train_clusters.with_options(task_runner=dask_runner(params))
        return flow_with_dask(
            str(Path(root).resolve()), absolute, [job.cluster for job in jobs], [job.key for job in jobs]
        )

    return on_dask
