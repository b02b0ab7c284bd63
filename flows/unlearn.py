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
from lmeraser.unlearning.exact import UnlearnBatch, process_pending
from lmeraser.workspace import Workspace


@task(cache_policy=NO_CACHE, task_run_name="{step}")
def unlearn_step(batch: UnlearnBatch, step: str) -> dict:
    return batch.run(step)


@flow(name="unlearn", log_prints=True)
def unlearn(root: str = ".", params_file: str = "params.yaml", git_commit: bool = True) -> dict | None:
    """Every pending request as one batch; the stages its rebuild runs are tracked like the pipeline's."""
    from flows.stages import track_stage

    ws = Workspace(Path(root), Path(root) / params_file)
    try:
        params = load_params(ws.params_file)
        result = process_pending(
            ws,
            get_run_logger().info,
            run_step=lambda batch, step: unlearn_step(batch, step),
            git_commit=git_commit,
            after_stage=lambda name, summary: track_stage(name, params, ws, summary),
        )
    except LmeraserError as error:
        return Failed(message=str(error))
    if result is not None:
        with tracking.stage_run(ws, "unlearn", {"batch_id": result["batch_id"], "method": "exact"}, tags={"lmeraser.record": str(result["record"])}):
            tracking.log_metrics({"clusters_rebuilt": len(result["rebuilt"]), "scan_hits": result["verification"]["scan"]["hits"]})
    return result


@flow(name="influence-unlearn", log_prints=True)
def influence_unlearn(root: str = ".", params_file: str = "params.yaml") -> dict | None:
    """The influence update for every request submitted with `--method influence` (approximate;
    the exact rebuild stays queued for `unlearn`)."""
    from lmeraser.unlearning.approximate import approximate_pending  # torch: only this flow needs it

    ws = Workspace(Path(root), Path(root) / params_file)
    try:
        result = approximate_pending(ws, get_run_logger().info)
    except LmeraserError as error:
        return Failed(message=str(error))
    if result is not None:
        tags = {"lmeraser.record": str(result["record"])}
        with tracking.stage_run(ws, "unlearn", {"batch_id": f"record-{result['record']}", "method": "influence"}, tags=tags):
            residual = max(r["cg_relative_residual"] for r in result["reports"])
            tracking.log_metrics({"clusters_edited": len(result["clusters"]), "influence_seconds": result["seconds"], "cg_relative_residual_max": residual})
    return result
