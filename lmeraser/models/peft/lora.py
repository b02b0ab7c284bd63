"""`lora`: low-rank adapters (the `peft` library) on the backbone's linear layers.

The cluster gets its own copy of the frozen backbone with the adapters injected. Only the
adapters' A and B matrices are registered here, so the state dict holds the adapters and never
the (shared, frozen) base weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmeraser.compute import seeded_uniform_
from lmeraser.config import LoraParams


class LoraAdapters(nn.Module):
    def __init__(self, backbone: nn.Module, params: LoraParams):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        adapted = copy.deepcopy(backbone)
        # Full names of the linear layers inside the transformer blocks (never the patch embedding,
        # whose conv is also called `proj`): peft matches a target by name suffix.
        targets = [
            name
            for name, m in adapted.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in params.targets
        ]
        if not targets:
            raise ValueError(
                f"prompt.lora.targets {list(params.targets)} match no linear layer of the backbone's blocks"
            )
        config = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=0.0, target_modules=targets)
        inject_adapter_in_model(config, adapted)
        for name, parameter in adapted.named_parameters():
            parameter.requires_grad_("lora_" in name)
        layers = {name: m for name, m in adapted.named_modules() if isinstance(m, LoraLayer)}
        self.a = nn.ModuleDict({name.replace(".", "_"): m.lora_A["default"] for name, m in layers.items()})
        self.b = nn.ModuleDict({name.replace(".", "_"): m.lora_B["default"] for name, m in layers.items()})
        object.__setattr__(self, "model", adapted)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        # peft's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the backbone.
        for name in self.a:
            a = self.a[name].weight
            bound = 1.0 / a.shape[1] ** 0.5
            seeded_uniform_(a, bound, generator)
            self.b[name].weight.zero_()

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
