"""PEFT modules, one file per kind, each configured by its section of `prompt:` in params.yaml
(`lmeraser.config.PadParams`, `VptParams`, `LoraParams`), the way `peft` keeps a config and a
module per adapter kind.

Every module takes (frozen backbone, its settings), resets its parameters from a given
generator only, and maps images to pre-logit features through the backbone. The registry below
is the one place that names the kinds.
"""

from __future__ import annotations

from torch import nn

from lmeraser.models.peft.lora import LoraAdapters
from lmeraser.models.peft.pad import PadPrompt
from lmeraser.models.peft.vpt import PromptTokens

ADAPTERS: dict[str, type[nn.Module]] = {"pad": PadPrompt, "vpt": PromptTokens, "lora": LoraAdapters}
