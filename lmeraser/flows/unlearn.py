"""The `unlearn` flow: every pending forget/rectify request as one batch, each step a task; and
the `influence-unlearn` flow: the approximate influence update for requests that asked for it.

The steps and their crash-safe bookkeeping live in lmeraser.unlearning.exact; this only
orchestrates and tracks them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from lmeraser import tracking
from lmeraser.config import load_params
from lmeraser.errors import LmeraserError
from lmeraser.flows.common import (
    map_jobs_for,
    timestamped_run_name,
    track_stage,
    track_stage_task,
    untagged_task_runs,
)
from lmeraser.unlearning.exact import UnlearnBatch, process_pending
from lmeraser.workspace import Workspace


@task(cache_policy=NO_CACHE, task_run_name="{step}")
def unlearn_step(batch: UnlearnBatch, step: str) -> dict:
    return batch.run(step)


# Steps that talk to the network (purge: `dvc push` and `dvc gc --cloud` against every remote) are
# retried: each step is idempotent (a step finishes or redoes its work), so a retry is safe.
NETWORK_STEPS = {"purge"}


def step_task(step: str):
    return unlearn_step.with_options(retries=2, retry_delay_seconds=[5, 30]) if step in NETWORK_STEPS else unlearn_step


def _unlearn_run_name() -> str:
    """`unlearn-<batch id>` (a resumed batch keeps its name), `unlearn-idle` when nothing is pending."""
    from prefect.runtime import flow_run

    from lmeraser.unlearning.exact import next_batch_id

    parameters = flow_run.parameters
    root = Path(parameters.get("root", "."))
    try:
        batch = next_batch_id(
            Workspace(root, root / parameters.get("params_file", "params.yaml")), parameters.get("max_requests")
        )
    except LmeraserError:
        batch = None
    return f"unlearn-{batch or 'idle'}"


def run_unlearn(
    root: str, params_file: str, git_commit: bool = True, max_requests: int | None = None, track: bool = True
):
    """The `unlearn` flow's final state, the run tagged `lmeraser` and `unlearn` (CLI, service worker, retraining)."""
    from prefect import tags

    with tags("lmeraser", "unlearn"):
        return unlearn(
            root=root,
            params_file=params_file,
            git_commit=git_commit,
            max_requests=max_requests,
            track=track,
            return_state=True,
        )


@flow(name="unlearn", log_prints=True, flow_run_name=_unlearn_run_name)
def unlearn(
    root: str = ".",
    params_file: str = "params.yaml",
    git_commit: bool = True,
    max_requests: int | None = None,
    track: bool = True,
) -> dict | None:
    """The pending requests as one batch (the oldest `max_requests`, or all); the stages its
    rebuild runs are tracked like the pipeline's: after the record, or with `track` false left in
    the backlog for the caller (the service's worker tracks it when idle: `track_now`)."""
    with untagged_task_runs():  # no concurrency slot asked of the server per task run (flows/common.py)
        ws = Workspace(Path(root), Path(root) / params_file)
        try:
            params = load_params(ws.params_file)
            # What an earlier batch left untracked (killed, or the server was down), before this batch
            # changes the stage files those runs log.
            track_waiting(ws, params, retry=False)  # one try: an erasure never waits on the tracking server
            result = process_pending(
                ws,
                get_run_logger().info,
                run_step=lambda batch, step: step_task(step)(batch, step),
                git_commit=git_commit,
                after_stage=lambda name, summary, entry_id: tracking.defer_run(
                    ws, name, summary.get("metrics", {}), entry_id=entry_id, log=get_run_logger().warning
                ),
                max_requests=max_requests,
                map_jobs=map_jobs_for(params, root, params_file) if params.runtime.executor == "dask" else None,
            )
        except LmeraserError as error:
            return Failed(message=str(error))
        if result is not None:
            run = {
                "params": {"batch_id": result["batch_id"], "method": "exact"},
                "tags": {"lmeraser.record": str(result["record"])},
            }
            tracking.defer_run(
                ws,
                "unlearn",
                {"clusters_rebuilt": len(result["rebuilt"]), "scan_hits": result["verification"]["scan"]["hits"]},
                run,
                entry_id=f"{result['batch_id']}/unlearn",
                log=get_run_logger().warning,
            )
            result["tracking"] = (
                track_waiting(ws, params) if track else {"tracked": [], "waiting": tracking.backlog_stages(ws)}
            )
        return result


def track_now(root: str, params_file: str) -> dict:
    """The `track` flow, its run tagged `lmeraser` and `track`: what the service's worker runs
    between batches, and `lmeraser track` (a command's background tracker included)."""
    from prefect import tags

    with tags("lmeraser", "track"):
        return track(root=root, params_file=params_file)


@flow(name="track", log_prints=True, flow_run_name=timestamped_run_name)
def track(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Log the tracking backlog to MLflow (each run retried): what batches left after their records."""
    with untagged_task_runs():  # no concurrency slot asked of the server per task run (flows/common.py)
        ws = Workspace(Path(root), Path(root) / params_file)
        return track_waiting(ws, load_params(ws.params_file))


def track_waiting(ws: Workspace, params, retry: bool = True, log=None) -> dict:
    """Track the backlog (lmeraser/tracking.py: after the record, never failing it): a rebuilt
    stage as the pipeline tracks it, with the served model's registration after evaluate; a
    batch's own run with its params and tags. `retry`: the stage task's retries (after a record);
    `log`: by default the flow run's logger."""

    def track(entry: dict) -> None:
        if "run" in entry:
            if tracking.tracked(ws, entry["stage"], entry.get("id")):
                return  # logged before a kill, not yet taken off the backlog
            tags = {**entry["run"]["tags"], **tracking.entry_tags(entry.get("id"))}
            with tracking.stage_run(ws, entry["stage"], entry["run"]["params"], tags=tags):
                tracking.log_metrics(entry["metrics"])
        else:
            (track_stage_task if retry else track_stage)(
                entry["stage"], params, ws, {"metrics": entry["metrics"]}, entry.get("id")
            )

    return tracking.track_backlog(ws, track, log or get_run_logger().info)


@flow(name="influence-unlearn", log_prints=True, flow_run_name=timestamped_run_name)
def influence_unlearn(root: str = ".", params_file: str = "params.yaml") -> dict | None:
    """The influence update for every request submitted with `--method influence` (approximate;
    the exact rebuild stays queued for `unlearn`)."""
    from lmeraser.unlearning.influence_update import influence_pending  # torch: only this flow needs it

    with untagged_task_runs():  # no concurrency slot asked of the server per task run (flows/common.py)
        ws = Workspace(Path(root), Path(root) / params_file)
        try:
            result = influence_pending(ws, get_run_logger().info)
        except LmeraserError as error:
            return Failed(message=str(error))
        if result is not None:
            run = {
                "params": {"batch_id": f"record-{result['record']}", "method": "influence"},
                "tags": {"lmeraser.record": str(result["record"])},
            }
            residual = max(r["cg_relative_residual"] for r in result["reports"])
            metrics = {
                "clusters_edited": len(result["clusters"]),
                "influence_seconds": result["seconds"],
                "cg_relative_residual_max": residual,
            }
            tracking.defer_run(ws, "unlearn", metrics, run, log=get_run_logger().warning)
            result["tracking"] = track_waiting(ws, load_params(ws.params_file))
        return result


def batch_runner(ws: Workspace, git_commit: bool = True):
    """What the service's worker runs for a batch (its `run_batch`): the `unlearn` flow, as
    `lmeraser unlearn` runs it (retried steps), with its MLflow runs left in the backlog for the
    worker to track when idle."""

    def run(max_requests: int) -> dict | None:
        state = run_unlearn(
            str(ws.root.resolve()), str(ws.params_file.resolve()), git_commit, max_requests, track=False
        )
        if state.is_failed():
            raise LmeraserError(state.message or "the unlearn flow failed")
        return state.result()

    return run


def backlog_tracker(ws: Workspace):
    """What the service's worker runs when idle (its `run_tracking`): the `track` flow, which
    tracks the backlog as `lmeraser unlearn` does (retried MLflow runs)."""

    def run() -> dict:
        return track_now(str(ws.root.resolve()), str(ws.params_file.resolve()))

    return run
