import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmeraser.config import BackboneParams, PadParams, PromptParams, VptParams
from lmeraser.errors import ConfigError, DataError
from lmeraser.models.backbone import (
    build_vit,
    extract_features,
    freeze,
    load_backbone,
    load_checkpoint,
    preprocess,
    save_backbone,
)
from lmeraser.models.peft.pad import PadPrompt
from lmeraser.models.prompts import PromptedClassifier, init_peft
from lmeraser.workspace import InputSpec, Workspace

SMALL = BackboneParams(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, epochs=1)


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return freeze(build_vit(SMALL, 10))


def test_preprocess_resizes_and_normalises():
    x = preprocess(np.full((2, 4, 4), 255, np.uint8), InputSpec(8))
    assert x.shape == (2, 1, 8, 8) and torch.allclose(x, torch.ones_like(x))
    # RGB (N, H, W, 3) -> (N, 3, H, W), each channel with its own mean and std.
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    rgb[..., 1] = 255
    x = preprocess(rgb, InputSpec(4, 3, (0.0, 0.5, 0.25), (1.0, 0.5, 0.25)))
    assert x.shape == (1, 3, 4, 4) and x[0, 0].eq(0).all() and x[0, 1].eq(1).all() and x[0, 2].eq(-1).all()
    with pytest.raises(DataError, match="images have 3 channel"):
        preprocess(rgb, InputSpec(4))


def test_pad_prompt_only_touches_the_border(backbone):
    pad = PadPrompt(backbone, PadParams(width=2))
    with torch.no_grad():
        pad.prompt.fill_(1.0)
    out = pad(torch.zeros(1, 1, 8, 8))
    assert out[0, 0, 2:6, 2:6].abs().sum() == 0
    assert out[0, 0, :2].min() == 1 and out[0, 0, :, :2].min() == 1
    with pytest.raises(ValueError, match="prompt.pad.width"):
        PadPrompt(backbone, PadParams(width=4))


@pytest.mark.parametrize("kind,deep", [("pad", False), ("vpt", False), ("vpt", True)])
def test_prompted_classifier_trains_only_peft_params(backbone, kind, deep):
    model = PromptedClassifier(
        backbone, PromptParams(kind=kind, pad=PadParams(width=1), vpt=VptParams(num_tokens=3, deep=deep)), 10
    )
    init_peft(model, torch.Generator().manual_seed(0))
    names = set(model.state_dict())
    assert not any(name.startswith("backbone") for name in names)
    assert "head.weight" in names
    if kind == "vpt":
        assert model.vpt.tokens.shape == (2 if deep else 1, 3, 16)
    x = torch.randn(4, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    peft = model.pad.prompt if kind == "pad" else model.vpt.tokens
    assert peft.grad is not None and peft.grad.abs().sum() > 0


def test_vpt_changes_features(backbone):
    model = PromptedClassifier(backbone, PromptParams.of("vpt", num_tokens=2), 10)
    init_peft(model, torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 8, 8)
    plain = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    assert not torch.allclose(model.features(x), plain)


def test_save_and_load_backbone_checks_sha(tmp_path, backbone):
    ws = Workspace(tmp_path)
    meta = save_backbone(backbone, SMALL, 10, ws, {"seed": 0})
    loaded, loaded_meta = load_backbone(ws)
    assert loaded_meta == meta and meta.threads == SMALL.threads
    x = torch.randn(2, 1, 8, 8)
    assert np.array_equal(extract_features(loaded, x), extract_features(backbone, x))
    weights = ws.backbone_weights
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ConfigError, match="does not match"):
        load_backbone(ws)


def test_local_checkpoints_load_safely(tmp_path, backbone):
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "vit.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")  # timm strips `module.`
    x = torch.randn(2, 1, 8, 8)
    for name in ("vit.safetensors", "vit.pth", "ddp.pth"):
        model, adapted = load_checkpoint(tmp_path / name, SMALL, 10)
        assert np.array_equal(extract_features(model, x), extract_features(backbone, x)) and adapted == {}
    # A checkpoint with another classifier still loads (features only).
    other = dict(state, **{"head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)})
    save_file(other, str(tmp_path / "other.safetensors"))
    assert load_checkpoint(tmp_path / "other.safetensors", SMALL, 10)[1] == {
        "classifier": "dropped (another class count)"
    }
    # Made at another resolution: timm's filter resamples the position embeddings.
    big = build_vit(SMALL.model_copy(update={"img_size": 16}), 10).state_dict()
    save_file(big, str(tmp_path / "16px.safetensors"))
    model, _ = load_checkpoint(tmp_path / "16px.safetensors", SMALL, 10)
    assert model.pos_embed.shape == backbone.pos_embed.shape and big["pos_embed"].shape != backbone.pos_embed.shape
    # A standard 3-channel checkpoint for grey data: the input convolution summed over channels,
    # as timm adapts pretrained weights.
    rgb = build_vit(SMALL, 10, in_chans=3).state_dict()
    save_file(rgb, str(tmp_path / "rgb.safetensors"))
    model, adapted = load_checkpoint(tmp_path / "rgb.safetensors", SMALL, 10)
    assert adapted == {"input_channels": "3 -> 1"}
    assert torch.allclose(model.patch_embed.proj.weight, rgb["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_mismatched_checkpoint_is_refused(tmp_path, backbone):
    save_file(
        {k: v for k, v in backbone.state_dict().items() if "blocks.1" not in k}, str(tmp_path / "short.safetensors")
    )
    with pytest.raises(ConfigError, match="does not match the backbone in params.yaml"):
        load_checkpoint(tmp_path / "short.safetensors", SMALL, 10)
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth", SMALL, 10)
    # Another width: one sentence naming the key and both shapes.
    wide = build_vit(SMALL.model_copy(update={"embed_dim": 32}), 10).state_dict()
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        ConfigError,
        match=(
            r"wide.safetensors has [\w.]+ of shape \([\d, ]*32[\d, ]*\), "
            r"the backbone in params.yaml needs \([\d, ]*16[\d, ]*\)"
        ),
    ):
        load_checkpoint(tmp_path / "wide.safetensors", SMALL, 10)
    (tmp_path / "noise.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        load_checkpoint(tmp_path / "noise.pth", SMALL, 10)
    torch.save({"model": {"a": [1, 2]}}, tmp_path / "lists.pth")
    with pytest.raises(ConfigError, match="no state dict of tensors"):
        load_checkpoint(tmp_path / "lists.pth", SMALL, 10)


def test_pickled_checkpoints_are_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="not a readable weights file .*read weights-only, never unpickled"):
        load_checkpoint(tmp_path / "evil.pth", SMALL, 10)
    assert not marker.exists()


def test_a_backbone_by_timm_name_with_its_own_normalisation():
    """`backbone.model` builds any timm ViT (never downloading), at the data's size and channels;
    its pretrained config's mean and std are what images are normalised with."""
    from lmeraser.models.backbone import input_spec

    params = BackboneParams(model="deit_tiny_patch16_224", img_size=32)
    model = build_vit(params, 10, in_chans=3)
    assert (
        model.patch_embed.img_size == (32, 32)
        and model.patch_embed.proj.in_channels == 3
        and model.head.out_features == 10
    )
    spec = input_spec(model, params, 3)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    grey = input_spec(build_vit(params, 10, in_chans=1), params, 1)
    assert grey.in_chans == 1 and abs(grey.mean[0] - sum(spec.mean) / 3) < 1e-12
    assert input_spec(build_vit(SMALL, 10), SMALL, 1) == InputSpec(8, 1, (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="'vit_nonexistent' is not a timm model name"):
        build_vit(BackboneParams(model="vit_nonexistent"), 10)
    with pytest.raises(ConfigError, match="test_resnet is not a timm VisionTransformer"):
        build_vit(BackboneParams(model="test_resnet", img_size=32), 10)


def test_fine_tuning_starts_from_the_checkpoint_and_is_reproducible(tmp_path, backbone):
    from lmeraser.determinism import deterministic
    from lmeraser.models.backbone import train_backbone

    save_file(dict(backbone.state_dict()), str(tmp_path / "vit.safetensors"))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 10, 40)
    runs = []
    for _ in range(2):
        start, _ = load_checkpoint(tmp_path / "vit.safetensors", SMALL, 10)
        with deterministic(1):
            runs.append(train_backbone(SMALL, images, labels, 10, 0, lambda m: None, start=start).state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["cls_token"], backbone.state_dict()["cls_token"])  # it trained


def test_the_paper_config_builds_a_vit_b16_with_a_30_pixel_pad_prompt():
    from pathlib import Path

    from lmeraser.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "configs" / "paper-vit-b16-cifar10.yaml")
    assert params.backbone.train == "frozen" and params.data.source.startswith("cifar10:")
    model = build_vit(params.backbone, 10, in_chans=3)
    assert model.embed_dim == 768 and len(model.blocks) == 12 and model.patch_embed.patch_size == (16, 16)
    assert model.patch_embed.img_size == (224, 224)
    pad = PadPrompt(model, params.prompt.pad)
    assert pad.prompt.shape == (1, 3, 224, 224) and int(pad.mask[0, 0].sum()) == 224 * 224 - (224 - 60) ** 2
