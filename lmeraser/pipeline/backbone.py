"""backbone: the ViT the whole pipeline shares, then frozen: trained on the public split from
scratch, a local checkpoint fine-tuned on it, or a local checkpoint used as is (`backbone.train`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmeraser.compute import Compute
from lmeraser.config import Params
from lmeraser.fingerprint import identity
from lmeraser.io import sha256_file
from lmeraser.models.backbone import load_checkpoint, save_backbone, train_backbone
from lmeraser.workspace import Workspace, image_channels


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    info = ws.source_info()
    cfg = params.backbone
    in_chans = image_channels(info["image_shape"])
    architecture = cfg.model or "built-in ViT"
    compute = Compute(params.runtime.device, cfg.threads, params.runtime.precision, params.runtime.numerics).check()
    start = time.perf_counter()
    with compute.scope():
        origin: dict = {"architecture": architecture, "train": cfg.train}
        model = None
        if cfg.checkpoint:
            torch.manual_seed(params.seed)  # a dropped classifier is re-initialised: seeded
            model, adapted = load_checkpoint(cfg.checkpoint, cfg, info["num_classes"], in_chans)
            origin.update(
                {"checkpoint_sha256": sha256_file(cfg.checkpoint), **({"adapted": adapted} if adapted else {})}
            )
            log(f"backbone {architecture} loaded from {cfg.checkpoint}" + (f" (adapted: {adapted})" if adapted else ""))
        if cfg.train in ("scratch", "finetune"):
            public = ws.split("public")
            verb = "fine-tuning" if model is not None else "training"
            log(
                f"{verb} the backbone ({architecture}) on {len(public)} public samples: "
                f"{cfg.epochs} epochs, {cfg.threads} thread(s), on {compute.device} ({compute.precision})"
            )
            model = train_backbone(
                cfg, public.images, public.labels, info["num_classes"], params.seed, log, start=model, compute=compute
            )
            origin["n_public"] = len(public)
    seconds = time.perf_counter() - start
    origin["compute"] = identity(compute)  # the device's name and versions, with the backbone's lineage
    meta = save_backbone(model, cfg, info["num_classes"], ws, {**origin, "seed": params.seed}, in_chans, compute)
    log(f"backbone saved: sha256 {meta.sha256[:16]}…")
    return {"metrics": {"backbone_seconds": seconds}, "sha256": meta.sha256}
