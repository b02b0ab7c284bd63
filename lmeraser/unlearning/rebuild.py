"""An unlearning batch's rebuild, in this process.

Every stage on the serving path whose inputs changed (as DVC itself sees it: `dvc status`) runs
through the stage registry, the same function `dvc repro` runs through the CLI, in pipeline order;
then DVC records it in dvc.lock (`dvc commit`), so that afterwards `dvc status` is clean and
`dvc repro` a no-op. It saves a Python process, its imports and a Prefect flow run per stage,
which on the digits demo cost more than the training itself.
"""

from __future__ import annotations

from collections.abc import Callable

from lmeraser.config import Params
from lmeraser.errors import ConfigError
from lmeraser.pipeline.train import train_in_threads
from lmeraser.stages import upstream
from lmeraser.versioning import dvc_repo
from lmeraser.workspace import Workspace


def _changes(repo, name: str) -> list:
    """What `dvc status` says changed in stage `name` (empty: up to date)."""
    return [entry for entries in repo.status(targets=[name]).values() for entry in entries]


def stale_stages(ws: Workspace, target: str) -> list[str]:
    """The stages up to `target` whose inputs (deps, params, command) changed since DVC last
    recorded them (`dvc status`); a changed output alone does not count (the purge edits the
    persisted prompt store, and the train stage repairs a damaged one by content key).

    Args:
        ws: the workspace (a DVC repository).
        target: the last stage to check (`SERVING_TARGET` for a batch); the stages before it are checked too.
    """
    with dvc_repo(ws.root) as repo:
        return [
            definition.name
            for definition in upstream(target)
            if any(not (isinstance(e, dict) and set(e) <= {"changed outs"}) for e in _changes(repo, definition.name))
        ]


def record_stage(ws: Workspace, name: str) -> None:
    """Record stage `name`'s current outputs in dvc.lock (`dvc commit NAME`), after a step edited them.

    Args:
        ws: the workspace (a DVC repository).
        name: the stage whose outputs are recorded (the purge records `train`, whose prompt store it edited).
    """
    with dvc_repo(ws.root) as repo:
        repo.commit(name, force=True)


def check_executor(params: Params, map_jobs: Callable | None) -> None:
    """runtime.executor dask trains through Prefect's Dask task runner, which only the flows hold.

    Args:
        params: the params whose `runtime.executor` is checked.
        map_jobs: how the clusters train (the flow passes Dask's); None: on threads, refused unless `runtime.executor`
            is threads.
    """
    if map_jobs is None and params.runtime.executor != "threads":
        raise ConfigError(
            "runtime.executor dask trains through Prefect's Dask task runner: "
            "run the batch with `lmeraser unlearn` (the unlearn flow)."
        )


def reproduce(
    ws: Workspace,
    params: Params,
    target: str,
    log=print,
    after_stage: Callable[[str, dict], None] | None = None,
    map_jobs: Callable | None = None,
) -> list[str]:
    """Run and record every changed stage up to `target`; the names of those that ran. Clusters
    train with `map_jobs`, by default on runtime.workers threads (as the flow's task runner
    does); runtime.executor dask needs the flow's (Prefect's Dask task runner).

    Args:
        ws: the workspace (a DVC repository).
        params: the checked params the stages read.
        target: the last stage to bring up to date (its upstream runs first where changed).
        log: where progress lines go.
        after_stage: called with (stage, summary) after each stage that ran (MLflow tracking).
        map_jobs: how the train stage's clusters train, when not on threads.
    """
    check_executor(params, map_jobs)
    ran = []
    # Absolute paths: the stages run while dvc_repo has the workspace as current directory.
    ws = Workspace(ws.root.resolve(), ws.params_file.resolve())
    with dvc_repo(ws.root) as repo:
        for definition in upstream(target):
            if not _changes(repo, definition.name):
                continue
            log(f"rebuild: stage {definition.name}")
            options = (
                {"map_jobs": map_jobs or train_in_threads(params.runtime.workers)} if definition.name == "train" else {}
            )
            if definition.name == "validate":
                options = {"changed_only": True}  # the rows the batch changed; `dvc repro` checks every row
            result = definition.function(params, ws, log, **options)
            repo.commit(definition.name, force=True)
            ran.append(definition.name)
            if after_stage is not None:
                after_stage(definition.name, result)
    return ran
