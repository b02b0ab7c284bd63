"""MLflow tracking: one run per stage, params + metrics + artifacts, and the model registry.

Defaults to a SQLite backend (`mlflow.db`) and a local artifact root (`mlartifacts/`) in the
workspace; `MLFLOW_TRACKING_URI` points it at any tracking server instead. MLflow is imported
lazily so the core library never depends on it.

The default store belongs to its workspace (`ensure_store`):
- it is created and migrated in a temporary file beside `mlflow.db` and linked into place only
  once complete, so a process killed while MLflow creates it leaves no half-made store (the
  temporary file of a dead creator is removed by the next one); a half-made store left by an
  earlier version (schema not at MLflow's head, nothing logged in it) is rebuilt;
- the absolute artifact locations MLflow records (experiments, runs, logged models, model
  versions) are checked against the workspace: in a copied or moved workspace, those pointing into
  the old workspace's `mlartifacts/` are rewritten to this one's, so the copy never logs into, nor
  purges from, the original. A store elsewhere is used only when `MLFLOW_TRACKING_URI` says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from lmeraser.errors import LmeraserError, shown
from lmeraser.failpoints import failpoint
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


# Every column where MLflow records an artifact location (absolute: a file:// URI or a path).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
# Rows that mean a store holds something (the Default experiment, id 0, is made with the store).
_CONTENT_QUERIES = (
    "SELECT 1 FROM runs LIMIT 1",
    "SELECT 1 FROM registered_models LIMIT 1",
    "SELECT 1 FROM model_versions LIMIT 1",
    "SELECT 1 FROM logged_models LIMIT 1",
    "SELECT 1 FROM experiments WHERE experiment_id != 0 LIMIT 1",
)


def ensure_store(ws: Workspace, create: bool = True) -> None:
    """Make the workspace's default store usable before MLflow opens it: remove what a killed
    creator left, rebuild a half-made store, create a missing one (when `create`) atomically,
    and point artifact locations recorded for a copied workspace's original at this workspace.
    Nothing to do when `MLFLOW_TRACKING_URI` names another store."""
    if tracking_uri(ws) != default_tracking_uri(ws):
        return
    db = ws.mlflow_db
    _remove_unfinished_stores(db)
    if db.exists() and not _complete(db):
        for path in _sqlite_files(db):
            path.unlink(missing_ok=True)
    if not db.exists():
        if not create:
            return
        _create_store(ws)
    _relocate(ws)


def _sqlite_files(db: Path) -> list[Path]:
    return [db, *(db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm"))]


def _remove_unfinished_stores(db: Path) -> None:
    """Delete the temporary stores (`.mlflow.db.<pid>.<random>.tmp`, and their SQLite journals)
    of creators that are no longer running."""
    for tmp in db.parent.glob(f".{db.name}.*.tmp"):
        pid = tmp.name[len(db.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            for path in _sqlite_files(tmp):
                path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _complete(db: Path) -> bool:
    """Whether `db` is a complete store (schema at MLflow's head). A store not at the head that
    holds nothing is half-made (False); one that holds runs or models is refused in one sentence:
    it needs MLflow's own upgrade, never a rebuild."""
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = (
                con.execute("SELECT version_num FROM alembic_version").fetchone()
                if "alembic_version" in tables
                else None
            )
            version = version[0] if version else None
            if version == _head_revision():
                return True
            holds = False
            for query in _CONTENT_QUERIES:
                if query.split()[3] in tables and con.execute(query).fetchone():
                    holds = True
    except sqlite3.DatabaseError as error:
        raise LmeraserError(
            f"{db}: not a readable MLflow SQLite store ({shown(error, 120)}); restore it or move it aside."
        ) from None
    if holds:
        raise LmeraserError(
            f"{db}: the MLflow store's schema is at revision {version or 'none'}, "
            f"not at this MLflow's {_head_revision()}; "
            f"back it up, then run `mlflow db upgrade sqlite:///{db.resolve()}`."
        )
    return False


def _create_store(ws: Workspace) -> None:
    """Create and migrate a new store in a temporary file beside `mlflow.db`, make the experiment,
    then link it into place (never over a store another process made meanwhile)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    _quiet_mlflow()
    db = ws.mlflow_db
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{db.name}.{os.getpid()}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    uri = f"sqlite:///{tmp}"
    location = ws.mlflow_artifacts.resolve().as_uri()
    try:
        store = SqlAlchemyStore(uri, location)
        try:
            failpoint("mlflow:store-initialized")
            store.create_experiment(EXPERIMENT, artifact_location=location)
        finally:
            store.engine.dispose()
            SqlAlchemyStore._engine_map.pop(uri, None)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        failpoint("mlflow:store-complete")
        with contextlib.suppress(FileExistsError):  # another process made it first: use that one
            os.link(tmp, db)
        with contextlib.suppress(OSError):
            dir_fd = os.open(db.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        for path in _sqlite_files(tmp):
            path.unlink(missing_ok=True)


def _relocate(ws: Workspace) -> None:
    """Point the locations a copied or moved workspace's store recorded in its original's
    `mlartifacts/` at this workspace's. A location configured elsewhere is left as it is."""
    expected = ws.mlflow_artifacts.resolve().as_uri()
    with contextlib.closing(sqlite3.connect(ws.mlflow_db, timeout=30, isolation_level=None)) as con:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        if row is None or row[0] == expected:
            return
        found = str(row[0])
        suffix = "/" + ws.mlflow_artifacts.name
        if not found.startswith("file://") or not found.endswith(suffix):
            return
        old_uri, new_uri = found[: -len(suffix)] + "/", expected[: -len(suffix)] + "/"
        prefixes = [(old_uri, new_uri), (unquote(urlparse(old_uri).path), unquote(urlparse(new_uri).path))]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        con.execute("BEGIN IMMEDIATE")
        try:
            for table, column in LOCATION_COLUMNS:
                if table not in tables:
                    continue
                for old, new in prefixes:
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",  # noqa: S608 - fixed names
                        (new, len(old) + 1, len(old), old),
                    )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _mlflow(ws: Workspace):
    import mlflow

    _quiet_mlflow()
    ensure_store(ws)
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

    mlflow.log_metrics(
        {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(
                str(path), artifact_path=f"{artifact_path}/{path.name}" if artifact_path else path.name
            )
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def artifact_locations(ws: Workspace) -> dict[str, str]:
    """Where this tracking store keeps artifacts, as MLflow itself reports it: every experiment's
    artifact location (runs and logged models live below it). Nothing is created."""
    _quiet_mlflow()
    ensure_store(ws, create=False)
    if tracking_uri(ws) == default_tracking_uri(ws) and not ws.mlflow_db.exists():
        return {}
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri(ws))
    # Every page, and deleted experiments too: their artifacts stay until the server's `mlflow gc`.
    locations, token = {}, None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        for e in page:
            locations[f"mlflow experiment '{e.name}'" + (" (deleted)" if e.lifecycle_stage == "deleted" else "")] = (
                e.artifact_location
            )
        token = page.token
        if not token:
            return locations


def _quiet_mlflow() -> None:
    import mlflow  # noqa: F401 - it sets its logger to INFO when first imported

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


# -- tracking after the record ---------------------------------------------------------------
#
# An unlearning batch's rebuilt stages are tracked (an MLflow run each; the served model
# registered) after the batch's record is signed: tracking is bookkeeping, and a slow or
# unreachable tracking server must not delay or fail an erasure. What the batch ran waits in a
# backlog file under audit/batches/ until it is tracked, so a kill or an outage loses nothing: the
# next `lmeraser unlearn` (or the service's worker) tracks it first. What cannot wait stays in the
# batch: the purge deletes registered versions that served a superseded prompt (a served copy).


def backlog_file(ws: Workspace) -> Path:
    return ws.batches / "tracking-backlog.json"


BACKGROUND_LOG_MAX_BYTES = 1 << 20  # then the log becomes tracking.log.1 and a new one starts


def background_log(ws: Workspace) -> Path:
    """The output of the `lmeraser track` processes a command left tracking in the background
    (runtime.tracking: background); not under audit/batches/, whose files mean work is pending."""
    return ws.root / ".lmeraser" / "tracking.log"


def backlog_stages(ws: Workspace) -> list[str]:
    """The stages whose runs wait in the backlog (empty: none, or no backlog)."""
    if not backlog_file(ws).exists():
        return []
    entries = _read_backlog(backlog_file(ws))
    return ["unreadable backlog"] if entries is None else [entry["stage"] for entry in entries]


def _read_backlog(path: Path) -> list[dict] | None:
    """The backlog's entries; None when the file is not a backlog (damaged, altered)."""
    from lmeraser.io import read_json

    try:
        entries = read_json(path)["stages"]
    except (LmeraserError, KeyError, TypeError, ValueError, OSError):
        return None
    if isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("stage"), str) for e in entries):
        return entries
    return None


def _warn(message: str) -> None:
    print(message, file=sys.stderr)  # stderr: a command's --json document stays alone on stdout


def _entries_to_extend(ws: Workspace, log) -> list[dict]:
    """The backlog's entries, to add one to. One that cannot be read (altered, damaged) is moved
    to .lmeraser/ for a person to look at, with a warning, and a new backlog starts: bookkeeping
    never stops an erasure."""
    import time

    path = backlog_file(ws)
    if not path.exists():
        return []
    entries = _read_backlog(path)
    if entries is not None:
        return entries
    aside = ws.root / ".lmeraser" / f"tracking-backlog.unreadable-{time.strftime('%Y%m%dT%H%M%S')}.json"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    log(
        f"warning: {ws.relative(path)} was not a tracking backlog (altered?); moved to {ws.relative(aside)} "
        "for a person to look at: the runs it named are not tracked from it"
    )
    return []


ENTRY_TAG = "lmeraser.backlog_entry"  # on every run tracked from the backlog: the entry's id


def defer_run(
    ws: Workspace, stage: str, metrics: dict, run: dict | None = None, entry_id: str | None = None, log=_warn
) -> None:
    """Add a run to the backlog: a stage the batch ran (its metrics; the stage's small output files
    are read when it is tracked) or, with `run` ({"params", "tags"}), the batch's own run.

    Args:
        ws: the workspace whose backlog is extended.
        stage: the stage (or `unlearn`, the batch's own run).
        metrics: the run's metrics.
        run: the params and tags of a batch's own run.
        entry_id: the entry's id (a batch's `<batch id>/<stage>`); an entry of that id already waiting is replaced, and
            one already tracked is not tracked again. Default: a new id.
        log: where a warning goes (a backlog that cannot be read is moved aside).
    """
    import uuid

    from lmeraser.io import atomic_write_json

    path = backlog_file(ws)
    entry = {
        "id": entry_id or uuid.uuid4().hex,
        "stage": stage,
        "metrics": json.loads(json.dumps(metrics, default=float)),
    }
    if run is not None:
        entry["run"] = json.loads(json.dumps(run, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    with ws.lock("tracking"):  # an influence update and an exact batch may finish at once
        entries = _entries_to_extend(ws, log)
        atomic_write_json(path, {"stages": [e for e in entries if e.get("id") != entry["id"]] + [entry]})


def entry_tags(entry_id: str | None) -> dict:
    """The tag that names a run's backlog entry (none for a run outside the backlog)."""
    return {ENTRY_TAG: entry_id} if entry_id else {}


def tracked(ws: Workspace, stage: str, entry_id: str | None) -> bool:
    """Whether MLflow already holds a finished run of backlog entry `entry_id` for `stage` (a
    process killed after logging it, before the backlog was rewritten); False for an entry
    without an id. A run of the entry left unfinished does not count: MLflow creates a run, with
    its tags, before anything is logged in it, so a tracker killed while logging leaves it
    RUNNING (marked FAILED here: the caller holds the tracking lock, so no one else logs it) and
    a store that failed mid-run leaves it FAILED; the entry is logged again. A retry may leave an
    extra failed run, never a missing one."""
    if not entry_id:
        return False
    mlflow = _mlflow(ws)
    found = mlflow.search_runs(  # in the workspace's experiment, which _mlflow sets
        filter_string=f"tags.`lmeraser.stage` = '{stage}' and tags.`{ENTRY_TAG}` = '{entry_id}'",
        max_results=100,
        output_format="list",
    )
    if any(run.info.status == "FINISHED" for run in found):
        return True
    for run in found:
        if run.info.status == "RUNNING":
            mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return False


def track_backlog(ws: Workspace, track, log=print) -> dict:
    """Track every backlog entry in order with `track(entry)`; an entry that
    fails stays, with the ones after it, for the next run. Never raises: what it returns and logs
    says what was tracked and what waits."""
    with ws.lock("tracking"):  # one process tracks an entry, once
        return _track_backlog(ws, track, log)


def _track_backlog(ws: Workspace, track, log) -> dict:
    from lmeraser.errors import reason
    from lmeraser.io import atomic_write_json

    path = backlog_file(ws)
    if not path.exists():
        return {"tracked": [], "waiting": []}
    entries = _read_backlog(path)
    if entries is None:
        log(
            f"warning: {ws.relative(path)} is not a tracking backlog (altered?); left for a person to look at, "
            "nothing tracked from it (the next batch moves it to .lmeraser/ and starts a new one)"
        )
        return {"tracked": [], "waiting": ["unreadable backlog"]}
    done = []
    for i, entry in enumerate(entries):
        try:
            track(entry)
        except Exception as error:  # noqa: BLE001 - tracking never fails a signed erasure
            left = entries[i:]
            atomic_write_json(path, {"stages": left})
            log(
                f"warning: MLflow tracking of stage {entry['stage']} failed "
                f"({shown(error if isinstance(error, LmeraserError) else reason(error), 300)}); "
                f"{len(left)} run(s) wait in {ws.relative(path)} for `lmeraser track` (or the next batch)"
            )
            return {"tracked": done, "waiting": [e["stage"] for e in left]}
        done.append(entry["stage"])
        if i + 1 < len(entries):  # a kill from here on leaves only what is not tracked yet
            atomic_write_json(path, {"stages": entries[i + 1 :]})
    path.unlink()
    return {"tracked": done, "waiting": []}


ALIAS = "production"
SERVED_TAG = "lmeraser.served_sha256"  # fingerprint of the served bundle a version holds
PROMPTS_ARTIFACT = "served_prompts.json"  # in the version's run: sha256 of every prompt it serves


def serving_bundle(ws: Workspace, into: Path) -> dict[str, str]:
    """Copy what serving reads (a miniature workspace) into `into`; its files' sha256 by path."""
    import shutil

    from lmeraser.io import atomic_write_json, sha256_file
    from lmeraser.overlay import Overlay

    index = ws.prompt_index()
    bundle = Workspace(into)
    files = [ws.backbone_weights, ws.backbone_meta_file, ws.prototypes_file, ws.prompt_index_file]
    files += [ws.root / path for path, _ in Overlay(ws).served(index).values()]
    out = {}
    for path in files:
        target = bundle.root / ws.relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        out[ws.relative(path)] = sha256_file(target)
    # The overlay as serving reads it: the active entries' artifacts only. The edits an entry
    # records (sample ids, request ids, times) stay in the workspace, where the exact batch that
    # makes them exact deletes them; a registered model outlives that batch and must name none.
    active = Overlay(ws).active(index)
    if active:
        served_fields = ("key", "sha256", "base_key", "base_sha256", "approximate")
        atomic_write_json(
            bundle.overlay_file,
            {"clusters": {c: {k: e[k] for k in served_fields if k in e} for c, e in sorted(active.items())}},
        )
        out[ws.relative(ws.overlay_file)] = sha256_file(bundle.overlay_file)
    return out


def register_serving_model(ws: Workspace, run_id: str, example: np.ndarray, description: str, log=print) -> int:
    """Log the served model as a pyfunc (models from code), register it and point the alias
    `production` at it; when the served bundle is unchanged, keep the current version."""
    import tempfile

    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from lmeraser import serving_pyfunc  # its predict has type hints: MLflow asks for none
    from lmeraser.io import sha256_json

    client = MlflowClient()
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except Exception:  # noqa: BLE001 - MLflow raises a generic RestException when absent
        client.create_registered_model(
            REGISTERED_MODEL, description="Clustered prompts on a frozen public backbone (LMEraser)."
        )
    with tempfile.TemporaryDirectory() as tmp:
        files = serving_bundle(ws, Path(tmp) / "bundle")
        fingerprint = sha256_json(files)
        current = _production(client)
        if current is not None and current.tags.get(SERVED_TAG) == fingerprint:
            log(f"served model unchanged: version {current.version} stays '{ALIAS}'")
            return int(current.version)
        for version in client.search_model_versions(f"name='{REGISTERED_MODEL}'"):
            if version.tags.get(SERVED_TAG) == fingerprint:  # registered before a kill, the alias not yet moved
                client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version.version)
                log(f"registered model '{REGISTERED_MODEL}' version {version.version} (registered before) as '{ALIAS}'")
                return int(version.version)
        from lmeraser.inference import ServingModel

        predictions, _ = ServingModel.load(Workspace(Path(tmp) / "bundle")).predict(example)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=serving_pyfunc.__file__,
            artifacts={"bundle": str(Path(tmp) / "bundle")},
            signature=infer_signature(example, predictions),
            input_example=example,
            # Explicit: inferring them would load the model in a subprocess.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "timm",
                "faiss-cpu",
                "safetensors",
                "numpy",
                "mlflow",
            ],
        )
    prompts = sorted({sha for path, sha in files.items() if path.endswith(".safetensors") and "/prompts/" in path})
    mlflow.log_dict({"prompt_sha256": prompts}, PROMPTS_ARTIFACT)
    # model_id: a tracking server checks that the source belongs to it (a SQLite store does not).
    version = client.create_model_version(
        REGISTERED_MODEL,
        source=info.model_uri,
        run_id=run_id,
        description=description,
        tags={SERVED_TAG: fingerprint},
        model_id=info.model_id,
    )
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
            with tempfile.TemporaryDirectory(prefix="lmeraser-registry-") as scratch:  # nothing left in /tmp per batch
                served = client.download_artifacts(version.run_id, PROMPTS_ARTIFACT, dst_path=scratch)
                prompts = set(json.loads(Path(served).read_text())["prompt_sha256"])
        except Exception as error:  # noqa: BLE001 - a version logged before the prompts list existed
            unreachable.append(f"version {version.version}: {error.__class__.__name__}")
            continue
        if not prompts & superseded:
            continue
        model = (
            client.get_logged_model(version.source.removeprefix("models:/"))
            if version.source.startswith("models:/m-")
            else None
        )
        location = model.artifact_location if model is not None else version.source
        get_artifact_repository(location).delete_artifacts()
        client.delete_model_version(REGISTERED_MODEL, version.version)
        deleted.append(int(version.version))
    if deleted:
        log(f"registry: deleted version(s) {deleted}, which served superseded prompts")
    return {"versions_deleted": deleted, "not_searched": unreachable}
