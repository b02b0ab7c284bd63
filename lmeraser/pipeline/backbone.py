"""backbone: train the ViT on the public split (or load a local checkpoint), then freeze it."""

from __future__ import annotations

import time
from collections.abc import Callable

from lmeraser.config import Params
from lmeraser.determinism import deterministic
from lmeraser.io import sha256_file
from lmeraser.models.backbone import load_checkpoint, save_backbone, train_backbone
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    info = ws.source_info()
    cfg = params.backbone
    start = time.perf_counter()
    if cfg.checkpoint:
        model = load_checkpoint(cfg.checkpoint, cfg, info["num_classes"])
        origin = {"origin": "checkpoint", "checkpoint_sha256": sha256_file(cfg.checkpoint)}
        log(f"backbone loaded from {cfg.checkpoint}")
    else:
        public = ws.split("public")
        log(f"training the backbone on {len(public)} public samples: {cfg.epochs} epochs, {cfg.threads} thread(s)")
        with deterministic(cfg.threads):
            model = train_backbone(cfg, public.images, public.labels, info["num_classes"], params.seed, log)
        origin = {"origin": "trained on public split", "n_public": len(public)}
    seconds = time.perf_counter() - start
    meta = save_backbone(model, cfg, info["num_classes"], ws, {**origin, "seed": params.seed})
    log(f"backbone saved: sha256 {meta.sha256[:16]}…")
    return {"metrics": {"backbone_seconds": seconds}, "sha256": meta.sha256}
