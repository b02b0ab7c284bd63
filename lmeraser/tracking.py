"""MLflow tracking: one run per stage, params + metrics + artifacts, and the model registry.

Defaults to a SQLite backend (`mlflow.db`) and a local artifact root (`mlartifacts/`) in the
workspace; `MLFLOW_TRACKING_URI` points it at any tracking server instead. MLflow is imported
lazily so the core library never depends on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmeraser.workspace import Workspace

EXPERIMENT = "lmeraser"
REGISTERED_MODEL = "lmeraser"


def default_tracking_uri(ws: Workspace) -> str:
    return f"sqlite:///{ws.mlflow_db.resolve()}"


def tracking_uri(ws: Workspace) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ws)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _mlflow(ws: Workspace):
    import mlflow

    # After the import: mlflow sets its own logger to INFO when it is first imported.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    uri = tracking_uri(ws)
    mlflow.set_tracking_uri(uri)  # (this also exports MLFLOW_TRACKING_URI)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # Our default store keeps artifacts beside it; any other server chooses its own root.
        location = ws.mlflow_artifacts.resolve().as_uri() if uri == default_tracking_uri(ws) else None
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


@contextlib.contextmanager
def stage_run(ws: Workspace, stage: str, params: dict, tags: dict | None = None) -> Iterator[Any]:
    """An MLflow run for one stage; params are flattened (`backbone.epochs`, ...)."""
    mlflow = _mlflow(ws)
    with mlflow.start_run(run_name=stage, tags={"lmeraser.stage": stage, **(tags or {})}) as run:
        flat = {k: ("null" if v is None else v) for k, v in _flatten(params).items()}
        mlflow.log_params(flat)
        yield run


def log_metrics(metrics: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}" if artifact_path else path.name)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def register_model(run_id: str, artifact_path: str, description: str) -> int:
    """Register the logged serving bundle as a new version of the `lmeraser` model."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except Exception:  # noqa: BLE001 - MLflow raises a generic RestException when absent
        client.create_registered_model(REGISTERED_MODEL, description="Clustered prompts on a frozen public backbone (LMEraser).")
    run = client.get_run(run_id)
    version = client.create_model_version(REGISTERED_MODEL, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id, description=description)
    return int(version.version)
