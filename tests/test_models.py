import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmeraser.config import BackboneParams, PadParams, PromptParams, VptParams
from lmeraser.errors import ConfigError
from lmeraser.models.backbone import build_vit, extract_features, freeze, load_backbone, load_checkpoint, preprocess, save_backbone
from lmeraser.models.peft.pad import PadPrompt
from lmeraser.models.prompts import PromptedClassifier, init_peft
from lmeraser.workspace import Workspace

SMALL = BackboneParams(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, epochs=1)


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return freeze(build_vit(SMALL, 10))


def test_preprocess_resizes_and_normalises():
    x = preprocess(np.full((2, 4, 4), 255, np.uint8), 8)
    assert x.shape == (2, 1, 8, 8) and torch.allclose(x, torch.ones_like(x))


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
    model = PromptedClassifier(backbone, PromptParams(kind=kind, pad=PadParams(width=1), vpt=VptParams(num_tokens=3, deep=deep)), 10)
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
    x = torch.randn(2, 1, 8, 8)
    for name in ("vit.safetensors", "vit.pth"):
        model = load_checkpoint(tmp_path / name, SMALL, 10)
        assert np.array_equal(extract_features(model, x), extract_features(backbone, x))
    # A checkpoint with another classifier still loads (features only).
    other = dict(state, **{"head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)})
    save_file(other, str(tmp_path / "other.safetensors"))
    load_checkpoint(tmp_path / "other.safetensors", SMALL, 10)


def test_mismatched_checkpoint_is_refused(tmp_path, backbone):
    save_file({k: v for k, v in backbone.state_dict().items() if "blocks.1" not in k}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match="does not match the backbone shape"):
        load_checkpoint(tmp_path / "short.safetensors", SMALL, 10)
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth", SMALL, 10)
    # A standard 3-channel checkpoint for a grey backbone: one sentence naming the key and shapes.
    rgb = build_vit(SMALL.model_copy(), 10).state_dict()
    rgb["patch_embed.proj.weight"] = torch.zeros(rgb["patch_embed.proj.weight"].shape[0], 3, *rgb["patch_embed.proj.weight"].shape[2:])
    save_file(rgb, str(tmp_path / "rgb.safetensors"))
    with pytest.raises(ConfigError, match=r"has patch_embed.proj.weight of shape \(16, 3, 4, 4\), the backbone in params.yaml needs \(16, 1, 4, 4\)"):
        load_checkpoint(tmp_path / "rgb.safetensors", SMALL, 10)
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
