"""The model families: one :class:`ModelSpec` each, in :data:`MODELS`.

A family is a Flax NNX module class built as ``model(config, rngs=...)``, its
config presets, what it can be trained to do, the parameter paths of its
output heads and the Hugging Face ``model_type`` values whose checkpoints it
loads (their conversions are in :mod:`models.hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping

from models import bert
from models import clip
from models import gpt2
from models import llama
from models import vit


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model family.

  Attributes:
    model: the ``nnx.Module`` class, ``model(config, rngs=nnx.Rngs(seed))``.
    presets: name -> model config.
    capabilities: what the model computes, the main one first: each names an
      interface an objective may need (``next_token``: next-token logits of a
      causal model; ``masked_token`` and ``sequence_label``: a bidirectional
      encoder's token logits or pooled label logits; ``image_label``: an
      image's class logits; ``image_text``: paired image and text
      embeddings). The objectives' docstrings say what each requires.
    heads: parameter paths (prefixes) of the output heads, initialised afresh
      where a checkpoint lacks them, and trained beside LoRA adapters.
    hf_model_types: the ``model_type`` of the Hugging Face checkpoints it
      loads.
    not_layerwise: why the layer-wise step cannot run it, if it cannot (that
      step runs one stack of blocks that take the hidden states alone).
    not_stacked: why its blocks cannot be stacked for ``remat``, if not.
  """

  model: type
  presets: Mapping[str, Any]
  capabilities: tuple[str, ...]
  heads: tuple[str, ...] = ()
  hf_model_types: tuple[str, ...] = ()
  not_layerwise: str = ""
  not_stacked: str = ""


TWO_TOWERS = "its two towers are two stacks of blocks"

MODELS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(
        gpt2.GPT2, gpt2.PRESETS, ("next_token",), hf_model_types=("gpt2",)
    ),
    "vit": ModelSpec(
        vit.ViT, vit.PRESETS, ("image_label",), ("head/",), ("vit",)
    ),
    "bert": ModelSpec(
        bert.Bert,
        bert.PRESETS,
        ("masked_token", "sequence_label"),
        ("pool/", "classifier/", "mlm_"),
        ("bert", "roberta"),
        not_layerwise="its blocks take a padding mask",
    ),
    "llama": ModelSpec(
        llama.Llama,
        llama.PRESETS,
        ("next_token",),
        hf_model_types=("llama", "mistral", "qwen2"),
    ),
    "clip": ModelSpec(
        clip.CLIP,
        clip.PRESETS,
        ("image_text",),
        hf_model_types=("clip",),
        not_layerwise=TWO_TOWERS,
        not_stacked=TWO_TOWERS,
    ),
}


def family_of(model_type: str) -> str | None:
  """The family (a key of :data:`MODELS`) that loads Hugging Face checkpoints
  of ``model_type``, or None."""
  for name, spec in MODELS.items():
    if model_type in spec.hf_model_types:
      return name
  return None
