"""baselines: the two reference models on the same private split: a linear probe on frozen
features and a single prompt + head trained on all private data (the "no clusters" model).

A separate stage from evaluate, so that serving an unlearning request does not pay for
retraining a whole-dataset baseline; they are re-measured on the next full `dvc repro`. Only
their metrics are kept, never the models.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lmeraser.compute import Compute
from lmeraser.config import Params
from lmeraser.evaluation import accuracy, linear_probe, single_prompt
from lmeraser.io import atomic_write_json
from lmeraser.models.backbone import load_backbone
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    out, seconds = {"enabled": params.evaluate.baselines}, {}
    if params.evaluate.baselines:
        backbone, meta = load_backbone(ws)
        private, test = ws.split("private"), ws.split("test")
        start = time.perf_counter()
        with Compute.of(meta).scope() as compute:
            probe = linear_probe(
                backbone, private.images, private.labels, test.images, meta.input, params.seed, compute
            )
        out["linear_probe_accuracy"] = accuracy(test.labels, probe)
        seconds["linear_probe_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        with (
            Compute.of(meta).with_threads(params.runtime.threads).scope() as compute
        ):  # the cluster trainer's: it trains a prompt like one
            single = single_prompt(
                backbone,
                private.images,
                private.labels,
                test.images,
                meta.input,
                params.prompt,
                meta.num_classes,
                params.seed,
                compute,
                params.evaluate.batch_size,
            )
        out["single_prompt_accuracy"] = accuracy(test.labels, single)
        seconds["single_prompt_seconds"] = time.perf_counter() - start
        log(
            f"baselines: linear probe {out['linear_probe_accuracy']:.4f} "
            f"| single prompt {out['single_prompt_accuracy']:.4f}"
        )
    atomic_write_json(ws.baselines_report, out)
    return {"metrics": {**{k: v for k, v in out.items() if k != "enabled"}, **seconds}}
