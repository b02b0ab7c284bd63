"""Serve `train_pipeline` on a cron schedule (production retraining).

    prefect server start                       # once, in its own terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --cron "0 3 * * *"   # nightly at 03:00

The served deployment runs in this process; trigger it ad hoc with
`prefect deployment run train_pipeline/lmeraser-nightly`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.stages import train_pipeline


def build_deployment(cron: str, name: str = "lmeraser-nightly", root: str = "."):
    """The `train_pipeline` deployment with its cron schedule (not yet served)."""
    return train_pipeline.to_deployment(name=name, cron=cron, parameters={"root": str(Path(root).resolve())})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily 03:00)")
    parser.add_argument("--name", default="lmeraser-nightly")
    parser.add_argument("--root", default=".", help="workspace root holding params.yaml and data/")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(build_deployment(args.cron, args.name, args.root))


if __name__ == "__main__":
    main()
