"""`pad`: a learnable pixel border added to every image (visual prompting, as in LMEraser)."""

from __future__ import annotations

import torch
from torch import nn

from lmeraser.config import PadParams


class PadPrompt(nn.Module):
    def __init__(self, backbone: nn.Module, params: PadParams):
        super().__init__()
        img_size = backbone.patch_embed.img_size[0]
        channels = backbone.patch_embed.proj.in_channels
        width = params.width
        if 2 * width >= img_size:
            raise ValueError(f"prompt.pad.width ({width}) leaves no image inside a {img_size}px input")
        mask = torch.ones(1, channels, img_size, img_size)
        mask[..., width:-width, width:-width] = 0.0
        self.register_buffer("mask", mask, persistent=False)
        self.prompt = nn.Parameter(torch.zeros(1, channels, img_size, img_size))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        # Zero start: the untrained prompt leaves the image as is (the generator is not drawn from).
        self.prompt.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prompt * self.mask

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return backbone.forward_head(backbone.forward_features(self(x)), pre_logits=True)
