"""`vpt`: learnable tokens inserted after the class token (Visual Prompt Tuning), at the first
block only (shallow) or replaced at every block (deep)."""

from __future__ import annotations

import torch
from torch import nn

from lmeraser.compute import seeded_uniform_
from lmeraser.config import VptParams


class PromptTokens(nn.Module):
    def __init__(self, backbone: nn.Module, params: VptParams):
        super().__init__()
        self.deep = params.deep
        layers = len(backbone.blocks) if params.deep else 1
        self.tokens = nn.Parameter(torch.zeros(layers, params.num_tokens, backbone.embed_dim))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = (6.0 / (self.tokens.shape[1] + self.tokens.shape[2])) ** 0.5
        seeded_uniform_(self.tokens, bound, generator)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        bb = backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        prefix, batch, n = bb.num_prefix_tokens, x.shape[0], self.tokens.shape[1]
        for i, block in enumerate(bb.blocks):
            if i == 0:
                x = torch.cat([x[:, :prefix], self.tokens[0].expand(batch, -1, -1), x[:, prefix:]], dim=1)
            elif self.deep:
                x = torch.cat([x[:, :prefix], self.tokens[i].expand(batch, -1, -1), x[:, prefix + n :]], dim=1)
            x = block(x)
        return bb.forward_head(bb.norm(x), pre_logits=True)
