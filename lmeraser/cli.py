"""`lmeraser`: one command per stage and per operation.

Every command that can fail on bad input prints one sentence naming the file, key or id and exits
non-zero; nothing is half-written (all writes are atomic).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmeraser.errors import LmeraserError, shown
from lmeraser.stages import STAGE_NAMES, stage
from lmeraser.workspace import Workspace

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Exact, auditable unlearning for prompt-tuned vision transformers."
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"lmeraser {version('lmeraser')}")
        except PackageNotFoundError:
            console.print("lmeraser (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar="LMERASER_DEBUG",
        help="show the tracebacks of expected errors inside flows (always in the Prefect run's log)",
    ),
) -> None:
    """Exact, auditable unlearning for prompt-tuned vision transformers."""
    _settings["debug"] = debug


data_app = typer.Typer(no_args_is_help=True, help="Materialise and inspect the data splits.")
app.add_typer(data_app, name="data")
_settings: dict[str, bool] = {"debug": False}


def _width(stream) -> int | None:
    """A terminal's own width (or $COLUMNS); piped or redirected output is never cut (Rich's
    default there is 80 columns, or $COLUMNS, which shells and test runners often leave at 80)."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return None if terminal else 100_000


console = Console(soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))

ROOT = typer.Option(Path("."), "--root", help="workspace root (holds data/, artifacts/, audit/)")
PARAMS = typer.Option(None, "--params", help="params file (default: <root>/params.yaml); configs/ holds presets")
JSON = typer.Option(
    False,
    "--json",
    help="machine-readable: one JSON document on stdout (errors stay one line on stderr, non-zero exit)",
)


def _fail(message: str, code: int = 1) -> None:
    _print_error(message)
    raise typer.Exit(code)


def _print_error(message: str) -> None:
    """One line on stderr; no markup is interpreted and no control character reaches the terminal."""
    from rich.markup import escape

    from lmeraser.errors import shown

    err.print(f"[bold red]error:[/] {escape(shown(message, 2000))}", highlight=False, soft_wrap=True)


def _workspace(root: Path, params_file: Path | None) -> Workspace:
    return Workspace(root, params_file.resolve() if params_file is not None else None)


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _prefect(ws: Workspace) -> None:
    """Before a flow runs (and before Prefect is imported): point this process and its children at
    the workspace's standing Prefect server (lmeraser/prefect_server.py), starting it if needed,
    and keep expected errors to the one sentence the command prints."""
    from lmeraser import prefect_server

    try:
        standing = prefect_server.ensure(ws.root, lambda m: err.print(m, highlight=False))
    except LmeraserError as error:
        _fail(str(error))
    import prefect.main  # noqa: F401 (configures Prefect's logging: the filters below go on its handlers)

    _quiet_prefect_server()
    if standing:  # it serves the API only: Prefect's "View at <UI link>" would lead nowhere
        from prefect.logging.handlers import PrefectConsoleHandler

        for handler in logging.getLogger().handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _NoUiLinks) for f in handler.filters
            ):
                handler.addFilter(_NoUiLinks())
    _one_sentence_on_console()  # a no-op under --debug (the filter reads the setting per record)


def _quiet_prefect_server() -> None:
    """Silence only the temporary server's own start/stop lines, so an error is the last thing printed.

    That logger is Prefect's root logger (`prefect`) itself, so its level cannot be raised without
    silencing every flow and task log below it. A filter on a logger applies only to records
    logged directly to it, never to those its children propagate: flow-run INFO lines still show.
    Named rather than imported from `prefect.server.api.server` (which only does
    `get_logger()`): importing the server module costs about 2 s in every client process.
    """
    server_logger = logging.getLogger("prefect")

    if not any(isinstance(f, _OwnRecordsBelowWarning) for f in server_logger.filters):
        server_logger.addFilter(_OwnRecordsBelowWarning())


class _OwnRecordsBelowWarning:
    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING


def _one_sentence_on_console() -> None:
    """On the terminal, an expected error (LmeraserError) inside a flow is the command's one `error:`
    line: the task's traceback and every "Finished in state Failed(...)" repeat of it are left out.
    They still reach the Prefect run's log (its API handler sees them first); `--debug` shows them.
    So is Prefect's progress while it drains its event and log queues at exit, which followed the
    error line whenever the drain took a moment (CI, a loaded machine)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            for kind in (_ExpectedErrorsOnce, _NoDrainProgress):
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())


class _NoUiLinks:
    def filter(self, record) -> bool:
        return not (record.name.startswith("prefect") and str(record.msg).startswith("View at "))


class _NoDrainProgress:
    """Prefect's queue services (EventsWorker, APILogWorker) log "Still processing items: N items
    remaining..." every 4 s while they drain at exit: progress, not news. Their other warnings (a
    full queue dropping an item) still show."""

    def filter(self, record) -> bool:
        return _settings["debug"] or not record.getMessage().startswith("Still processing items:")


class _ExpectedErrorsOnce:
    def filter(self, record) -> bool:
        if _settings["debug"] or not record.name.startswith("prefect"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, LmeraserError):
            if "Retry" not in record.getMessage():
                return False
            record.exc_info, record.exc_text = None, None  # a retry is news; its traceback is not
        return "Finished in state Failed(" not in record.getMessage()


@data_app.command("init")
def data_init(
    source: str = typer.Option(
        None,
        help=(
            "digits (default), fashion-mnist, idx:DIR, npz:FILE, folder:DIR, cifar10:DIR or cifar100:DIR; "
            "overrides data.source"
        ),
    ),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    dvc: bool = typer.Option(True, help="record the new data version with `dvc add data` (when in a DVC repo)"),
) -> None:
    """Write deterministic public / private / test splits under data/."""
    from lmeraser.config import load_params
    from lmeraser.data.splits import init_data

    ws = _workspace(root, params_file)
    try:
        params = load_params(ws.params_file)
        data_params = params.data if source is None else params.data.model_copy(update={"source": source})
        # --source is recorded in the params file, where the next `data init` (and dvc.lock) read
        # it: a later plain `data init` must not silently switch back to the file's old source.
        recorded = _with_source(ws.params_file, source) if source is not None and source != params.data.source else None
        summary = init_data(data_params, params.seed, ws)
        if recorded is not None:
            from lmeraser.io import atomic_write_text

            atomic_write_text(ws.params_file, recorded)
    except LmeraserError as error:
        _fail(str(error))
    if recorded is not None:
        console.print(
            f"data.source set to {source} in {ws.relative(ws.params_file)} (the next `lmeraser data init` reads it)",
            highlight=False,
        )
    counts = summary["counts"]
    console.print(
        f"data: {summary['source']} {tuple(summary['image_shape'])}, {summary['num_classes']} classes -> "
        f"public {counts['public']}, private {counts['private']}, test {counts['test']}"
    )
    console.print(
        f"suppression list ({ws.relative(ws.suppression_file)}): {summary['suppressed']} sample(s) kept out, "
        f"{summary['labels_corrected']} label correction(s) and "
        f"{summary['images_corrected']} image correction(s) re-applied"
    )
    if dvc and ws.dvc_dir.is_dir():
        from lmeraser.versioning import data_md5, dvc_add

        try:
            dvc_add(ws.root, "data")
        except LmeraserError as error:
            _fail(str(error))
        console.print(f"data version recorded in data.dvc (md5 {data_md5(ws.root)})")


@data_app.command("samples")
def data_samples(
    split: str = typer.Option("private", help="private (erasable; default), public, test or all"),
    subject: list[str] = typer.Option(None, "--subject", help="only this data subject's samples (repeatable)"),
    limit: int = typer.Option(20, min=0, help="at most this many rows (0: all)"),
    root: Path = ROOT,
    as_json: bool = JSON,
) -> None:
    """List sample ids with their split, subject and label: where the ids a forget or rectify names come from."""
    from lmeraser.workspace import SPLITS

    ws = _workspace(root, None)
    if split not in (*SPLITS, "all"):
        _fail(f"--split {split}: expected one of {', '.join(SPLITS)} or all.")
    wanted = set(subject or ())
    rows = []
    for name in SPLITS if split == "all" else (split,):
        try:
            frame = ws.manifest(name)
            triples = zip(frame["sample_id"], frame["subject_id"], frame["label"].astype(int), strict=True)
            rows += [
                {"sample_id": sid, "split": name, "subject_id": subj, "label": int(label)}
                for sid, subj, label in triples
                if not wanted or subj in wanted
            ]
        except LmeraserError as error:
            _fail(str(error))
        except (KeyError, ValueError, TypeError):
            _fail(
                f"{ws.split_dir(name)}: a shard's manifest.csv is not a manifest "
                "(sample_id, subject_id and integer label columns); run `lmeraser data init`."
            )
    missing = sorted(wanted - {r["subject_id"] for r in rows})
    if missing:
        _fail(f"subject {missing[0]} has no samples in data/{split if split != 'all' else '*'}.")
    shown_rows = rows if limit == 0 else rows[:limit]
    if as_json:
        _emit({"total": len(rows), "samples": shown_rows})
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table("sample id", "split", "subject", "label")
    for row in shown_rows:  # ids as the data holds them, shown safely (no markup, no control characters)
        table.add_row(
            *(
                escape(shown(value, 80))
                for value in (row["sample_id"], row["split"], row["subject_id"], str(row["label"]))
            )
        )
    console.print(table)
    more = f"; {len(rows) - len(shown_rows)} more (--limit 0 lists all)" if len(shown_rows) < len(rows) else ""
    hint = ". Forget one: lmeraser forget --sample-id ID (or --subject SUBJECT)" if split == "private" else ""
    console.print(f"{len(rows)} sample(s){more}{hint}", highlight=False)


def _with_source(params_file: Path, source: str) -> str:
    """The params file's text with `data.source` set to `source`, every other line (and comment)
    as it was; refused before anything changes when the file has no such line to edit."""
    import re

    import yaml

    text = params_file.read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"data:\s*(#.*)?$", line.rstrip("\n"))), None)
    for i in range(start + 1 if start is not None else len(lines), len(lines)):
        line = lines[i]
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            break  # the next top-level key: the data section has no source line
        match = re.match(r"(\s+source:)\s*(?:\"[^\"]*\"|'[^']*'|[^#\s]*)(\s*#.*)?(\n?)$", line)
        if match:
            lines[i] = f"{match.group(1)} {json.dumps(source)}{match.group(2) or ''}{match.group(3)}"
            edited = "".join(lines)
            try:
                before, after = yaml.safe_load(text), yaml.safe_load(edited)
                before["data"]["source"] = source
            except (yaml.YAMLError, TypeError, KeyError):
                break
            if before == after:
                return edited
            break
    raise LmeraserError(
        f"{params_file}: no `source:` line under `data:` to record --source in; set data.source to {source} there, "
        "then run `lmeraser data init`."
    )


def _params_arg(ws: Workspace) -> str:
    """The params file as the flows take it: absolute, so it means the same from any directory."""
    return str(ws.params_file.resolve())


def _check_params(ws: Workspace) -> None:
    from lmeraser.config import load_params

    try:
        load_params(ws.params_file)  # refuse a bad params file before starting any flow
    except LmeraserError as error:
        _fail(str(error))


def _check_numerics(ws: Workspace, building: bool = False, kernels: bool = True) -> str:
    """Refuse, in one sentence, before a request is journaled or a flow starts, numerics this
    process does not run (lmeraser/numerics.py): a build runs the params' numerics; anything else
    the numerics the workspace's backbone was built under, which the params must still name.
    `kernels`: also check that this process's kernel pins are in effect (`_check_kernels`; a
    command that may compute nothing checks them later). Returns the numerics the params name."""
    from lmeraser.config import load_params

    try:
        wanted = load_params(ws.params_file).runtime.numerics
        if not building and ws.backbone_meta_file.exists():
            built = ws.backbone_meta().numerics
            if built != wanted:
                _fail(
                    f"runtime.numerics is {wanted}, but the backbone ({ws.backbone_meta_file}) "
                    f"was built under {built} numerics; run `dvc repro` to rebuild under {wanted} first."
                )
    except LmeraserError as error:
        _fail(str(error))
    if kernels:
        _check_kernels(wanted)
    return wanted


def _check_kernels(numerics_mode: str, torch_and_faiss: bool = True) -> None:
    """Refuse, in one sentence, a process whose kernel pins are not those of `numerics_mode`
    (imports torch and faiss to check them: 1.5 s; without `torch_and_faiss`, numpy's only)."""
    from lmeraser import numerics

    try:
        numerics.require(numerics_mode, kernels=torch_and_faiss)
    except LmeraserError as error:
        _fail(str(error))


def _runs_batch(method: str, process: bool | None) -> bool:
    """Whether a forget or rectify runs the exact batch now (`--process/--no-process`, else by method)."""
    return process if process is not None else method == Method.exact


def _check_flows_can_run(ws: Workspace) -> None:
    """Before a request is journaled: refuse, in one sentence, a process (a caller of `run`) whose
    flows already run on another workspace's Prefect server."""
    from lmeraser import prefect_server

    try:
        prefect_server.refuse_another_workspace(ws.root)
    except LmeraserError as error:
        _fail(str(error))


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help="a stage of lmeraser/stages.py: " + ", ".join(STAGE_NAMES)),
    root: Path = ROOT,
    params_file: Path = PARAMS,
) -> None:
    """Run one pipeline stage as a Prefect flow (what dvc.yaml calls)."""
    if name not in STAGE_NAMES:
        _fail(f"unknown stage '{name}'; expected one of {', '.join(STAGE_NAMES)}.")
    ws = _workspace(root, params_file)
    _quiet_env()
    _check_params(ws)
    # A stage that computes with neither torch nor faiss (validate) checks only the pins loaded so
    # far: importing torch to check its own would cost ~1.5 s of a process that never uses it.
    _check_kernels(_check_numerics(ws, building=True, kernels=False), torch_and_faiss=stage(name).kernels)
    _prefect(ws)
    from lmeraser.flows.stages import run_stage

    state = run_stage(name, str(ws.root), _params_arg(ws))
    if state.is_failed():
        _fail(state.message or f"stage {name} failed")


@app.command("pipeline")
def pipeline_cmd(root: Path = ROOT, params_file: Path = PARAMS) -> None:
    """Run every stage in order through the `train_pipeline` flow (without DVC's skipping)."""
    ws = _workspace(root, params_file)
    _quiet_env()
    _check_params(ws)
    _check_numerics(ws, building=True)
    _prefect(ws)
    from lmeraser.flows.pipeline import train_pipeline

    state = train_pipeline(root=str(ws.root), params_file=_params_arg(ws), return_state=True)
    if state.is_failed():
        _fail(state.message or "train_pipeline failed")


@app.command("metrics")
def metrics_cmd(root: Path = ROOT, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the latest evaluation metrics as a table."""
    ws = Workspace(root)
    try:
        metrics = ws.metrics()
    except LmeraserError as error:
        _fail(str(error))
    baselines = json.loads(ws.baselines_report.read_text()) if ws.baselines_report.exists() else {}
    metrics.update({f"baseline_{k}": v for k, v in baselines.items() if k != "enabled"})
    if as_json:
        console.print_json(data=metrics)
        return
    table = Table(title="lmeraser evaluation (test split)")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_row(f"clustered prompts ({metrics['n_clusters_active']} clusters)", f"{metrics['accuracy']:.4f}")
    if "baseline_single_prompt_accuracy" in metrics:
        table.add_row("single prompt + head (no clusters)", f"{metrics['baseline_single_prompt_accuracy']:.4f}")
        table.add_row("linear probe on frozen features", f"{metrics['baseline_linear_probe_accuracy']:.4f}")
    console.print(table)
    console.print(
        f"private samples {metrics['n_private']}, test samples {metrics['n_test']}; cluster sizes "
        f"min {metrics['cluster_size_min']}, median {metrics['cluster_size_median']:.0f}, "
        f"max {metrics['cluster_size_max']}, empty {metrics['cluster_n_empty']}"
    )


# -- unlearning ---------------------------------------------------------------------------------

audit_app = typer.Typer(no_args_is_help=True, help="Verify, inspect and replay the signed lineage log.")
app.add_typer(audit_app, name="audit")


class Method(StrEnum):
    exact = "exact"
    influence = "influence"


METHOD_HELP = "exact: rebuild the affected clusters; influence: approximate update now, exact rebuild queued"


def _emit(data) -> None:
    """A JSON document on stdout, alone (logs and progress go to stderr)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _say(quiet: bool):
    """Where a command's progress lines go: stdout for people, stderr under --json."""
    return (lambda m: err.print(m, highlight=False)) if quiet else (lambda m: console.print(m, highlight=False))


def _submit(specs, ws: Workspace, method: str = "exact", quiet: bool = False) -> list:
    from lmeraser.unlearning.intake import submit

    resolved = submit(specs, ws, method)
    for request in resolved:
        noop = (
            f", {len(request.already_forgotten)} already forgotten (no-op, still recorded)"
            if request.already_forgotten
            else ""
        )
        if request.subjects_already_forgotten:
            noop += f", {len(request.subjects_already_forgotten)} subject(s) already forgotten (no-op, still recorded)"
        _say(quiet)(f"accepted {request.request_id}: {request.kind} {len(request.sample_ids)} sample(s){noop}")
    return resolved


GIT_COMMIT = typer.Option(
    None,
    "--git-commit/--no-git-commit",
    help="commit data.dvc, dvc.lock, metrics and audit/ after a batch (in a git workspace; default: yes)",
)
SERVER = typer.Option(
    None,
    "--server",
    envvar="LMERASER_SERVER",
    help="submit to a running `lmeraser serve` at this URL (token: $LMERASER_API_TOKEN or the workspace's)",
)


def _process(
    ws: Workspace, git_commit: bool | None = True, quiet: bool = False, kernels_for: str | None = None
) -> dict | None:
    """Run the `unlearn` flow on what is pending; `kernels_for`: the numerics whose kernel pins
    to check once there is work (an idle call computes nothing, so it never imports torch and
    faiss to check them: `lmeraser unlearn` on a schedule stays well under a second)."""
    from lmeraser.journal import Journal
    from lmeraser.lineage.records import audit_words
    from lmeraser.unlearning.exact import rebuild_params

    say = _say(quiet)
    try:
        params = rebuild_params(ws)  # the params are checked even when there is nothing to do
        idle = not Journal(ws).pending() and not (ws.batches.is_dir() and any(ws.batches.iterdir()))
    except LmeraserError as error:
        _fail(str(error))
    if idle:  # nothing pending, no interrupted batch or influence update to finish: no flow to start
        from lmeraser.unlearning.recovery import recover

        try:
            with ws.lock("unlearn"):
                recover(ws, say)  # what a killed writer left (data/ mid-swap, DVC's locks): a batch's first step
        except LmeraserError as error:
            _fail(str(error))
        say("no pending requests")
        return None
    if kernels_for is not None:
        _check_kernels(kernels_for)
    _quiet_env()
    _prefect(ws)
    from lmeraser.flows.unlearn import run_unlearn

    wait = params.runtime.tracking == "wait"
    state = run_unlearn(str(ws.root.resolve()), _params_arg(ws), git_commit is not False, track=wait)
    if state.is_failed():
        _fail(state.message or "unlearn failed")
    result = state.result()
    if result is None:
        say("no pending requests")
        return None
    verification = result["verification"]
    say(
        f"batch {result['batch_id']}: rebuilt clusters {result['rebuilt'] or 'none'}"
        + (f", retired {result['retired']}" if result["retired"] else "")
        + f"; scan hits {verification['scan']['hits']}; "
        f"forgetting audit: {audit_words(verification.get('forgetting_audit'))}"
        + f"; lineage record {result['record']} (sha256 {result['sha256'][:16]}…)"
        + (f"; committed {result['commit'][:12]}" if result.get("commit") else "")
    )
    waiting = result["tracking"]["waiting"]
    if waiting and not wait:
        try:
            result["tracking"]["background"] = background = _track_in_background(ws)
        except OSError as error:  # the erasure is signed: a tracker that cannot start only leaves the runs waiting
            say(
                f"warning: the background tracker did not start ({shown(error, 200)}); "
                f"MLflow tracking of {', '.join(waiting)} waits in the backlog: `lmeraser track` logs it"
            )
        else:
            say(
                f"MLflow tracking of {len(waiting)} run(s) ({', '.join(waiting)}) goes on in the background "
                f"(pid {background['pid']}, log {background['log'] or 'none: ' + background['log_problem']}); "
                "`lmeraser track` waits for it"
            )
    elif waiting:
        say(f"MLflow tracking of {', '.join(waiting)} waits in the backlog: `lmeraser track` logs it")
    return result


def _track_in_background(ws: Workspace) -> dict:
    """`lmeraser track` as a process of its own session (it outlives this command; a kill of it
    loses nothing: the backlog is rewritten only as runs are logged), without this process's
    secrets, its output appended to the workspace's tracking log (a regular file: a symlink, FIFO
    or directory in its place is left alone and the tracker's output discarded)."""
    import stat
    import subprocess

    from lmeraser import tracking
    from lmeraser.versioning import child_env

    log_path, log_fd, log_problem = tracking.background_log(ws), None, None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.is_file() and not log_path.is_symlink():
            if log_path.stat().st_size > tracking.BACKGROUND_LOG_MAX_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))  # one older log kept
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK  # never waits on a FIFO
        log_fd = os.open(log_path, flags, 0o644)
        if not stat.S_ISREG(os.fstat(log_fd).st_mode):
            raise OSError(f"{ws.relative(log_path)} is not a regular file")
    except OSError as error:
        if log_fd is not None:
            os.close(log_fd)
        log_fd, log_problem = None, shown(error, 200)
    root = ws.root.resolve()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "lmeraser.cli", "track", "--root", str(root), "--params", _params_arg(ws)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if log_fd is None else log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal after the command returned does not reach it
            env=child_env(),
        )
    finally:
        if log_fd is not None:
            os.close(log_fd)
    return {
        "pid": child.pid,
        "log": None if log_fd is None else ws.relative(log_path),
        **({"log_problem": log_problem} if log_problem else {}),
    }


def _influence(ws: Workspace, quiet: bool = False) -> dict | None:
    """The influence update, in this process, without a Prefect run's start-up (the
    `influence_unlearn` flow wraps the same function for schedules); with the forgetting audit on,
    it also trains the audit's references."""
    from lmeraser.lineage.records import audit_words

    _quiet_env()
    from lmeraser.unlearning.influence_update import influence_pending

    say = _say(quiet)
    try:
        result = influence_pending(ws, say)
    except LmeraserError as error:
        _fail(str(error))
    if result is None:
        say("nothing to edit by influence (every target was already forgotten)")
        return None
    say(
        f"influence update applied to cluster(s) {result['clusters']} in {result['seconds']:.2f}s; "
        f"served as APPROXIMATE; forgetting audit: {audit_words(result.get('forgetting_audit'))}; "
        f"lineage record {result['record']}; the exact rebuild is queued: run `lmeraser unlearn`"
    )
    return result


@app.command("doctor")
def doctor(
    env: bool = typer.Option(
        False, "--env", help="print shell lines that set the portable pins (for a process lmeraser does not start)"
    ),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    as_json: bool = JSON,
) -> None:
    """This machine's numerics: the CPU, the numerics the workspace asks for and what took effect
    (each pin, checked in this process and in a probe), the library versions and the numeric
    fingerprint records and artifact keys carry. Exits non-zero where portable numerics were asked
    for and did not take effect."""
    from lmeraser import numerics

    if env:
        console.print(numerics.doctor_env(), highlight=False)
        return
    from lmeraser.config import load_params

    ws = _workspace(root, params_file)
    try:
        mode = load_params(ws.params_file).runtime.numerics if ws.params_file.exists() else numerics.state().mode
    except LmeraserError as error:
        _fail(str(error))
    from lmeraser.fingerprint import fingerprint, software

    boot = numerics.state()
    problem = None
    try:
        numerics.require(mode)
    except LmeraserError as error:
        problem = str(error)
    effects = numerics.effects()
    if problem is None and mode == "portable":
        off = [row for row in effects if row["value"] != row["portable"]]
        if off:  # what no in-process check sees (oneDNN's ISA): the probe's own word
            problem = (
                f"portable numerics did not take effect: {off[0]['what']} is {off[0]['value']}, "
                f"not {off[0]['portable']}; {numerics.NATIVE_FIX}."
            )
    report = {
        "cpu": numerics.cpu_name(),
        "numerics": mode,
        "process_started_with": {"mode": boot.mode, "from": boot.source},
        "pins": numerics.pins_in_effect(),
        "effects": effects,
        "versions": software(),
        "fingerprint": fingerprint(),
        "ok": problem is None,
        "problem": problem,
    }
    if as_json:
        _emit(report)
    else:
        say = _say(False)
        say(f"CPU: {report['cpu']}")
        say(f"numerics: {mode} (this process started with {boot.mode}, from {boot.source})")
        for row in effects:
            status = (
                ""
                if mode != "portable"
                else ("  ok" if row["value"] == row["portable"] else f"  NOT {row['portable']}")
            )
            say(f"  {row['what']}: {row['value']}{status}")
        say("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
        say(f"fingerprint: {report['fingerprint']['sha256']}")
        for family, digest in report["fingerprint"]["families"].items():
            say(f"  {family}: {digest}")
    if problem:
        _fail(problem)


@app.command("forget")
def forget(
    sample_id: list[str] = typer.Option([], "--sample-id", help="private sample id (repeatable)"),
    subject: list[str] = typer.Option(
        [], "--subject", help="forget every private sample of this data subject (repeatable)"
    ),
    file: Path = typer.Option(
        None, "--file", help="JSONL file of forget requests; one bad line refuses the whole file"
    ),
    allow_backbone_rebuild: bool = typer.Option(
        False, help="accept public samples: rebuilds backbone, prototypes and every prompt"
    ),
    method: Method = typer.Option(Method.exact, help=METHOD_HELP),
    process: bool = typer.Option(
        None, "--process/--no-process", help="run the exact batch now (default: yes for exact, no for influence)"
    ),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    git_commit: bool = GIT_COMMIT,
    as_json: bool = JSON,
    server: str = SERVER,
) -> None:
    """Erase private samples (GDPR Art. 17): exact rebuild of only the affected prompts, purge, signed record."""
    from lmeraser.unlearning.intake import parse_requests_file

    ws = _workspace(root, params_file)
    try:
        specs = parse_requests_file(file, "forget") if file else []
        if sample_id or subject:
            specs.append(_spec(kind="forget", sample_ids=sample_id, subjects=subject))
        if not specs:
            _fail("name what to forget: --sample-id, --subject or --file.")
        if server:
            if allow_backbone_rebuild:
                _fail("--allow-backbone-rebuild is not accepted over HTTP; run `lmeraser forget` in the workspace.")
            return _remote(server, ws, specs, method.value, process, git_commit, params_file, as_json)
        # The privilege comes from the command line only (a requests file cannot grant it).
        specs = [s.model_copy(update={"allow_backbone_rebuild": allow_backbone_rebuild}) for s in specs]
        _check_numerics(ws)
        if _runs_batch(method, process):
            _check_flows_can_run(ws)
        resolved = _submit(specs, ws, method.value, as_json)
    except LmeraserError as error:
        _fail(str(error))
    _answer(method.value, process, ws, git_commit, resolved, as_json)


def _client(server: str, ws: Workspace):
    """The running service at `server`, with the token from $LMERASER_API_TOKEN or the workspace."""
    from lmeraser.service.auth import api_token
    from lmeraser.service.client import Client

    return Client(server, api_token(ws, create=False))


def _remote(
    server: str,
    ws: Workspace,
    specs: list,
    method: str,
    process,
    git_commit,
    params_file,
    as_json: bool,
    image: Path | None = None,
) -> None:
    """Submit through a running service: its worker runs the exact batches with its own params."""
    given = [
        name
        for name, value in (
            ("--process/--no-process", process),
            ("--git-commit/--no-git-commit", git_commit),
            ("--params", params_file),
        )
        if value is not None
    ]
    if given:
        _fail(
            f"{given[0]} belongs to the service when --server is given "
            "(its worker runs the batches with its own params)."
        )
    requests = [s.model_dump(exclude={"input", "allow_backbone_rebuild"}) for s in specs]
    answer = _client(server, ws).submit(requests, method, image)
    if as_json:
        _emit(answer)
        return
    for r in answer["requests"]:
        console.print(
            f"accepted {r['request_id']}: {r['kind']} ({r['method']}), state {r['state']}, deadline {r['deadline']}",
            highlight=False,
        )
    if answer.get("influence"):
        console.print(
            f"influence update applied to cluster(s) {answer['influence']['clusters']}; "
            f"lineage record {answer['influence']['record']}",
            highlight=False,
        )
    console.print(
        f"the service at {server} runs the exact batch; follow it with `lmeraser requests --server {server}`",
        highlight=False,
    )


def _answer(method: str, process: bool | None, ws: Workspace, git_commit: bool, resolved: list, as_json: bool) -> None:
    influence = _influence(ws, as_json) if method == "influence" else None
    batch = _process(ws, git_commit, as_json) if _runs_batch(method, process) else None
    if as_json:
        accepted = [{k: v for k, v in r.to_json().items() if k != "input_path"} for r in resolved]
        _emit({"accepted": accepted, "method": method, "influence": influence, "batch": batch})


@app.command("rectify")
def rectify(
    sample_id: str = typer.Option(None, "--sample-id"),
    label: int = typer.Option(None, "--label", help="the corrected label"),
    input_file: Path = typer.Option(None, "--input", help="the corrected image (.npy or .png, same shape)"),
    file: Path = typer.Option(
        None, "--file", help="JSONL file of rectify requests; one bad line refuses the whole file"
    ),
    method: Method = typer.Option(Method.exact, help=METHOD_HELP),
    process: bool = typer.Option(
        None, "--process/--no-process", help="run the exact batch now (default: yes for exact, no for influence)"
    ),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    git_commit: bool = GIT_COMMIT,
    as_json: bool = JSON,
    server: str = SERVER,
) -> None:
    """Correct a private sample's label or image (GDPR Art. 16): exact rebuild, or an influence update now."""
    from lmeraser.unlearning.intake import parse_requests_file

    ws = _workspace(root, params_file)
    try:
        if file is not None:
            if sample_id is not None or label is not None or input_file is not None:
                _fail("--file takes the requests from the file: leave out --sample-id, --label and --input.")
            specs = parse_requests_file(file, "rectify")
        elif sample_id is None:
            _fail("name what to rectify: --sample-id with --label or --input, or --file.")
        else:
            specs = [
                _spec(
                    kind="rectify", sample_ids=[sample_id], label=label, input=str(input_file) if input_file else None
                )
            ]
        if server:
            if any(s.input is not None for s in specs) and len(specs) > 1:
                _fail("over HTTP, a corrected image is sent with a single request: use --sample-id with --input.")
            image = Path(specs[0].input) if specs[0].input is not None else None
            return _remote(server, ws, specs, method.value, process, git_commit, params_file, as_json, image)
        _check_numerics(ws)
        if _runs_batch(method, process):
            _check_flows_can_run(ws)
        resolved = _submit(specs, ws, method.value, as_json)
    except LmeraserError as error:
        _fail(str(error))
    _answer(method.value, process, ws, git_commit, resolved, as_json)


def _spec(**fields):
    """A request from command-line options, validated as a requests file's line is."""
    from pydantic import ValidationError

    from lmeraser.request import RequestSpec

    try:
        return RequestSpec(**fields)
    except ValidationError as error:
        first = error.errors()[0]
        options = {"sample_ids": "--sample-id", "subjects": "--subject", "label": "--label", "input": "--input"}
        option = options.get(str(first["loc"][0]) if first["loc"] else "", "")
        _fail(f"{option + ': ' if option else ''}{first['msg'].removeprefix('Value error, ')}.")


@app.command("requests")
def requests_cmd(
    pending: bool = typer.Option(False, "--pending", help="only requests not yet verified by an exact batch"),
    overdue: bool = typer.Option(False, "--overdue", help="only requests past their deadline and not done"),
    as_json: bool = typer.Option(False, "--json", help="one JSON list (with each request's state history)"),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    server: str = SERVER,
) -> None:
    """Every request: kind, method, state, received, deadline (GDPR Art. 12(3): one month), covering records."""
    from lmeraser.config import load_params
    from lmeraser.unlearning.status import RequestStatus, request_statuses

    ws = _workspace(root, params_file)
    try:
        if server:
            if params_file is not None:
                _fail(
                    "--params belongs to the service when --server is given "
                    "(its requests.deadline_months sets the deadlines)."
                )
            statuses = [RequestStatus(**s) for s in _client(server, ws).requests(pending, overdue)]
        else:
            statuses = request_statuses(ws, load_params(ws.params_file).requests)
    except LmeraserError as error:
        _fail(str(error))
    statuses = [s for s in statuses if (not pending or s.state != "verified") and (not overdue or s.flag == "overdue")]
    if as_json:
        console.print_json(data=[s.to_json() for s in statuses])
        return
    table = Table(title=f"requests ({len(statuses)})")
    for column in ("request", "kind", "method", "state", "received", "deadline", "records", "flag"):
        table.add_column(column)
    for s in statuses:
        table.add_row(
            s.request_id,
            s.kind,
            s.method,
            s.state,
            s.received_at,
            s.deadline,
            ",".join(map(str, s.records)) or "-",
            s.flag or "-",
        )
    console.print(table)
    flagged = sum(s.flag in ("overdue", "due soon") for s in statuses)
    if flagged:
        err.print(f"{flagged} request(s) overdue or due soon", highlight=False)


@app.command("track")
def track_cmd(root: Path = ROOT, params_file: Path = PARAMS, as_json: bool = JSON) -> None:
    """Log what waits in the tracking backlog to MLflow now: the runs of the stages that batches
    rebuilt and the served model's registration (runtime.tracking; a background tracker at work
    is waited for). Exits 1 if any run still waits."""
    from lmeraser import tracking

    ws = _workspace(root, params_file)
    say = _say(as_json)
    started = time.perf_counter()
    _check_params(ws)  # a --root that is no workspace is said so, not "nothing waits"
    if tracking.backlog_stages(ws):
        _quiet_env()
        _prefect(ws)
        from lmeraser.flows.unlearn import track_now

        result = track_now(str(ws.root.resolve()), _params_arg(ws))
    else:
        result = {"tracked": [], "waiting": []}
    say(
        f"tracked {len(result['tracked'])} run(s) in {time.perf_counter() - started:.1f}s"
        + (f" ({', '.join(result['tracked'])})" if result["tracked"] else "")
        + ("" if result["waiting"] else "; nothing waits in the tracking backlog")
    )
    if as_json:
        _emit(result)
    if result["waiting"]:
        _fail(
            f"{len(result['waiting'])} run(s) still wait in {ws.relative(tracking.backlog_file(ws))} "
            "(the warning above says why): run `lmeraser track` again once MLflow answers"
        )


@app.command("unlearn")
def unlearn_cmd(
    root: Path = ROOT, params_file: Path = PARAMS, git_commit: bool = GIT_COMMIT, as_json: bool = JSON
) -> None:
    """Process every pending request (or finish an interrupted batch) through the `unlearn` flow."""
    ws = _workspace(root, params_file)
    wanted = _check_numerics(ws, kernels=False)  # the params against the backbone: cheap, so even when idle
    result = _process(ws, git_commit, as_json, kernels_for=wanted)
    if as_json:
        _emit({"batch": result})


@audit_app.command("verify")
def audit_verify(
    pubkey: Path = typer.Option(
        None, help="the public key you were given (default: the pinned signer, audit/lineage-public-key.pem)"
    ),
    root: Path = ROOT,
    as_json: bool = JSON,
) -> None:
    """Check every signature, the hash chain, the signed head, the signer, and that the deployed
    artifacts match the latest record."""
    from lmeraser.audit.verify import public_key, verify
    from lmeraser.lineage.keys import key_id

    ws = Workspace(root)
    try:
        key = public_key(ws, pubkey)
        records = verify(ws, key)
    except LmeraserError as error:
        _fail(str(error))
    # Who signed: one key, or a chain of keys handed over by signed rotations.
    signers = list(dict.fromkeys(r.predicate.get("signer") for r in records if r.predicate.get("signer")))
    if as_json:
        _emit(
            {
                "ok": True,
                "records": len(records),
                "signer": key_id(key),
                "signers": signers,
                "deployed_match_record": records[-1].number,
            }
        )
        return
    signed = (
        f"all signed by {signers[0]}"
        if len(signers) <= 1
        else f"signed by {len(signers)} keys in turn (signed rotations), now {signers[-1]}"
    )
    console.print(
        f"OK: {len(records)} record(s), signatures, chain and signed head valid, {signed}; "
        f"deployed artifacts match record {records[-1].number}"
    )


@audit_app.command("show")
def audit_show(
    number: int = typer.Argument(None, help="record number (default: all, one line each)"),
    root: Path = ROOT,
    as_json: bool = JSON,
) -> None:
    """A readable summary of the lineage records (not verified: `audit verify` checks them)."""
    from lmeraser.lineage.records import lineage_log, summary_row

    try:
        records = lineage_log(Workspace(root)).read_unverified()
    except LmeraserError as error:
        _fail(str(error))
    if not records:
        _fail("no lineage records.")
    if number is not None and not 1 <= number <= len(records):
        _fail(f"record {number} does not exist (the log has {len(records)}).")
    if as_json:
        chosen = records if number is None else [records[number - 1]]
        _emit([{"number": r.number, "line_sha256": r.line_sha256, "statement": r.statement} for r in chosen])
        return
    if number is None:
        table = Table(title="lineage records")
        rows = [summary_row(r) for r in records]
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
        return
    console.print_json(data=records[number - 1].statement)


@audit_app.command("scan")
def audit_scan(
    root: Path = ROOT,
    strict: bool = typer.Option(False, "--strict", help="exit non-zero when any location could not be searched"),
    full: bool = typer.Option(
        False,
        "--full",
        help="read every file, not only those new or changed since the scan index read them, and rebuild the index",
    ),
    as_json: bool = JSON,
) -> None:
    """Search data/, the DVC cache and every remote, the artifact store and every MLflow artifact
    location for forgotten data; list what could not be searched."""
    from rich.markup import escape

    from lmeraser.audit.scan import scan, scan_targets

    ws = Workspace(root)
    targets = scan_targets(ws)
    try:
        report = scan(
            ws, targets.sample_keys, targets.artifact_hashes, reference_digests=targets.reference_digests, full=full
        )
    except LmeraserError as error:
        _fail(str(error))
    hits, counts, not_searched = report.hits, report.counts, report.not_searched
    if as_json:
        _emit(
            {
                "hits": [hit.__dict__ for hit in hits],
                "files_scanned": counts,
                "files_read": report.read,
                "index": report.index,
                "not_searched": not_searched,
                "erased_samples": len(targets.sample_keys),
                "superseded_artifacts": len(targets.artifact_hashes),
                "audit_in_references": len(targets.reference_digests),
            }
        )
    say = _say(as_json)
    say(
        f"searched {sum(counts.values())} files ({escape(', '.join(f'{k}: {v}' for k, v in counts.items()))}) "
        f"for {len(targets.sample_keys)} erased sample(s) named by the signed records "
        f"and {len(targets.artifact_hashes)} superseded artifact(s)"
        + (
            f" and {len(targets.reference_digests)} forgetting-audit IN reference(s)"
            if targets.reference_digests
            else ""
        )
        + f"; read {sum(report.read.values())} of them, "
        + (
            "the rest unchanged since the scan index read them"
            if report.index["mode"] == "incremental"
            else f"all ({report.index['reason']})"
        )
    )
    for hit in hits:  # names come from the stores (an experiment, an object key): never markup
        err.print(f"HIT {hit.kind} {hit.digest[:16]}… in {hit.location}: {hit.path}", highlight=False, markup=False)
    for gap in not_searched:
        err.print(f"not searched: {gap}", highlight=False, markup=False)
    if hits:
        _fail(f"{len(hits)} hit(s): forgotten data survives.")
    if not_searched and strict:
        _fail(f"0 hits where it searched, but {len(not_searched)} location(s) could not be searched (--strict).")
    say(
        "0 hits"
        + (f" where it searched; {len(not_searched)} location(s) not searched (listed above)" if not_searched else "")
    )


@audit_app.command("replay")
def audit_replay(
    record: int = typer.Option(..., "--record", help="record number"),
    pubkey: Path = typer.Option(None),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    as_json: bool = JSON,
) -> None:
    """Retrain the clusters record N rebuilt, from the recorded inputs, and compare artifact hashes.
    Exit 0: every checked cluster reproduces; 1: a cluster does not (or nothing could be checked);
    3: this machine's numeric fingerprint or device differs from the record's, so its bits cannot
    be compared here."""
    from lmeraser.audit.replay import CANNOT_COMPARE, replay
    from lmeraser.audit.verify import public_key, verified_records
    from lmeraser.config import load_params

    ws = _workspace(root, params_file)
    _check_numerics(ws)
    try:
        records = verified_records(ws, public_key(ws, pubkey))
        if not 1 <= record <= len(records):
            _fail(f"record {record} does not exist (the log has {len(records)}).")
        result = replay(ws, load_params(ws.params_file), records[record - 1], records, _say(as_json))
    except LmeraserError as error:
        _fail(str(error))
    if as_json:
        _emit(result)  # the exit status below says the same as the text would
    if not result["comparable"]:
        _fail(
            f"record {record}: cannot compare bits on this machine: {result['reason']}; "
            "replay it where the fingerprint matches (`lmeraser doctor`).",
            CANNOT_COMPARE,
        )
    if result["environment_differences"]:
        _say(as_json)(
            f"environment differs from the record ({', '.join(result['environment_differences'])}): "
            "compared predictions, not bits"
        )
    summary = (
        f"record {record}: replayed {result['replayed']}, matched {result['matched']}, skipped {result['skipped']}"
    )
    if not result["clusters"]:
        _fail(f"record {record} rebuilt no cluster: nothing to replay.")
    bad = [c["cluster"] for c in result["clusters"] if c["match"] is False]
    if bad:
        _fail(f"{summary}; cluster(s) {bad} do not reproduce.")
    if not result["ok"]:
        _fail(f"{summary}: no cluster it rebuilt could be checked; replay the later records that superseded them.")
    _say(as_json)(f"OK: {summary}; every checked cluster reproduces")


@audit_app.command("report")
def audit_report(
    out: Path = typer.Option(Path("audit/report.html"), "--out"), pubkey: Path = typer.Option(None), root: Path = ROOT
) -> None:
    """Write an HTML report: one line per request, cluster sizes, rebuilt clusters over time,
    accuracy, membership inference. It verifies the log first and says so; a failed verification
    is shown at the top of the report and exits non-zero."""
    from lmeraser.audit.report import build_report
    from lmeraser.audit.verify import public_key, verify
    from lmeraser.lineage import keys
    from lmeraser.lineage.records import lineage_log

    ws = Workspace(root)
    _check_output(out, (".html", ".htm"), "--out")
    failure = None
    try:
        key = public_key(ws, pubkey)
        signer = keys.key_id(key)
        records = verify(ws, key)
    except LmeraserError as error:
        failure, signer = str(error), None
        try:
            records = lineage_log(ws).read_unverified()
        except LmeraserError:
            records = []
        if not records:
            _fail(failure)
    try:
        path = build_report(ws, records, out, signer, failure)
    except OSError as error:
        _fail(f"{out}: cannot write the report ({error.strerror or error}).")
    if failure:
        _fail(f"report written to {path}, but verification FAILED: {failure}")
    console.print(f"report written to {path} (verified with key {signer})")


def _check_output(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    """An output path a command may (re)write: a new or regular file with the output's suffix, so
    `--plot /dev/null`, a FIFO or `audit/lineage.jsonl` is refused, never replaced."""
    if path.suffix.lower() not in suffixes:
        _fail(f"{path}: {option} takes a {' or '.join(suffixes)} file path (it would be replaced).")
    if os.path.lexists(path) and not (path.is_file() and not path.is_symlink()):
        kind = "a directory" if path.is_dir() else "a symbolic link" if path.is_symlink() else "not a regular file"
        _fail(f"{path}: is {kind}; {option} writes a new or regular file only.")


@audit_app.command("forgetting")
def audit_forgetting(
    plot: Path = typer.Option(Path("audit/forgetting.png"), "--plot", help="where to write the p-value plot (PNG)"),
    pubkey: Path = typer.Option(None),
    root: Path = ROOT,
    as_json: bool = JSON,
) -> None:
    """The forgetting audit across every record: verdict counts per method, the forget quality (a
    Kolmogorov-Smirnov test of the post-forget p-values against the uniform) and a plot of them.
    The log is verified first; on a failed verification the figures are printed and the exit is
    non-zero."""
    from lmeraser.audit.forgetting import fleet, plot_p_values
    from lmeraser.audit.report import fleet_rows, png_bytes
    from lmeraser.audit.verify import public_key, verify
    from lmeraser.io import atomic_write_bytes
    from lmeraser.lineage.records import lineage_log

    ws = Workspace(root)
    _check_output(plot, (".png",), "--plot")
    if not ws.lineage_file.exists():
        if as_json:
            _emit({"records": 0, "records_without_audit": 0, "methods": {}, "plot": None, "verified": None})
        else:
            console.print(f"no lineage records yet ({ws.lineage_file} does not exist): nothing was audited")
        return
    failure = None
    try:
        records = verify(ws, public_key(ws, pubkey))
    except LmeraserError as error:
        failure = str(error)
        try:
            records = lineage_log(ws).read_unverified()
        except LmeraserError:
            _fail(failure)
    summary = fleet(records)
    wrote = None
    if summary["records"]:
        import matplotlib.pyplot as plt

        fig = plot_p_values(summary)
        try:
            atomic_write_bytes(plot, png_bytes(fig))
        except OSError as error:
            _fail(f"{plot}: cannot write the plot ({error.strerror or error}).")
        finally:
            plt.close(fig)
        wrote = str(plot)
    if as_json:
        _emit({**summary, "plot": wrote, "verified": failure is None})
    elif not summary["records"]:
        console.print(f"no record carries a reference audit ({summary['records_without_audit']} record(s) without one)")
    else:
        table = Table(title="forgetting audit across the lineage log")
        rows = fleet_rows(summary)
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
        console.print(
            f"{summary['records']} audited record(s), {summary['records_without_audit']} without a reference audit; "
            f"p-value plot written to {wrote}. Forget quality: "
            "a KS p-value far from 0 means the post-forget p-values are consistent with the uniform "
            "(as for data never seen); near 0, that forgotten samples stay detectable.",
            highlight=False,
        )
    if failure:
        _fail(f"the lineage log did not verify: {failure}")


@audit_app.command("export-key")
def audit_export_key(
    out: Path = typer.Option(None, "--out", help="where to write it (default: the pinned signer file)"),
    root: Path = ROOT,
) -> None:
    """Write the signing key's public half (PEM) for auditors; before the first record this makes
    and pins the key, after it the key must be the pinned one."""
    from lmeraser.io import atomic_write_bytes
    from lmeraser.lineage import keys
    from lmeraser.lineage.records import signing_key

    ws = Workspace(root)
    out = out or ws.signer_file
    if out.is_dir():
        _fail(f"{out}: is a directory; --out takes a file path.")
    try:
        key = signing_key(ws)
    except LmeraserError as error:
        _fail(str(error))
    if out.resolve() != ws.signer_file.resolve():
        atomic_write_bytes(out, keys.public_pem(key))
    console.print(f"public key {keys.key_id(key.public_key())} written to {out}")


@audit_app.command("schema")
def audit_schema(
    out: Path = typer.Option(None, "--out", help="write it to this file (default or '-': stdout)"),
    root: Path = ROOT,
) -> None:
    """The JSON Schema of a lineage record's predicate, generated from the record models
    (docs/record-schema.json is this output)."""
    from lmeraser.io import atomic_write_text
    from lmeraser.lineage.records import record_schema

    text = json.dumps(record_schema(), indent=2, sort_keys=True) + "\n"
    if out is None or str(out) == "-":
        sys.stdout.write(text)
        return
    target = out.absolute()
    audit = Workspace(root).audit.absolute()
    if target == audit or audit in target.parents:
        _fail(
            f"{out}: inside the workspace's audit/ (the signed log, its keys and journal live there); "
            "write the schema elsewhere."
        )
    if out.is_dir() or (out.exists() and not out.is_file() and not out.is_symlink()):
        _fail(f"{out}: not a regular file; --out takes a file path.")
    if not target.parent.is_dir():
        _fail(f"{out}: its directory {target.parent} does not exist.")
    try:
        atomic_write_text(out, text)
    except OSError as error:
        _fail(f"{out}: cannot be written ({error.strerror or error.__class__.__name__}).")
    console.print(f"record schema written to {out}", highlight=False)


@audit_app.command("rotate-key")
def audit_rotate_key(
    new_key: Path = typer.Option(
        None, "--new-key", help="the new Ed25519 private key (PEM, 0600); default: a fresh one"
    ),
    reason: str = typer.Option("", "--reason", help="why the key changes (signed into the rotation record)"),
    root: Path = ROOT,
) -> None:
    """Hand the signing of the log to a new key: a key-rotation record signed by the current key
    and countersigned by the new one (the only way the signer may change); re-run after an
    interruption to finish it."""
    from lmeraser.io import read_trusted
    from lmeraser.lineage import keys
    from lmeraser.lineage.records import rotate_key

    ws = Workspace(root)
    try:
        key = (
            keys.parse_private_key(
                read_trusted(new_key, "new signing key", 64 << 10, secret=True, follow_links=True), str(new_key)
            )
            if new_key
            else None
        )
        with ws.lock("unlearn"):  # never beside a batch that is signing
            record = rotate_key(ws, key, reason)
    except LmeraserError as error:
        _fail(str(error))
    p = record.predicate
    console.print(
        f"lineage record {record.number}: key rotation {p.get('old_signer')} -> {p.get('new_signer')}; "
        "commit audit/ (the pinned signer changed)"
    )


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback unless told otherwise)"),
    port: int = typer.Option(8765, "--port", min=1, max=65535),
    worker: bool = typer.Option(
        True,
        "--worker/--no-worker",
        help="run exact batches inside the service (service.batch_window_s, service.max_batch)",
    ),
    root: Path = ROOT,
    params_file: Path = PARAMS,
    git_commit: bool = GIT_COMMIT,
) -> None:
    """The HTTP API (/v1, bearer token) for requests, status, records and predictions, with a batch worker."""
    from lmeraser.service.auth import api_token, token_source
    from lmeraser.unlearning.exact import rebuild_params

    # SIGTERM: uvicorn shuts down gracefully, then raises the signal again; here that (or a SIGTERM
    # before uvicorn runs) is a normal exit: atexit handlers run, and the Prefect server this
    # service started stops with it, instead of a kill that leaves it orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Absolute: the worker runs DVC from the workspace root (a process-wide cwd change) while
    # other threads answer requests.
    ws = _workspace(root.resolve(), params_file)
    _check_numerics(ws)  # a service that could not compute would answer every request with an error
    try:
        rebuild_params(ws)  # the worker's batches must be able to run with these params
        token = api_token(ws)
    except LmeraserError as error:
        _fail(str(error))
    _quiet_env()
    if worker:
        from lmeraser import prefect_server

        _prefect(ws)
        prefect_server.release_on_exit()  # the server this service started stops with it
    from lmeraser.service.app import serve

    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    batch_worker = _batch_worker(ws, git_commit is not False, log) if worker else None
    err.print(
        f"lmeraser serve: http://{host}:{port}/v1 (bearer token in {token_source(ws)}); "
        f"batch worker {'on' if worker else 'off'}",
        highlight=False,
    )
    serve(ws, host, port, token, batch_worker, log)


def _batch_worker(ws: Workspace, git_commit: bool, log):
    """The service's worker, handed the flows' batch runner and backlog tracker."""
    from lmeraser.config import load_params
    from lmeraser.flows.unlearn import backlog_tracker, batch_runner
    from lmeraser.service.worker import BatchWorker, warm_up

    params = load_params(ws.params_file)
    return BatchWorker(
        ws,
        params.service,
        batch_runner(ws, git_commit),
        log,
        run_tracking=backlog_tracker(ws),
        warm_up=warm_up(ws),
    )


prefect_app = typer.Typer(
    no_args_is_help=True,
    help="The workspace's standing Prefect server (started on demand by the commands that run flows).",
)
app.add_typer(prefect_app, name="prefect")


@prefect_app.command("status")
def prefect_status(root: Path = ROOT, as_json: bool = JSON) -> None:
    """Whether the workspace's Prefect server runs, its URL and PID."""
    from lmeraser import prefect_server

    state = prefect_server.status(root)
    if as_json:
        _emit(state)
        return
    if state["running"]:
        health = "answering" if state["healthy"] else "NOT answering"
        console.print(
            f"running at {state['url']} (PID {state['pid']}, {health}); stop it with `lmeraser prefect stop`",
            highlight=False,
        )
    else:
        console.print("not running (the next command that runs a flow starts it)", highlight=False)


@prefect_app.command("stop")
def prefect_stop(root: Path = ROOT) -> None:
    """Stop the workspace's Prefect server (it also stops by itself when idle)."""
    from lmeraser import prefect_server

    try:
        pid = prefect_server.stop(root)
    except LmeraserError as error:
        _fail(str(error))
    console.print(
        f"stopped the workspace's Prefect server (PID {pid})"
        if pid
        else "no Prefect server was running for this workspace",
        highlight=False,
    )


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def main() -> None:
    from lmeraser.lineage.keys import take_key_from_environment
    from lmeraser.service.auth import take_token_from_environment

    take_key_from_environment()  # no child process (Prefect's server, dvc, git) inherits the key
    take_token_from_environment()  # nor the API token
    _exit(run())


def run(args: list[str] | None = None) -> int:
    """Run one command (`args`, else this process's argv) in this process; its exit code.

    What `main` runs, and what a caller that keeps its imports warm (the tests) calls directly:
    an expected error is its one `error:` line on stderr and code 1, never a traceback. Unlike
    `main`, it leaves $LMERASER_SIGNING_KEY and $LMERASER_API_TOKEN in the environment (children
    it starts never get them: versioning.child_env). What a process fixes once holds for every
    call in it: the numerics chosen at its first `import lmeraser`, and the Prefect server its
    first flow ran on (another workspace's is refused in one sentence unless $PREFECT_API_URL
    names one server for all); Prefect's own log lines go to the stream it first wrote to.
    """
    try:
        app(args=args, prog_name="lmeraser")
    except LmeraserError as error:  # anything not caught closer to its source
        _print_error(str(error))
        return 1
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    return 0


def _exit(code: int) -> None:
    """Exit as a normal exit does, in its order (threading's shutdown: its exit hooks, which stop
    executor workers, then the join of non-daemon threads; then every atexit handler: Prefect's log
    and event flushes, MLflow's), minus the interpreter's teardown of the torch, Prefect and MLflow
    module graphs, which costs about 2 s per process and does nothing for a finished command."""
    import atexit
    import threading

    threading._shutdown()  # what the interpreter calls first on exit (joining threads alone can wait forever)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
