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
from lmeraser.errors import LmeraserError
from lmeraser.unlearning.exact import STEPS, UnlearnBatch, process_pending


@task(cache_policy=NO_CACHE, task_run_name="{step}")
def unlearn_step(batch: UnlearnBatch, step: str) -> dict:
    return batch.run(step)


@flow(name="unlearn", log_prints=True)
def unlearn(root: str = ".") -> dict | None:
    log = get_run_logger().info
    try:
        result = process_pending(Path(root), log, run_step=lambda batch, step: unlearn_step(batch, step))
    except LmeraserError as error:
        return Failed(message=str(error))
    if result is not None:
        with tracking.stage_run(Path(root), "unlearn", {"batch_id": result["batch_id"], "method": "exact"}, tags={"lmeraser.record": str(result["record"])}):
            tracking.log_metrics({"clusters_rebuilt": len(result["rebuilt"]), "scan_hits": result["verification"]["scan"]["hits"]})
    return result


@flow(name="influence-unlearn", log_prints=True)
def influence_unlearn(root: str = ".") -> dict | None:
    """The influence update for every request submitted with `--method influence` (approximate;
    the exact rebuild stays queued for `unlearn`)."""
    from lmeraser.unlearning.approximate import approximate_pending  # torch: only this flow needs it

    log = get_run_logger().info
    try:
        result = approximate_pending(Path(root), log)
    except LmeraserError as error:
        return Failed(message=str(error))
    if result is not None:
        with tracking.stage_run(Path(root), "unlearn", {"batch_id": f"record-{result['record']}", "method": "influence"}, tags={"lmeraser.record": str(result["record"])}):
            tracking.log_metrics({"clusters_edited": len(result["clusters"]), "influence_seconds": result["seconds"],
                                  "cg_relative_residual_max": max(r["cg_relative_residual"] for r in result["reports"])})
    return result


__all__ = ["unlearn", "influence_unlearn", "STEPS"]
