"""A frozen backbone + one cluster's PEFT module (lmeraser/models/peft/) + its linear head.

Only the PEFT parameters and the head are trainable and saved; the backbone is shared and
frozen, held by reference so it never enters a cluster's state dict. The PEFT module is stored
under its kind's name (`pad.prompt`, `vpt.tokens`, `lora.a.*`), so a state dict says what it is.
"""

from __future__ import annotations

import torch
from torch import nn

from lmeraser.compute import seeded_uniform_
from lmeraser.config import PromptParams
from lmeraser.models.peft import ADAPTERS


class PromptedClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, params: PromptParams, num_classes: int):
        super().__init__()
        # Bypass nn.Module registration: the backbone is shared and must stay out of state_dict().
        object.__setattr__(self, "backbone", backbone)
        self.kind = params.kind
        self.add_module(params.kind, ADAPTERS[params.kind](backbone, params.adapter))
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    @property
    def adapter(self) -> nn.Module:
        return getattr(self, self.kind)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def init_peft(model: PromptedClassifier, generator: torch.Generator) -> None:
    """(Re)initialise the trainable parameters from `generator` only, never the global RNG."""
    model.adapter.reset_parameters(generator)
    bound = 1.0 / model.head.in_features**0.5
    seeded_uniform_(model.head.weight, bound, generator)
    seeded_uniform_(model.head.bias, bound, generator)
