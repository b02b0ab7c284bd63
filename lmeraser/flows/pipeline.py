"""`train_pipeline`: every stage in order, for scheduled production retraining, after the pending
requests are finished (it runs the `unlearn` flow first)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from lmeraser import suppression
from lmeraser.errors import LmeraserError
from lmeraser.flows.common import timestamped_run_name, workspace_and_params
from lmeraser.flows.stages import run_stage
from lmeraser.flows.unlearn import run_unlearn
from lmeraser.journal import Journal
from lmeraser.stages import STAGES


def _before_retraining(root: str, params_file: str) -> State | None:
    _, ws = workspace_and_params(root, params_file)
    try:
        pending = Journal(ws).pending() or (ws.batches.is_dir() and any(ws.batches.iterdir()))
        if pending:
            get_run_logger().info("finishing the pending requests before retraining")
            state = run_unlearn(root, params_file)
            if state.is_failed():
                return Failed(
                    message=(
                        "the pending requests must be finished before retraining, "
                        f"and their batch failed: {state.message}"
                    )
                )
        bad = suppression.violations(ws)
    except LmeraserError as error:
        return Failed(message=str(error))
    if bad:
        return Failed(
            message=(
                f"data/ holds {len(bad)} sample(s) the suppression list erased or corrected ({', '.join(bad[:3])}); "
                "run `lmeraser data init`, which applies it, before retraining."
            )
        )
    return None


@flow(name="train_pipeline", log_prints=True, flow_run_name=timestamped_run_name)
def train_pipeline(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Every stage in order, for scheduled production retraining (see lmeraser/flows/serve.py).

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
