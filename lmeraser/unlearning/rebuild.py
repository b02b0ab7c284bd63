"""An unlearning batch's rebuild, in this process.

Every stage on the serving path whose inputs changed (as DVC itself sees it: `dvc status`) runs
through the stage registry, the same function `dvc repro` runs through the CLI, in pipeline order;
then DVC records them in dvc.lock (`dvc commit`, one write for all), so that afterwards `dvc
status` is clean and `dvc repro` a no-op. It saves a Python process, its imports and a Prefect
flow run per stage, which on the digits demo cost more than the training itself; `dvc.yaml` and
`dvc.lock` are parsed once per step, not once per DVC call.
"""

from __future__ import annotations

from collections.abc import Callable

from lmeraser.config import Params
from lmeraser.errors import ConfigError
from lmeraser.failpoints import failpoint
from lmeraser.pipeline.train import train_in_threads
from lmeraser.stages import upstream
from lmeraser.versioning import dvc_repo, dvc_step
from lmeraser.workspace import Workspace


def _pipeline_stages(repo, names: list[str]) -> dict:
    """The named stages of dvc.yaml as DVC loads them, with their dvc.lock entries: both files
    parsed once (DVC's `status` and `commit` parse them on every call; under a batch's dozen calls
    that was most of DVC's share of a forget)."""
    from dvc.repo import lock_repo

    with lock_repo(repo):
        loaded = {stage.name: stage for stage in repo.stage.load_all()}  # dvc.yaml, as `dvc commit NAME` loads it
    return {name: loaded[name] for name in names}


def _changes(repo, stage) -> list:
    """What `dvc status` says changed in `stage` (empty: up to date). A stage loaded before
    upstream stages ran and were recorded still answers rightly: its status compares the files
    on disk with its own dvc.lock entry, which no other stage's record changes."""
    from dvc.repo import lock_repo

    with lock_repo(repo):
        return [entry for entries in stage.status().values() for entry in entries]


def _record(repo, stages: list) -> None:
    """`dvc commit --force` of `stages` with one write of dvc.lock (and git's autostage, as the
    command does): each stage's outputs into the cache and the run cache, then every entry at once."""
    from dvc.repo import lock_repo

    if not stages:
        return
    with lock_repo(repo), repo.scm_context():
        for stage in stages:
            stage.save()
            stage.commit()
        stages[0].dvcfile.dump_stages(stages, update_pipeline=False)


def stale_stages(ws: Workspace, target: str) -> list[str]:
    """The stages up to `target` whose inputs (deps, params, command) changed since DVC last
    recorded them (`dvc status`); a changed output alone does not count (the purge edits the
    persisted prompt store, and the train stage repairs a damaged one by content key).

    Args:
        ws: the workspace (a DVC repository).
        target: the last stage to check (`SERVING_TARGET` for a batch); the stages before it are checked too.
    """
    with dvc_step(ws.root, "status"), dvc_repo(ws.root) as repo:
        stages = _pipeline_stages(repo, [definition.name for definition in upstream(target)])
        return [
            name
            for name, stage in stages.items()
            if any(not (isinstance(e, dict) and set(e) <= {"changed outs"}) for e in _changes(repo, stage))
        ]


def record_stage(ws: Workspace, name: str) -> None:
    """Record stage `name`'s current outputs in dvc.lock (`dvc commit NAME`), after a step edited them.

    Args:
        ws: the workspace (a DVC repository).
        name: the stage whose outputs are recorded (the purge records `train`, whose prompt store it edited).
    """
    with dvc_step(ws.root, f"commit {name}"), dvc_repo(ws.root) as repo:
        _record(repo, list(_pipeline_stages(repo, [name]).values()))


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
    before_record: Callable[[], None] | None = None,
) -> list[str]:
    """Run and record every changed stage up to `target`; the names of those that ran. Clusters
    train with `map_jobs`, by default on runtime.workers threads (as the flow's task runner
    does); runtime.executor dask needs the flow's (Prefect's Dask task runner).

    Args:
        ws: the workspace (a DVC repository).
        params: the checked params the stages read.
        target: the last stage to bring up to date (its upstream runs first where changed).
        log: where progress lines go.
        after_stage: called with (stage, summary) after each stage ran, before dvc.lock records them.
        map_jobs: how the train stage's clusters train, when not on threads.
        before_record: called once the stages ran, before dvc.lock records them (the batch saves what ran).
    """
    check_executor(params, map_jobs)
    ran = []
    # Absolute paths: the stages run while dvc_repo has the workspace as current directory.
    ws = Workspace(ws.root.resolve(), ws.params_file.resolve())
    with dvc_repo(ws.root) as repo:
        with dvc_step(ws.root, "status"):
            stages = _pipeline_stages(repo, [definition.name for definition in upstream(target)])
        for definition in upstream(target):
            with dvc_step(ws.root, f"status {definition.name}"):
                changed = _changes(repo, stages[definition.name])
            if not changed:
                continue
            log(f"rebuild: stage {definition.name}")
            options = (
                {"map_jobs": map_jobs or train_in_threads(params.runtime.workers)} if definition.name == "train" else {}
            )
            if definition.name == "validate":
                options = {"changed_only": True}  # the rows the batch changed; `dvc repro` checks every row
            result = definition.function(params, ws, log, **options)
            ran.append(definition.name)
            if after_stage is not None:
                after_stage(definition.name, result)
        # Recorded together, once every stage ran (one write of dvc.lock): a batch killed before
        # this runs its changed stages again when it resumes, as `dvc repro` would.
        if ran and before_record is not None:
            before_record()
        failpoint("rebuild:ran")
        with dvc_step(ws.root, f"commit {' '.join(ran)}"):
            _record(repo, [stages[name] for name in ran])
    return ran
