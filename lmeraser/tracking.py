"""MLflow tracking: one run per stage, params + metrics + artifacts, and the model registry.

Defaults to a SQLite backend (`mlflow.db`) and a local artifact root (`mlartifacts/`) in the
workspace; `MLFLOW_TRACKING_URI` points it at any tracking server instead. MLflow is imported
lazily so the core library never depends on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

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

    _quiet_mlflow()
    uri = tracking_uri(ws)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which would make every later workspace of
    # this process use this one's store: keep the user's own setting (or none) in the environment.
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
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


def artifact_locations(ws: Workspace) -> dict[str, str]:
    """Where this tracking store keeps artifacts, as MLflow itself reports it: every experiment's
    artifact location (runs and logged models live below it). Nothing is created."""
    if tracking_uri(ws) == default_tracking_uri(ws) and not ws.mlflow_db.exists():
        return {}
    from mlflow import MlflowClient

    _quiet_mlflow()
    client = MlflowClient(tracking_uri=tracking_uri(ws))
    return {f"mlflow experiment '{e.name}'": e.artifact_location for e in client.search_experiments()}


def _quiet_mlflow() -> None:
    import mlflow  # noqa: F401 - it sets its logger to INFO when first imported

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


ALIAS = "production"
SERVED_TAG = "lmeraser.served_sha256"  # fingerprint of the served bundle a version holds
PROMPTS_ARTIFACT = "served_prompts.json"  # in the version's run: sha256 of every prompt it serves


def serving_bundle(ws: Workspace, into: Path) -> dict[str, str]:
    """Copy what serving reads (a miniature workspace) into `into`; its files' sha256 by path."""
    import shutil

    from lmeraser.io import sha256_file
    from lmeraser.overlay import Overlay

    index = ws.prompt_index()
    bundle = Workspace(into)
    files = [ws.backbone_weights, ws.backbone_meta_file, ws.prototypes_file, ws.prompt_index_file]
    files += [ws.root / path for path, _ in Overlay(ws).served(index).values()]
    if ws.overlay_file.exists():
        files.append(ws.overlay_file)
    out = {}
    for path in files:
        target = bundle.root / ws.relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        out[ws.relative(path)] = sha256_file(target)
    return out


def register_serving_model(ws: Workspace, run_id: str, example: np.ndarray, description: str, log=print) -> int:
    """Log the served model as a pyfunc (models from code), register it and point the alias
    `production` at it; when the served bundle is unchanged, keep the current version."""
    import tempfile

    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from lmeraser import serving_pyfunc
    from lmeraser.io import sha256_json

    client = MlflowClient()
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except Exception:  # noqa: BLE001 - MLflow raises a generic RestException when absent
        client.create_registered_model(REGISTERED_MODEL, description="Clustered prompts on a frozen public backbone (LMEraser).")
    with tempfile.TemporaryDirectory() as tmp:
        files = serving_bundle(ws, Path(tmp) / "bundle")
        fingerprint = sha256_json(files)
        current = _production(client)
        if current is not None and current.tags.get(SERVED_TAG) == fingerprint:
            log(f"served model unchanged: version {current.version} stays '{ALIAS}'")
            return int(current.version)
        from lmeraser.inference import ServingModel

        predictions, _ = ServingModel.load(Workspace(Path(tmp) / "bundle")).predict(example)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=serving_pyfunc.__file__,
            artifacts={"bundle": str(Path(tmp) / "bundle")},
            signature=infer_signature(example, predictions),
            # Explicit: inferring them would load the model in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm", "faiss-cpu", "safetensors", "numpy", "mlflow"],
        )
    prompts = sorted({sha for path, sha in files.items() if path.endswith(".safetensors") and "/prompts/" in path})
    mlflow.log_dict({"prompt_sha256": prompts}, PROMPTS_ARTIFACT)
    version = client.create_model_version(REGISTERED_MODEL, source=info.model_uri, run_id=run_id, description=description, tags={SERVED_TAG: fingerprint})
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version.version)
    log(f"registered model '{REGISTERED_MODEL}' version {version.version} as '{ALIAS}'")
    return int(version.version)


def _production(client):
    try:
        return client.get_model_version_by_alias(REGISTERED_MODEL, ALIAS)
    except Exception:  # noqa: BLE001 - absent alias
        return None


def purge_registry(ws: Workspace, superseded: set[str], log=print) -> dict:
    """Delete every registered version that served a superseded prompt: its logged model's files
    through MLflow's own artifact repository (any store), then the version itself. Returns what
    was deleted and what could not be reached."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    _mlflow(ws)
    client = MlflowClient()
    deleted, unreachable = [], []
    try:
        versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    except Exception:  # noqa: BLE001 - no registry yet
        versions = []
    for version in versions:
        try:
            served = client.download_artifacts(version.run_id, PROMPTS_ARTIFACT)
            prompts = set(json.loads(Path(served).read_text())["prompt_sha256"])
        except Exception as error:  # noqa: BLE001 - a version logged before the prompts list existed
            unreachable.append(f"version {version.version}: {error.__class__.__name__}")
            continue
        if not prompts & superseded:
            continue
        model = client.get_logged_model(version.source.removeprefix("models:/")) if version.source.startswith("models:/m-") else None
        location = model.artifact_location if model is not None else version.source
        get_artifact_repository(location).delete_artifacts()
        client.delete_model_version(REGISTERED_MODEL, version.version)
        deleted.append(int(version.version))
    if deleted:
        log(f"registry: deleted version(s) {deleted}, which served superseded prompts")
    return {"versions_deleted": deleted, "not_searched": unreachable}
