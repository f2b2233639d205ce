"""Flax NNX models trained with GaLore: GPT-2 and ViT."""

from models.gpt2 import GPT2, GPT2Config
from models.gpt2 import PRESETS as GPT2_PRESETS
from models.transformer import GALORE_TARGETS
from models.vit import ViT, ViTConfig
from models.vit import PRESETS as VIT_PRESETS
