"""The public backbone: a timm VisionTransformer (any ViT-family model by name, or the built-in
small one), trained on public data only or loaded from a local checkpoint, then frozen."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from lmeraser.compute import CPU, Compute
from lmeraser.config import BackboneParams
from lmeraser.errors import ConfigError, DataError
from lmeraser.fingerprint import identity
from lmeraser.io import atomic_path, atomic_write_json, sha256_file
from lmeraser.progress import track
from lmeraser.workspace import BackboneMeta, InputSpec, Workspace, image_channels


def build_vit(params: BackboneParams, num_classes: int, in_chans: int = 1) -> VisionTransformer:
    """The backbone's architecture with fresh weights: the timm model `backbone.model` names
    (pretrained=False: nothing is downloaded), or the built-in small ViT."""
    if params.model is None:
        return VisionTransformer(
            img_size=params.img_size,
            patch_size=params.patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=params.embed_dim,
            depth=params.depth,
            num_heads=params.num_heads,
            mlp_ratio=params.mlp_ratio,
            global_pool="token",
            class_token=True,
        )
    import timm

    if not timm.is_model(params.model):
        raise ConfigError(
            f"backbone.model: '{params.model}' is not a timm model name "
            "(e.g. vit_tiny_patch16_224, deit_small_patch16_224)."
        )
    try:
        model = timm.create_model(
            params.model, pretrained=False, num_classes=num_classes, img_size=params.img_size, in_chans=in_chans
        )
    except TypeError:  # a model family that takes no img_size: not a ViT
        raise ConfigError(
            f"backbone.model: {params.model} is not a timm VisionTransformer (what lmeraser's prompts need)."
        ) from None
    except (ValueError, AssertionError) as error:
        raise ConfigError(
            f"backbone.model: {params.model} cannot be built at img_size {params.img_size} ({error})."
        ) from None
    if not isinstance(model, VisionTransformer) or getattr(model, "cls_token", None) is None:
        raise ConfigError(
            f"backbone.model: {params.model} is a {type(model).__name__}, "
            "not a timm VisionTransformer with a class token (what lmeraser's prompts need)."
        )
    return model


def input_spec(model: VisionTransformer, params: BackboneParams, in_chans: int) -> InputSpec:
    """How images enter the backbone: its size and channels, and the normalisation of its
    pretrained config (the built-in ViT: mean 0.5, std 0.5); a grey input takes the mean of an
    RGB config's values."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.5,))) if params.model else (0.5,)
    std = tuple(cfg.get("std", (0.5,))) if params.model else (0.5,)

    def fit(values: tuple[float, ...]) -> tuple[float, ...]:
        if len(values) == in_chans:
            return tuple(float(v) for v in values)
        return (float(sum(values) / len(values)),) * in_chans

    return InputSpec(params.img_size, in_chans, fit(mean), fit(std))


def preprocess(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, img_size, img_size), normalised with the
    backbone's mean and std; deterministic, no augmentation."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    if x.shape[1] != spec.in_chans:
        raise DataError(f"images have {x.shape[1]} channel(s), the backbone takes {spec.in_chans}.")
    if x.shape[-1] != spec.img_size or x.shape[-2] != spec.img_size:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def _black(spec: InputSpec) -> torch.Tensor:
    """A black pixel after normalisation, per channel."""
    return -torch.tensor(spec.mean, dtype=torch.float32) / torch.tensor(spec.std, dtype=torch.float32)


def _random_shift(x: torch.Tensor, generator: torch.Generator, black: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Seeded translation by up to `max_shift` pixels, filling with `black` (per channel): cheap
    augmentation for the public backbone."""
    n, c, h, w = x.shape
    padded = black.view(1, c, 1, 1).expand(n, c, h + 2 * max_shift, w + 2 * max_shift).clone()
    padded[..., max_shift : max_shift + h, max_shift : max_shift + w] = x
    dx, dy = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_backbone(
    params: BackboneParams,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    log=print,
    start: VisionTransformer | None = None,
    compute: Compute = CPU,
) -> VisionTransformer:
    """Supervised training on the public split, from fresh weights or from `start` (fine-tuning a
    checkpoint), on `compute`'s device and precision; returns the model in eval mode, frozen.

    The caller holds `compute.scope()` (the thread count changes the float order). Randomness is
    drawn on the CPU from seeded generators, so it is the same on every device."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    in_chans = image_channels(images.shape[1:])
    model = start if start is not None else build_vit(params, num_classes, in_chans)
    model = model.to(compute.torch_device)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    spec = input_spec(model, params, in_chans)
    # The split stays in host memory; each batch goes to the device.
    x, y, black = preprocess(images, spec), torch.from_numpy(labels), compute.put(_black(spec))
    optimizer = compute.adamw(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(y) / params.batch_size)
    total = max(1, params.epochs * steps_per_epoch)
    warmup = min(total // 10, 5 * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / max(1, warmup)
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    model.train()
    for epoch in track(range(params.epochs), "backbone epochs"):
        order = torch.randperm(len(y), generator=generator)
        running, correct = 0.0, 0
        for start in range(0, len(y), params.batch_size):
            idx = order[start : start + params.batch_size]
            targets = compute.put(y[idx])
            with compute.autocast():
                logits = model(_random_shift(compute.put(x[idx]), generator, black))
                loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == targets).sum())
        if epoch == params.epochs - 1 or epoch % 10 == 0:
            log(
                f"backbone epoch {epoch + 1}/{params.epochs}: loss {running / len(y):.4f}, "
                f"train acc {correct / len(y):.4f}"
            )
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_checkpoint(
    path: str | Path, params: BackboneParams, num_classes: int, in_chans: int = 1
) -> tuple[VisionTransformer, dict]:
    """The backbone with a local checkpoint's weights, loaded through timm's own path: its
    `load_state_dict` (safetensors, or a torch file read with weights_only=True, never unpickled;
    `state_dict`/`model` wrappers and `module.` prefixes handled) and the ViT checkpoint filter
    (position embeddings resampled to this img_size, patch embedding to this patch size). An RGB
    checkpoint for grey data has its input convolution summed over channels as timm does for
    pretrained weights; a classifier for another class count is dropped (only features are used).
    Returns the model, frozen, and what was adapted."""
    from timm.models import load_state_dict
    from timm.models._manipulate import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone.checkpoint: file {path} not found.")
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one sentence, never a traceback
        raise ConfigError(
            f"backbone.checkpoint: {path} is not a readable weights file ({error.__class__.__name__}; "
            "a torch file is read weights-only, never unpickled)."
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone.checkpoint: {path} holds no state dict of tensors.")
    model = build_vit(params, num_classes, in_chans)
    adapted = {}
    conv = state.get("patch_embed.proj.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] != in_chans:
        state = {**state, "patch_embed.proj.weight": adapt_input_conv(in_chans, conv)}
        adapted["input_channels"] = f"{conv.shape[1]} -> {in_chans}"
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as error:  # noqa: BLE001 - timm's filter on a foreign layout: one sentence
        raise ConfigError(
            f"backbone.checkpoint: {path} cannot be adapted to the backbone in params.yaml "
            f"({error.__class__.__name__}: {error})."
        ) from None
    head_keys = {"head.weight", "head.bias"}
    if state.get("head.weight") is not None and state["head.weight"].shape != model.head.weight.shape:
        state = {k: v for k, v in state.items() if k not in head_keys}
        adapted["classifier"] = "dropped (another class count)"
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConfigError(
                f"backbone.checkpoint: {path} has {key} of shape {tuple(tensor.shape)}, "
                f"the backbone in params.yaml needs {tuple(expected[key].shape)} "
                "(check backbone.model, img_size, patch_size and embed_dim)."
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ConfigError(
            f"backbone.checkpoint: {path} does not match the backbone in params.yaml "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})."
        )
    return freeze(model), adapted


def save_backbone(
    model: VisionTransformer,
    params: BackboneParams,
    num_classes: int,
    ws: Workspace,
    origin: dict,
    in_chans: int = 1,
    compute: Compute = CPU,
) -> BackboneMeta:
    with atomic_path(ws.backbone_weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    spec = input_spec(model, params, in_chans)
    meta = BackboneMeta(
        sha256_file(ws.backbone_weights),
        params.model_dump(),
        num_classes,
        params.threads,
        origin,
        spec.to_json(),
        compute.device,
        compute.precision,
        compute.numerics,
        identity(compute)["fingerprint"],
    )
    atomic_write_json(ws.backbone_meta_file, meta.to_json())
    return meta


def load_backbone(ws: Workspace) -> tuple[VisionTransformer, BackboneMeta]:
    """The frozen backbone on its recorded device, after checking its weights are the ones its
    metadata names and that this machine has that device."""
    meta = ws.backbone_meta()
    compute = Compute.of(meta).check(f"{ws.backbone_meta_file}: the backbone's device")
    actual = sha256_file(ws.backbone_weights)
    if actual != meta.sha256:
        raise ConfigError(
            f"{ws.backbone_weights}: sha256 {actual} does not match {ws.backbone_meta_file}; the backbone was modified."
        )
    model = build_vit(BackboneParams(**meta.params), meta.num_classes, meta.input.in_chans)
    model.load_state_dict(load_file(str(ws.backbone_weights)))
    return freeze(model.to(compute.torch_device)), meta


@torch.no_grad()
def extract_features(
    model: VisionTransformer, x: torch.Tensor, batch_size: int = 512, compute: Compute = CPU
) -> np.ndarray:
    """CLS features (pre-logits) of preprocessed images (in host memory), float32 (N, D): batch by
    batch on the device, under its precision."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        rows = len(batch)
        padded = compute.padded_rows(rows, batch_size)
        if padded > rows:  # a row's bits must not depend on its batch (the feature cache, assignment)
            batch = torch.cat([batch, batch.new_zeros((padded - rows, *batch.shape[1:]))])
        with compute.autocast():
            features = model.forward_head(model.forward_features(compute.put(batch)), pre_logits=True)
        out.append(features[:rows].float().cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.embed_dim), np.float32)


def features_of(
    model: VisionTransformer, images: np.ndarray, spec: InputSpec, compute: Compute, batch_size: int = 512
) -> np.ndarray:
    """Features of uint8 images, preprocessed a batch at a time (a whole split at 224 px would be
    tens of GB as floats); the same bits as preprocessing them all first: preprocessing is per
    image. The caller holds the compute's scope."""
    out = [
        extract_features(model, preprocess(images[i : i + batch_size], spec), batch_size, compute)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


def image_features(
    model: VisionTransformer, meta: BackboneMeta, images: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Features of uint8 images on the deterministic view, with the backbone's recorded compute."""
    with Compute.of(meta).scope() as compute:
        return features_of(model, images, meta.input, compute, batch_size)
