"""Serve the production deployments: `train_pipeline` on a cron schedule (retraining) and
`unlearn` on an interval or cron (every pending forget/rectify request, as one batch).

    prefect server start                       # once, in its own terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m lmeraser.flows.serve --cron "0 3 * * *" --unlearn-every 300

Both deployments run in this process; trigger one ad hoc with
`prefect deployment run train_pipeline/lmeraser-nightly` or `prefect deployment run unlearn/lmeraser-unlearn`.
An `unlearn` run with nothing pending returns at once; a batch holds the workspace's `unlearn`
lock, so a scheduled batch and a `lmeraser forget` never run at the same time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmeraser.flows.pipeline import train_pipeline
from lmeraser.flows.unlearn import unlearn


def build_deployment(cron: str, name: str = "lmeraser-nightly", root: str = "."):
    """The `train_pipeline` deployment with its cron schedule (not yet served)."""
    return train_pipeline.to_deployment(name=name, cron=cron, parameters={"root": str(Path(root).resolve())})


def build_unlearn_deployment(
    every_seconds: int | None = 300, cron: str | None = None, name: str = "lmeraser-unlearn", root: str = "."
):
    """The `unlearn` deployment: every `every_seconds`, or on `cron` if given (not yet served)."""
    schedule = {"cron": cron} if cron else {"interval": every_seconds}
    return unlearn.to_deployment(
        name=name, parameters={"root": str(Path(root).resolve())}, tags=["lmeraser", "unlearn"], **schedule
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default="0 3 * * *", help="train_pipeline's cron schedule (default: daily 03:00)")
    parser.add_argument("--name", default="lmeraser-nightly")
    parser.add_argument("--unlearn-every", type=int, default=300, help="seconds between unlearn runs (default 300)")
    parser.add_argument("--unlearn-cron", default=None, help="cron schedule for unlearn instead of an interval")
    parser.add_argument("--root", default=".", help="workspace root holding params.yaml and data/")
    args = parser.parse_args(argv)
    if args.unlearn_every < 1:
        parser.error("--unlearn-every must be at least 1 second")
    from prefect import serve

    serve(
        build_deployment(args.cron, args.name, args.root),
        build_unlearn_deployment(args.unlearn_every, args.unlearn_cron, root=args.root),
    )


if __name__ == "__main__":
    main()
