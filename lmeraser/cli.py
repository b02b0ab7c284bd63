"""`lmeraser`: one command per stage and per operation.

Every command that can fail on bad input prints one sentence naming the file, key or id and exits
non-zero; nothing is half-written (all writes are atomic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmeraser.errors import LmeraserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Exact, auditable unlearning for prompt-tuned vision transformers.")
data_app = typer.Typer(no_args_is_help=True, help="Materialise and inspect the data splits.")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)

STAGE_NAMES = ("validate", "backbone", "prototypes", "assign", "train", "evaluate")


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")


@data_app.command("init")
def data_init(
    source: str = typer.Option(None, help="digits (default), fashion-mnist, idx:DIR or npz:FILE; overrides data.source"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    dvc: bool = typer.Option(True, help="record the new data version with `dvc add data` (when in a DVC repo)"),
) -> None:
    """Write deterministic public / private / test splits under data/."""
    from lmeraser.config import load_params
    from lmeraser.data.splits import init_data

    try:
        params = load_params(params_file)
        data_params = params.data if source is None else params.data.model_copy(update={"source": source})
        summary = init_data(data_params, params.seed, params_file.parent / "data")
    except LmeraserError as error:
        _fail(str(error))
    counts = summary["counts"]
    console.print(
        f"data: {summary['source']} {tuple(summary['image_shape'])}, {summary['num_classes']} classes -> "
        f"public {counts['public']}, private {counts['private']}, test {counts['test']}"
    )
    root = params_file.parent
    if dvc and (root / ".dvc").is_dir():
        done = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data"], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            _fail(f"`dvc add data` failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        console.print("data version recorded in data.dvc")


def _quiet_prefect_server() -> None:
    """Silence the temporary server's start/stop lines, so an error is the last thing printed."""
    import logging

    from prefect.server.api.server import subprocess_server_logger

    subprocess_server_logger.setLevel(logging.WARNING)


def _run_stage(stage: str, root: Path, params_file: str) -> None:
    _quiet_env()
    from lmeraser.config import load_params

    try:
        load_params(root / params_file)  # refuse a bad params file before starting any flow
    except LmeraserError as error:
        _fail(str(error))
    from flows.stages import run_stage

    _quiet_prefect_server()
    state = run_stage(stage, str(root), params_file)
    if state.is_failed():
        _fail(state.message or f"stage {stage} failed")


@app.command("stage")
def stage(
    name: str = typer.Argument(..., help=f"one of: {', '.join(STAGE_NAMES)}"),
    root: Path = typer.Option(Path("."), help="workspace root"),
    params_file: str = typer.Option("params.yaml", "--params"),
) -> None:
    """Run one pipeline stage as a Prefect flow (what dvc.yaml calls)."""
    if name not in STAGE_NAMES:
        _fail(f"unknown stage '{name}'; expected one of {', '.join(STAGE_NAMES)}.")
    _run_stage(name, root, params_file)


@app.command("pipeline")
def pipeline_cmd(root: Path = typer.Option(Path(".")), params_file: str = typer.Option("params.yaml", "--params")) -> None:
    """Run every stage in order through the `train_pipeline` flow (without DVC's skipping)."""
    _quiet_env()
    from flows.stages import train_pipeline

    _quiet_prefect_server()
    state = train_pipeline(root=str(root), params_file=params_file, return_state=True)
    if state.is_failed():
        _fail(state.message or "train_pipeline failed")


@app.command("metrics")
def metrics_cmd(root: Path = typer.Option(Path(".")), as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the latest evaluation metrics as a table."""
    path = root / "metrics.json"
    if not path.exists():
        _fail(f"{path}: not found; run `dvc repro` first.")
    metrics = json.loads(path.read_text())
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
        f"min {metrics['cluster_size_min']}, median {metrics['cluster_size_median']:.0f}, max {metrics['cluster_size_max']}, "
        f"empty {metrics['cluster_n_empty']}"
    )


def _stage_command(stage_name: str):
    def command(root: Path = typer.Option(Path(".")), params_file: str = typer.Option("params.yaml", "--params")) -> None:
        _run_stage(stage_name, root, params_file)

    command.__doc__ = f"Run the {stage_name} stage."
    return command


for _name in STAGE_NAMES:
    app.command(_name)(_stage_command(_name))


def main() -> None:
    try:
        app()
    except LmeraserError as error:  # anything not caught closer to its source
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
