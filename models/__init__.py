"""Flax NNX models trained with GaLore: GPT-2, ViT, a BERT-style encoder,
CLIP and the LLaMA family (:mod:`models.llama`). :data:`MODELS` holds them
all, by name."""

from models.bert import PRESETS as BERT_PRESETS
from models.bert import Bert
from models.bert import BertConfig
from models.clip import CLIP
from models.clip import PRESETS as CLIP_PRESETS
from models.clip import CLIPConfig
from models.gpt2 import GPT2
from models.gpt2 import PRESETS as GPT2_PRESETS
from models.gpt2 import GPT2Config
from models.registry import MODELS
from models.registry import ModelSpec
from models.transformer import GALORE_TARGETS
from models.vit import PRESETS as VIT_PRESETS
from models.vit import ViT
from models.vit import ViTConfig
