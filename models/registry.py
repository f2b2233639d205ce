"""The model families: one :class:`ModelSpec` each, in :data:`MODELS`.

A family is a Flax NNX module class built as ``model(config, rngs=...)``, its
config presets, the parameter paths of its output heads and the Hugging Face
``model_type`` values whose checkpoints it loads (their conversions are in
:mod:`models.hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping

from models import bert
from models import clip
from models import gpt2
from models import vit


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model family.

  Attributes:
    model: the ``nnx.Module`` class, ``model(config, rngs=nnx.Rngs(seed))``.
    presets: name -> model config.
    heads: parameter paths (prefixes) of the output heads, initialised afresh
      where a checkpoint lacks them, and trained beside LoRA adapters.
    hf_model_types: the ``model_type`` of the Hugging Face checkpoints it
      loads.
  """

  model: type
  presets: Mapping[str, Any]
  heads: tuple[str, ...] = ()
  hf_model_types: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(gpt2.GPT2, gpt2.PRESETS, hf_model_types=("gpt2",)),
    "vit": ModelSpec(vit.ViT, vit.PRESETS, ("head/",), ("vit",)),
    "bert": ModelSpec(
        bert.Bert,
        bert.PRESETS,
        ("pool/", "classifier/", "mlm_"),
        ("bert", "roberta"),
    ),
    "clip": ModelSpec(clip.CLIP, clip.PRESETS, hf_model_types=("clip",)),
}


def family_of(model_type: str) -> str | None:
  """The family (a key of :data:`MODELS`) that loads Hugging Face checkpoints
  of ``model_type``, or None."""
  for name, spec in MODELS.items():
    if model_type in spec.hf_model_types:
      return name
  return None
