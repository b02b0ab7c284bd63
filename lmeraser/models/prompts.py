"""Per-cluster PEFT modules on a frozen backbone, each with its own linear head.

- `pad`: a learnable pixel border added to the image (visual prompting, as in LMEraser).
- `vpt`: learnable tokens inserted after the class token (Visual Prompt Tuning), at the first
  block only (shallow) or re-inserted at every block (deep).
- `lora`: low-rank adapters (the `peft` library) on the backbone's linear layers; the cluster
  gets its own copy of the frozen backbone with the adapters injected.

Only the PEFT parameters (and head) are trainable and saved; the backbone is shared and frozen,
held by reference so it never enters a cluster's state dict.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmeraser.config import PromptParams


class PadPrompt(nn.Module):
    def __init__(self, img_size: int, width: int, channels: int = 1):
        super().__init__()
        if 2 * width >= img_size:
            raise ValueError(f"prompt.pad_width ({width}) leaves no image inside a {img_size}px input")
        mask = torch.ones(1, channels, img_size, img_size)
        mask[..., width:-width, width:-width] = 0.0
        self.register_buffer("mask", mask, persistent=False)
        # Zero start: the untrained prompt leaves the image as is.
        self.prompt = nn.Parameter(torch.zeros(1, channels, img_size, img_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prompt * self.mask


class PromptTokens(nn.Module):
    def __init__(self, num_tokens: int, dim: int, layers: int):
        super().__init__()
        # Filled by init_peft from the cluster's own generator.
        self.tokens = nn.Parameter(torch.zeros(layers, num_tokens, dim))


class LoraAdapters(nn.Module):
    """LoRA adapters injected by `peft` into a private copy of the backbone.

    Only the adapters' A and B matrices are registered here, so the state dict holds the
    adapters and never the (shared, frozen) base weights.
    """

    def __init__(self, backbone: nn.Module, params: PromptParams):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        adapted = copy.deepcopy(backbone)
        # Full names of the linear layers inside the transformer blocks (never the patch embedding,
        # whose conv is also called `proj`): peft matches a target by name suffix.
        targets = [
            name for name, m in adapted.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in params.lora_targets
        ]
        if not targets:
            raise ValueError(f"prompt.lora_targets {list(params.lora_targets)} match no linear layer of the backbone's blocks")
        config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=0.0, target_modules=targets)
        inject_adapter_in_model(config, adapted)
        for name, parameter in adapted.named_parameters():
            parameter.requires_grad_("lora_" in name)
        layers = {name: m for name, m in adapted.named_modules() if isinstance(m, LoraLayer)}
        self.a = nn.ModuleDict({name.replace(".", "_"): m.lora_A["default"] for name, m in layers.items()})
        self.b = nn.ModuleDict({name.replace(".", "_"): m.lora_B["default"] for name, m in layers.items()})
        object.__setattr__(self, "model", adapted)


class PromptedClassifier(nn.Module):
    """Frozen backbone + one cluster's prompt + linear head."""

    def __init__(self, backbone: nn.Module, params: PromptParams, num_classes: int):
        super().__init__()
        # Bypass nn.Module registration: the backbone is shared and must stay out of state_dict().
        object.__setattr__(self, "backbone", backbone)
        self.kind = params.kind
        dim = backbone.embed_dim
        if params.kind == "pad":
            self.pad = PadPrompt(backbone.patch_embed.img_size[0], params.pad_width)
        elif params.kind == "vpt":
            self.deep = params.deep
            self.vpt = PromptTokens(params.num_tokens, dim, len(backbone.blocks) if params.deep else 1)
        elif params.kind == "lora":
            self.lora = LoraAdapters(backbone, params)
        else:  # pragma: no cover - config validation rejects other kinds
            raise ValueError(params.kind)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.kind == "pad":
            return bb.forward_head(bb.forward_features(self.pad(x)), pre_logits=True)
        if self.kind == "lora":
            adapted = self.lora.model
            return adapted.forward_head(adapted.forward_features(x), pre_logits=True)
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        prefix, batch = bb.num_prefix_tokens, x.shape[0]
        tokens = self.vpt.tokens
        n = tokens.shape[1]
        for i, block in enumerate(bb.blocks):
            if i == 0:
                x = torch.cat([x[:, :prefix], tokens[0].expand(batch, -1, -1), x[:, prefix:]], dim=1)
            elif self.deep:
                x = torch.cat([x[:, :prefix], tokens[i].expand(batch, -1, -1), x[:, prefix + n :]], dim=1)
            x = block(x)
        return bb.forward_head(bb.norm(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def init_peft(model: PromptedClassifier, generator: torch.Generator) -> None:
    """(Re)initialise the trainable parameters from `generator` only, never the global RNG."""
    if model.kind == "pad":
        model.pad.prompt.zero_()
    elif model.kind == "lora":
        # peft's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the backbone.
        for name in model.lora.a:
            a = model.lora.a[name].weight
            bound = 1.0 / a.shape[1] ** 0.5
            a.uniform_(-bound, bound, generator=generator)
            model.lora.b[name].weight.zero_()
    else:
        tokens = model.vpt.tokens
        bound = (6.0 / (tokens.shape[1] + tokens.shape[2])) ** 0.5
        tokens.uniform_(-bound, bound, generator=generator)
    bound = 1.0 / model.head.in_features**0.5
    model.head.weight.uniform_(-bound, bound, generator=generator)
    model.head.bias.uniform_(-bound, bound, generator=generator)
