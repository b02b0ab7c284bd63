"""The public backbone: a timm VisionTransformer trained on public data only, then frozen."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from lmeraser.config import BackboneParams
from lmeraser.errors import ConfigError
from lmeraser.io import atomic_path, atomic_write_json, sha256_file
from lmeraser.progress import track
from lmeraser.workspace import BackboneMeta, Workspace


def build_vit(params: BackboneParams, num_classes: int) -> VisionTransformer:
    return VisionTransformer(
        img_size=params.img_size,
        patch_size=params.patch_size,
        in_chans=1,
        num_classes=num_classes,
        embed_dim=params.embed_dim,
        depth=params.depth,
        num_heads=params.num_heads,
        mlp_ratio=params.mlp_ratio,
        global_pool="token",
        class_token=True,
    )


def preprocess(images: np.ndarray, img_size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, img_size, img_size) in [-1, 1]; deterministic, no augmentation."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=False)
    return x.sub_(0.5).div_(0.5)


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Seeded translation by up to `max_shift` pixels: cheap augmentation for the public backbone."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_backbone(params: BackboneParams, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, log=print) -> VisionTransformer:
    """Supervised training on the public split; returns the model in eval mode, frozen.

    The caller fixes the thread count (lmeraser.determinism), since it changes the float order."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_vit(params, num_classes)
    x, y = preprocess(images, params.img_size), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(y) / params.batch_size)
    total = max(1, params.epochs * steps_per_epoch)
    warmup = min(total // 10, 5 * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    model.train()
    for epoch in track(range(params.epochs), "backbone epochs"):
        order = torch.randperm(len(y), generator=generator)
        running, correct = 0.0, 0
        for start in range(0, len(y), params.batch_size):
            idx = order[start : start + params.batch_size]
            logits = model(_random_shift(x[idx], generator))
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        if epoch == params.epochs - 1 or epoch % 10 == 0:
            log(f"backbone epoch {epoch + 1}/{params.epochs}: loss {running / len(y):.4f}, train acc {correct / len(y):.4f}")
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_checkpoint(path: str | Path, params: BackboneParams, num_classes: int) -> VisionTransformer:
    """Load a local timm checkpoint (safetensors, or a torch file read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone.checkpoint: file {path} not found.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as error:  # noqa: BLE001 - any unreadable file is one sentence, never a traceback
        raise ConfigError(
            f"backbone.checkpoint: {path} is not a readable weights file ({error.__class__.__name__}; a torch file is read weights-only, never unpickled)."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone.checkpoint: {path} holds no state dict of tensors.")
    model = build_vit(params, num_classes)
    head_keys = {"head.weight", "head.bias"}
    # A checkpoint trained for other classes still gives features; its classifier is not used.
    if state.get("head.weight") is not None and state["head.weight"].shape != model.head.weight.shape:
        state = {k: v for k, v in state.items() if k not in head_keys}
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConfigError(
                f"backbone.checkpoint: {path} has {key} of shape {tuple(tensor.shape)}, the backbone in params.yaml needs "
                f"{tuple(expected[key].shape)} (check backbone.img_size, patch_size, embed_dim and the image channels)."
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ConfigError(
            f"backbone.checkpoint: {path} does not match the backbone shape in params.yaml (missing {missing[:3]}, unexpected {list(unexpected)[:3]})."
        )
    return freeze(model)


def save_backbone(model: VisionTransformer, params: BackboneParams, num_classes: int, ws: Workspace, origin: dict) -> BackboneMeta:
    with atomic_path(ws.backbone_weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = BackboneMeta(sha256_file(ws.backbone_weights), params.model_dump(), num_classes, params.threads, origin)
    atomic_write_json(ws.backbone_meta_file, meta.to_json())
    return meta


def load_backbone(ws: Workspace) -> tuple[VisionTransformer, BackboneMeta]:
    """The frozen backbone, after checking its weights are the ones its metadata names."""
    meta = ws.backbone_meta()
    actual = sha256_file(ws.backbone_weights)
    if actual != meta.sha256:
        raise ConfigError(f"{ws.backbone_weights}: sha256 {actual} does not match {ws.backbone_meta_file}; the backbone was modified.")
    model = build_vit(BackboneParams(**meta.params), meta.num_classes)
    model.load_state_dict(load_file(str(ws.backbone_weights)))
    return freeze(model), meta


@torch.no_grad()
def extract_features(model: VisionTransformer, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """CLS features (pre-logits) of preprocessed images, float32 (N, D)."""
    model.eval()
    out = [model.forward_head(model.forward_features(x[i : i + batch_size]), pre_logits=True) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.embed_dim), np.float32)


def image_features(model: VisionTransformer, meta: BackboneMeta, images: np.ndarray) -> np.ndarray:
    """Features of uint8 images on the deterministic view, with the backbone's recorded threads."""
    from lmeraser.determinism import deterministic

    with deterministic(meta.threads):
        return extract_features(model, preprocess(images, meta.img_size))
