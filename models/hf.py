"""Hugging Face ``transformers`` checkpoints (config.json + safetensors) loaded
into this project's NNX models: GPT-2, ViT, BERT, RoBERTa, CLIP and the LLaMA
family (LLaMA, Mistral, Qwen2).

The architecture comes from the checkpoint's ``config.json``, as
``from_pretrained`` does. Every tensor is accounted for: each parameter of the
model must come from a tensor of the right shape, except a head the checkpoint
does not hold (a classifier on a pretrained encoder), which keeps its fresh
initialisation and is reported; a tensor that maps to nothing is an error,
unless it belongs to a head this model does not build (BERT's MLM head when
classifying) or is a buffer. Errors name the tensors and shapes that do not
fit.

    model, report = load("hf:bert-base-uncased", num_labels=2)
    model, report = load("path/to/saved_model")

:func:`save` is the way back, for every architecture: config.json and
model.safetensors (and an image processor's config where the model normalises
pixels) that ``from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any
from typing import Callable
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import bert
from models import clip
from models import gpt2
from models import llama
from models import registry
from models import vit


class CheckpointMismatch(ValueError):
  """The checkpoint does not fit the model asked for; the message says where."""


@dataclasses.dataclass
class LoadReport:
  source: str
  model_type: str
  config: Any  # the model's config dataclass
  fresh: list[str]  # parameters the checkpoint did not hold (initialised anew)
  ignored: list[str]  # tensors of heads this model does not build


def resolve(source: str) -> pathlib.Path:
  """``hf:NAME`` (downloaded through ``huggingface_hub``, or found in its
  cache) or a local directory holding ``config.json``."""
  if source.startswith("hf:"):
    name = source[3:]
    try:
      from huggingface_hub import snapshot_download
    except ImportError:
      raise CheckpointMismatch(
          f"{source} needs huggingface_hub (pip install"
          " 'galore-optax[hf]'), or pass a local directory"
      ) from None
    path = snapshot_download(
        name, allow_patterns=["config.json", "*.safetensors", "*.json"]
    )
    return pathlib.Path(path)
  path = pathlib.Path(source)
  if not (path / "config.json").is_file():
    raise CheckpointMismatch(
        f"{source}: no config.json there; expected a directory saved by"
        " transformers' save_pretrained, or hf:NAME"
    )
  return path


def read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the directory's ``*.safetensors`` files, sharded or not."""
  from safetensors.numpy import load_file

  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise CheckpointMismatch(
        f"{path}: no *.safetensors file (only safetensors checkpoints are read)"
    )
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors


# --- architectures: config.json -> our config, tensors -> our parameters ---


# their hidden_act -> ours (models.transformer.ACTIVATIONS)
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}


def _activation(act: str, where: str) -> str:
  if act not in _ACTIVATIONS:
    raise CheckpointMismatch(f"{where}: activation {act!r} is not supported")
  return _ACTIVATIONS[act]


def _mlp_ratio(hf: dict, d: int, where: str) -> int:
  inner = hf.get("intermediate_size") or hf.get("n_inner") or 4 * d
  if inner % d:
    raise CheckpointMismatch(
        f"{where}: intermediate size {inner} is not a multiple of the width {d}"
    )
  return inner // d


def _num_labels(hf: dict) -> int:
  return len(hf.get("id2label") or {}) or hf.get("num_labels", 2)


def gpt2_config(hf: dict, where: str) -> gpt2.GPT2Config:
  d = hf["n_embd"]
  return gpt2.GPT2Config(
      vocab_size=hf["vocab_size"],
      max_len=hf["n_positions"],
      d_model=d,
      n_layers=hf["n_layer"],
      n_heads=hf["n_head"],
      mlp_ratio=_mlp_ratio(hf, d, where),
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      activation=_activation(hf.get("activation_function", "gelu_new"), where),
  )


def llama_config(hf: dict, where: str) -> llama.LlamaConfig:
  """LLaMA, Mistral and Qwen2: transformers 5's ``rope_parameters`` or the
  older ``rope_theta`` and ``rope_scaling``."""
  kind = hf["model_type"]
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointMismatch(
        f"{where}: hidden_act {hf['hidden_act']!r}; the SwiGLU MLP uses 'silu'"
    )
  for flag in ("attention_bias", "mlp_bias"):  # LLaMA's options
    if kind == "llama" and hf.get(flag):
      raise CheckpointMismatch(f"{where}: {flag} is not built here")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointMismatch(
        f"{where}: Qwen2's use_sliding_window is not built"
    )
  rope = hf.get("rope_parameters") or dict(
      hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0)
  )
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in llama.ROPE_TYPES:
    raise CheckpointMismatch(
        f"{where}: rope scaling {rope_type!r} is not built here (only"
        f" {', '.join(llama.ROPE_TYPES)})"
    )
  return llama.LlamaConfig(
      vocab_size=hf["vocab_size"],
      max_len=hf["max_position_embeddings"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads"),
      head_dim=hf.get("head_dim"),
      hidden=hf["intermediate_size"],
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=rope.get("rope_theta", 10000.0),
      rope_type=rope_type,
      rope_factor=rope.get("factor", 1.0),
      rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
      rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
      rope_original_max_len=rope.get("original_max_position_embeddings", 8192),
      sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
      tie_embeddings=hf.get("tie_word_embeddings", False),
      qkv_bias=kind == "qwen2",
  )


PREPROCESSOR = "preprocessor_config.json"


def _pixels(hf: dict, channels: int, where: str) -> dict:
  """The per-channel normalisation of the checkpoint's image processor
  (``preprocessor_config.json`` beside its config), as model config fields:
  pretrained vision towers expect their inputs so."""
  processor = hf.get(PREPROCESSOR, {})
  if not processor.get("do_normalize", True) or "image_mean" not in processor:
    return {}
  mean, std = processor["image_mean"], processor["image_std"]
  if not len(mean) == len(std) == channels:
    raise CheckpointMismatch(
        f"{where}: {PREPROCESSOR} normalises {len(mean)} channel(s), the"
        f" model takes {channels}"
    )
  return dict(
      pixel_mean=tuple(float(m) for m in mean),
      pixel_std=tuple(float(s) for s in std),
  )


def vit_config(hf: dict, where: str) -> vit.ViTConfig:
  d = hf["hidden_size"]
  if not hf.get("qkv_bias", True):
    raise CheckpointMismatch(f"{where}: ViT without qkv biases")
  channels = hf.get("num_channels", 3)
  return vit.ViTConfig(
      image_size=hf["image_size"],
      patch_size=hf["patch_size"],
      channels=channels,
      **_pixels(hf, channels, where),
      num_classes=_num_labels(hf),
      d_model=d,
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      mlp_ratio=_mlp_ratio(hf, d, where),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      activation=_activation(hf.get("hidden_act", "gelu"), where),
  )


def bert_config(hf: dict, where: str) -> bert.BertConfig:
  d = hf["hidden_size"]
  roberta = hf["model_type"] == "roberta"
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointMismatch(
        f"{where}: position_embedding_type"
        f" {hf['position_embedding_type']!r} (only 'absolute')"
    )
  if hf.get("hidden_act", "gelu") != "gelu":
    raise CheckpointMismatch(
        f"{where}: hidden_act {hf['hidden_act']!r}; this encoder uses the exact"
        " GELU ('gelu')"
    )
  pad = hf.get("pad_token_id", 1) if roberta else None
  classifier = any(
      a.endswith("ForSequenceClassification")
      for a in hf.get("architectures") or ()
  )
  return bert.BertConfig(
      vocab_size=hf["vocab_size"],
      max_len=hf["max_position_embeddings"] - (0 if pad is None else pad + 1),
      type_vocab_size=hf.get("type_vocab_size", 2),
      d_model=d,
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      mlp_ratio=_mlp_ratio(hf, d, where),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      padding_position=pad,
      num_labels=_num_labels(hf) if classifier else 0,
  )


def clip_config(hf: dict, where: str) -> clip.CLIPConfig:
  text, vision = hf["text_config"], hf["vision_config"]
  acts = {
      text.get("hidden_act", "quick_gelu"),
      vision.get("hidden_act", "quick_gelu"),
  }
  eps = {text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)}
  ratios = {
      _mlp_ratio(text, text["hidden_size"], where),
      _mlp_ratio(vision, vision["hidden_size"], where),
  }
  if len(acts) > 1 or len(eps) > 1 or len(ratios) > 1:
    raise CheckpointMismatch(
        f"{where}: the towers differ in activation, LayerNorm epsilon or MLP"
        " width ratio, which this model shares between them"
    )
  eos = text.get("eos_token_id", 49407)
  channels = vision.get("num_channels", 3)
  return clip.CLIPConfig(
      image_size=vision["image_size"],
      patch_size=vision["patch_size"],
      channels=channels,
      **_pixels(hf, channels, where),
      vision_width=vision["hidden_size"],
      vision_layers=vision["num_hidden_layers"],
      vision_heads=vision["num_attention_heads"],
      vocab_size=text["vocab_size"],
      max_len=text["max_position_embeddings"],
      text_width=text["hidden_size"],
      text_layers=text["num_hidden_layers"],
      text_heads=text["num_attention_heads"],
      # transformers keeps the old configs' eos id 2 meaning "the largest id"
      eot_token=None if eos == 2 else eos,
      embed_dim=hf.get("projection_dim", 512),
      mlp_ratio=ratios.pop(),
      layer_norm_eps=eps.pop(),
      activation=_activation(acts.pop(), where),
      logit_scale_init=hf.get("logit_scale_init_value", math.log(1 / 0.07)),
  )


def _linear(w):  # torch Linear (out, in) -> Flax kernel (in, out)
  return w.T


def _same(w):
  return w


def _layer_norm(ours: str, theirs: str) -> dict[str, tuple[str, Callable]]:
  return {
      f"{ours}/scale": (f"{theirs}.weight", _same),
      f"{ours}/bias": (
          f"{theirs}.bias",
          _same,
      ),
  }


def _dense(ours: str, theirs: str, convert=_linear) -> dict:
  return {
      f"{ours}/kernel": (f"{theirs}.weight", convert),
      f"{ours}/bias": (f"{theirs}.bias", _same),
  }


def gpt2_names(config: gpt2.GPT2Config) -> dict:
  """Our parameter path -> (their tensor name, conversion). GPT-2 stores its
  matrices as Conv1D (in, out), our layout."""
  names = {
      "wte/embedding": ("wte.weight", _same),
      "wpe/embedding": ("wpe.weight", _same),
      **_layer_norm("ln_f", "ln_f"),
  }
  for i in range(config.n_layers):
    h, b = f"h.{i}", f"blocks/{i}"
    names.update(_layer_norm(f"{b}/ln1", f"{h}.ln_1"))
    names.update(_layer_norm(f"{b}/ln2", f"{h}.ln_2"))
    names.update(_dense(f"{b}/attn/qkv", f"{h}.attn.c_attn", _same))
    names.update(_dense(f"{b}/attn/proj", f"{h}.attn.c_proj", _same))
    names.update(_dense(f"{b}/mlp/fc", f"{h}.mlp.c_fc", _same))
    names.update(_dense(f"{b}/mlp/proj", f"{h}.mlp.c_proj", _same))
  return names


def llama_names(config: llama.LlamaConfig) -> dict:
  """Our parameter path -> (their tensor name, conversion) for LLaMA-family
  checkpoints (the backbone under ``model.``, ``lm_head`` beside it)."""
  names = {
      "embed_tokens/embedding": ("embed_tokens.weight", _same),
      "norm/scale": ("norm.weight", _same),
  }
  if not config.tie_embeddings:
    names["lm_head/kernel"] = ("lm_head.weight", _linear)
  for i in range(config.n_layers):
    h, b = f"layers.{i}", f"blocks/{i}"
    names[f"{b}/attn_norm/scale"] = (f"{h}.input_layernorm.weight", _same)
    names[f"{b}/mlp_norm/scale"] = (
        f"{h}.post_attention_layernorm.weight",
        _same,
    )
    for ours in "qkvo":
      theirs = f"{h}.self_attn.{ours}_proj"
      names[f"{b}/attn/{ours}/kernel"] = (f"{theirs}.weight", _linear)
      if config.qkv_bias and ours != "o":
        names[f"{b}/attn/{ours}/bias"] = (f"{theirs}.bias", _same)
    for ours in ("gate", "up", "down"):
      names[f"{b}/mlp/{ours}/kernel"] = (f"{h}.mlp.{ours}_proj.weight", _linear)
  return names


# our activation -> their hidden_act (or GPT-2's activation_function)
_HIDDEN_ACT = {
    "gelu_tanh": "gelu_new",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}


def gpt2_hf_config(config: gpt2.GPT2Config) -> dict:
  """Our config as a ``GPT2LMHeadModel``'s config.json."""
  return dict(
      model_type="gpt2",
      architectures=["GPT2LMHeadModel"],
      vocab_size=config.vocab_size,
      n_positions=config.max_len,
      n_embd=config.d_model,
      n_layer=config.n_layers,
      n_head=config.n_heads,
      n_inner=config.mlp_ratio * config.d_model,
      layer_norm_epsilon=config.layer_norm_eps,
      activation_function=_HIDDEN_ACT[config.activation],
      tie_word_embeddings=True,
      # GPT-2's <|endoftext|> where the vocabulary is GPT-2's
      **dict.fromkeys(
          ("bos_token_id", "eos_token_id"),
          50256 if config.vocab_size == 50257 else None,
      ),
  )


def llama_hf_config(config: llama.LlamaConfig) -> dict:
  """Our config as config.json: Qwen2's with query/key/value biases,
  Mistral's with a sliding window, else LLaMA's."""
  kind = (
      "qwen2"
      if config.qkv_bias
      else "mistral"
      if config.sliding_window
      else "llama"
  )
  rope = dict(rope_type=config.rope_type, rope_theta=config.rope_theta)
  if config.rope_type != "default":
    rope["factor"] = config.rope_factor
  if config.rope_type == "llama3":
    rope.update(
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_len,
    )
  out = dict(
      model_type=kind,
      architectures=[
          {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
          + "ForCausalLM"
      ],
      vocab_size=config.vocab_size,
      max_position_embeddings=config.max_len,
      hidden_size=config.d_model,
      intermediate_size=config.hidden,
      num_hidden_layers=config.n_layers,
      num_attention_heads=config.n_heads,
      num_key_value_heads=config.kv_heads,
      head_dim=config.head_size,
      rms_norm_eps=config.rms_norm_eps,
      hidden_act="silu",
      tie_word_embeddings=config.tie_embeddings,
      rope_parameters=rope,
  )
  if kind == "mistral":
    out["sliding_window"] = config.sliding_window
  return out


def _processor(config, size: dict) -> dict:
  """An image processor's config that normalises as ``config`` does (pixels
  in [0, 255] rescaled to [0, 1] first), or nothing if it does not."""
  if not config.pixel_mean:
    return {}
  return {
      PREPROCESSOR: dict(
          do_rescale=True,
          rescale_factor=1 / 255,
          do_normalize=True,
          image_mean=list(config.pixel_mean),
          image_std=list(config.pixel_std),
          do_resize=True,
          size=size,
      )
  }


def vit_hf_config(config: vit.ViTConfig) -> dict:
  """Our config as a ``ViTForImageClassification``'s config.json."""
  return dict(
      model_type="vit",
      architectures=["ViTForImageClassification"],
      image_size=config.image_size,
      patch_size=config.patch_size,
      num_channels=config.channels,
      hidden_size=config.d_model,
      num_hidden_layers=config.n_layers,
      num_attention_heads=config.n_heads,
      intermediate_size=config.mlp_ratio * config.d_model,
      layer_norm_eps=config.layer_norm_eps,
      hidden_act=_HIDDEN_ACT[config.activation],
      qkv_bias=True,
      id2label={str(i): f"LABEL_{i}" for i in range(config.num_classes)},
      **_processor(
          config, dict(height=config.image_size, width=config.image_size)
      ),
  )


def bert_hf_config(config: bert.BertConfig) -> dict:
  """Our config as BERT's (RoBERTa's where positions start after a padding
  id) masked-LM or classifier config.json."""
  if config.pre_ln:
    raise CheckpointMismatch(
        "a pre-LayerNorm encoder is neither BERT's nor RoBERTa's"
    )
  roberta = config.padding_position is not None
  name = "Roberta" if roberta else "Bert"
  head = "ForSequenceClassification" if config.num_labels else "ForMaskedLM"
  out = dict(
      model_type="roberta" if roberta else "bert",
      architectures=[name + head],
      vocab_size=config.vocab_size,
      max_position_embeddings=config.max_len
      + (config.padding_position + 1 if roberta else 0),
      type_vocab_size=config.type_vocab_size,
      hidden_size=config.d_model,
      num_hidden_layers=config.n_layers,
      num_attention_heads=config.n_heads,
      intermediate_size=config.mlp_ratio * config.d_model,
      layer_norm_eps=config.layer_norm_eps,
      hidden_act="gelu",
      tie_word_embeddings=True,
  )
  if roberta:
    out["pad_token_id"] = config.padding_position
  if config.num_labels:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
  return out


def clip_hf_config(config: clip.CLIPConfig) -> dict:
  """Our config as a ``CLIPModel``'s config.json."""
  shared = dict(
      layer_norm_eps=config.layer_norm_eps,
      hidden_act=_HIDDEN_ACT[config.activation],
  )
  return dict(
      model_type="clip",
      architectures=["CLIPModel"],
      projection_dim=config.embed_dim,
      logit_scale_init_value=config.logit_scale_init,
      text_config=dict(
          shared,
          vocab_size=config.vocab_size,
          max_position_embeddings=config.max_len,
          hidden_size=config.text_width,
          intermediate_size=config.mlp_ratio * config.text_width,
          num_hidden_layers=config.text_layers,
          num_attention_heads=config.text_heads,
          # 2: transformers' legacy "pool at the largest id"
          eos_token_id=2 if config.eot_token is None else config.eot_token,
      ),
      vision_config=dict(
          shared,
          image_size=config.image_size,
          patch_size=config.patch_size,
          num_channels=config.channels,
          hidden_size=config.vision_width,
          intermediate_size=config.mlp_ratio * config.vision_width,
          num_hidden_layers=config.vision_layers,
          num_attention_heads=config.vision_heads,
      ),
      **_processor(config, dict(shortest_edge=config.image_size)),
  )


# save() writes every family load() reads: our config -> their config.json
# (and an image processor's config where the model normalises pixels)
HF_CONFIGS = {
    "gpt2": gpt2_hf_config,
    "llama": llama_hf_config,
    "vit": vit_hf_config,
    "bert": bert_hf_config,
    "clip": clip_hf_config,
}


def save(
    params: dict[str, np.ndarray], family: str, config: Any, path: str
) -> str:
  """Writes ``path/config.json`` and ``path/model.safetensors`` (float32)
  from our parameters ``params`` (by path, blocks unstacked) of a ``family``
  model of ``config``, as ``from_pretrained`` reads them; returns the
  ``model_type`` written.

  Raises:
    CheckpointMismatch: for a family :data:`HF_CONFIGS` does not write, or
      parameters that are not the config's.
  """
  from safetensors.numpy import save_file

  if family not in HF_CONFIGS:
    raise CheckpointMismatch(
        f"writing {family} checkpoints is not built (only"
        f" {', '.join(HF_CONFIGS)})"
    )
  hf_config = HF_CONFIGS[family](config)
  kind = hf_config["model_type"]
  arch = ARCHITECTURES[kind]
  names = arch.names(config)
  unknown = sorted(set(params) - set(names))  # names hold every head
  if unknown:
    raise CheckpointMismatch(
        f"the parameters are not a {kind} model's of this config: "
        + ", ".join(unknown[:8])
    )
  outside = re.compile(arch.outside)
  tensors = {}
  for ours, value in params.items():
    theirs, convert, *inverse = names[ours]
    # a conversion without its inverse is its own (_linear, _same)
    values = (inverse or [convert])[0](np.asarray(value, np.float32))
    if not isinstance(theirs, tuple):
      theirs, values = (theirs,), (values,)
    for name, x in zip(theirs, values, strict=True):
      name = name if outside.search(name) else arch.prefix + name
      tensors[name] = np.array(x, order="C")  # (ascontiguousarray: >= 1-d)
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  processor = hf_config.pop(PREPROCESSOR, None)
  if processor is not None:
    (out / PREPROCESSOR).write_text(json.dumps(processor, indent=2) + "\n")
  hf_config["torch_dtype"] = "float32"
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return kind


def _patch_kernel(w):  # Conv2d (d, c, p, p) -> Linear on (p, p, c) patches
  d = w.shape[0]
  return w.transpose(2, 3, 1, 0).reshape(-1, d)


def _conv_kernel(patch: int, channels: int) -> Callable:
  """The inverse of :func:`_patch_kernel` for ``patch`` x ``patch`` patches
  of ``channels`` channels."""
  return lambda w: w.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)


def _split_qkv(w):  # our fused (d, 3d) kernel or (3d,) bias -> theirs, each
  parts = np.split(w, 3, axis=-1)
  return tuple(x.T if x.ndim == 2 else x for x in parts)


def vit_names(config: vit.ViTConfig) -> dict:
  """Our parameter path -> (their tensor name(s), conversion): the separate
  query, key and value matrices become the fused ``qkv``."""
  e = "embeddings"
  names = {
      "cls_token": (f"{e}.cls_token", _same),
      "pos_embed": (f"{e}.position_embeddings", _same),
      "patch_embed/kernel": (
          f"{e}.patch_embeddings.projection.weight",
          _patch_kernel,
          _conv_kernel(config.patch_size, config.channels),
      ),
      "patch_embed/bias": (f"{e}.patch_embeddings.projection.bias", _same),
      **_layer_norm("ln", "layernorm"),
      **_dense("head", "classifier"),
  }
  for i in range(config.n_layers):
    h, b = f"encoder.layer.{i}", f"blocks/{i}"
    qkv = [f"{h}.attention.attention.{x}" for x in ("query", "key", "value")]
    names.update(_layer_norm(f"{b}/ln1", f"{h}.layernorm_before"))
    names.update(_layer_norm(f"{b}/ln2", f"{h}.layernorm_after"))
    names[f"{b}/attn/qkv/kernel"] = (
        tuple(f"{x}.weight" for x in qkv),
        lambda *w: np.concatenate([x.T for x in w], axis=1),
        _split_qkv,
    )
    names[f"{b}/attn/qkv/bias"] = (
        tuple(f"{x}.bias" for x in qkv),
        lambda *b: np.concatenate(b),
        _split_qkv,
    )
    names.update(_dense(f"{b}/attn/proj", f"{h}.attention.output.dense"))
    names.update(_dense(f"{b}/mlp/fc", f"{h}.intermediate.dense"))
    names.update(_dense(f"{b}/mlp/proj", f"{h}.output.dense"))
  return names


def bert_names(config: bert.BertConfig, roberta: bool) -> dict:
  """Our parameter path -> (their tensor name, conversion), for BERT's and
  RoBERTa's heads alike."""
  e = "embeddings"
  names = {
      "tok/embedding": (f"{e}.word_embeddings.weight", _same),
      "pos/embedding": (f"{e}.position_embeddings.weight", _same),
      "seg/embedding": (f"{e}.token_type_embeddings.weight", _same),
      **_layer_norm("ln_embed", f"{e}.LayerNorm"),
  }
  if roberta:
    names.update(_dense("pool", "classifier.dense"))
    names.update(_dense("classifier", "classifier.out_proj"))
    names.update(_dense("mlm_dense", "lm_head.dense"))
    names.update(_layer_norm("mlm_ln", "lm_head.layer_norm"))
    names["mlm_bias"] = ("lm_head.bias", _same)
  else:
    names.update(_dense("pool", "pooler.dense"))
    names.update(_dense("classifier", "classifier"))
    names.update(_dense("mlm_dense", "cls.predictions.transform.dense"))
    names.update(_layer_norm("mlm_ln", "cls.predictions.transform.LayerNorm"))
    names["mlm_bias"] = ("cls.predictions.bias", _same)
  for i in range(config.n_layers):
    h, b = f"encoder.layer.{i}", f"blocks/{i}"
    for x in ("query", "key", "value"):
      names.update(_dense(f"{b}/attn/{x}", f"{h}.attention.self.{x}"))
    names.update(_dense(f"{b}/attn/proj", f"{h}.attention.output.dense"))
    names.update(_layer_norm(f"{b}/ln1", f"{h}.attention.output.LayerNorm"))
    names.update(_dense(f"{b}/mlp/fc", f"{h}.intermediate.dense"))
    names.update(_dense(f"{b}/mlp/proj", f"{h}.output.dense"))
    names.update(_layer_norm(f"{b}/ln2", f"{h}.output.LayerNorm"))
  return names


def _clip_blocks(ours: str, theirs: str, layers: int) -> dict:
  names = {}
  for i in range(layers):
    h, b = f"{theirs}.encoder.layers.{i}", f"{ours}/blocks/{i}"
    for x, y in (("query", "q"), ("key", "k"), ("value", "v"), ("proj", "out")):
      names.update(_dense(f"{b}/attn/{x}", f"{h}.self_attn.{y}_proj"))
    names.update(_layer_norm(f"{b}/ln1", f"{h}.layer_norm1"))
    names.update(_layer_norm(f"{b}/ln2", f"{h}.layer_norm2"))
    names.update(_dense(f"{b}/mlp/fc", f"{h}.mlp.fc1"))
    names.update(_dense(f"{b}/mlp/proj", f"{h}.mlp.fc2"))
  return names


def clip_names(config: clip.CLIPConfig) -> dict:
  """Our parameter path -> (their tensor name, conversion)."""
  v, t = "vision_model", "text_model"
  return {
      "image/patch_embed/kernel": (
          f"{v}.embeddings.patch_embedding.weight",
          _patch_kernel,
          _conv_kernel(config.patch_size, config.channels),
      ),
      "image/cls_token": (f"{v}.embeddings.class_embedding", _same),
      "image/pos_embed": (f"{v}.embeddings.position_embedding.weight", _same),
      **_layer_norm("image/ln_pre", f"{v}.pre_layrnorm"),
      **_clip_blocks("image", v, config.vision_layers),
      **_layer_norm("image/ln_post", f"{v}.post_layernorm"),
      "image/proj/kernel": ("visual_projection.weight", _linear),
      "text/tok/embedding": (f"{t}.embeddings.token_embedding.weight", _same),
      "text/pos_embed": (f"{t}.embeddings.position_embedding.weight", _same),
      **_clip_blocks("text", t, config.text_layers),
      **_layer_norm("text/ln_final", f"{t}.final_layer_norm"),
      "text/proj/kernel": ("text_projection.weight", _linear),
      "logit_scale": ("logit_scale", _same),
  }


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How a Hugging Face ``model_type``'s checkpoints become ours (its family
  in :data:`models.registry.MODELS` gives the module and heads)."""

  prefix: str  # of the backbone's tensor names in a checkpoint with a head
  config: Callable[[dict, str], Any]
  names: Callable[[Any], dict]
  # their tensors that are never ours: buffers, tied copies, unbuilt heads
  ignorable: str = r"$^"
  # their tensor names outside the prefix (a head beside the backbone)
  outside: str = r"$^"


ARCHITECTURES = {
    "gpt2": Architecture(
        prefix="transformer.",
        config=gpt2_config,
        names=gpt2_names,
        ignorable=r"^(lm_head\.weight|h\.\d+\.attn\.(masked_)?bias)$",
    ),
    "vit": Architecture(
        prefix="vit.",
        config=vit_config,
        names=vit_names,
        ignorable=r"^(pooler|classifier)\.",
        outside=r"^classifier\.",
    ),
    "bert": Architecture(
        prefix="bert.",
        config=bert_config,
        names=lambda c: bert_names(c, roberta=False),
        ignorable=r"^((cls|pooler|classifier)\.|embeddings\.position_ids$)",
        outside=r"^(cls|classifier)\.",
    ),
    "roberta": Architecture(
        prefix="roberta.",
        config=bert_config,
        names=lambda c: bert_names(c, roberta=True),
        ignorable=r"^((lm_head|pooler|classifier)\.|embeddings\.position_ids$)",
        outside=r"^(lm_head|classifier)\.",
    ),
    "clip": Architecture(
        prefix="",
        config=clip_config,
        names=clip_names,
        ignorable=r"position_ids$",
    ),
    **{
        kind: Architecture(
            prefix="model.",
            config=llama_config,
            names=llama_names,
            # rotary buffers of older checkpoints; a tied output's copy
            ignorable=r"(rotary_emb\.inv_freq$|^lm_head\.weight$)",
            outside=r"^lm_head\.",
        )
        for kind in ("llama", "mistral", "qwen2")
    },
}


def _strip(tensors: dict[str, np.ndarray], prefix: str) -> dict:
  """The backbone's tensors lose their prefix; the heads' keep their names."""
  return {
      (k[len(prefix) :] if k.startswith(prefix) else k): v
      for k, v in tensors.items()
  }


def _path(key: tuple) -> str:
  return "/".join(str(k) for k in key)


def stack_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``[tower/]blocks/<i>/rest`` -> ``[tower/]blocks/rest`` with a leading
  layer axis."""
  out, layers = {}, {}
  for k, v in flat.items():
    m = re.match(r"(.*?blocks)/(\d+)/(.*)", k)
    if m:
      layers.setdefault(f"{m[1]}/{m[3]}", {})[int(m[2])] = v
    else:
      out[k] = v
  for path, by_layer in layers.items():
    out[path] = np.stack([by_layer[i] for i in sorted(by_layer)])
  return out


def unstack_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of :func:`stack_layers`; unstacked entries pass as they are."""
  out = {}
  for k, v in flat.items():
    m = re.match(r"(.*?blocks)/(\D[^/]*/.*)", k)
    if m:
      out.update({f"{m[1]}/{i}/{m[2]}": layer for i, layer in enumerate(v)})
    else:
      out[k] = v
  return out


def _architecture(
    source: str, expect_model: Optional[str]
) -> tuple[pathlib.Path, dict, Architecture, registry.ModelSpec]:
  path = resolve(source)
  hf = json.loads((path / "config.json").read_text())
  processor = path / PREPROCESSOR
  if processor.is_file():  # how its images were prepared
    hf[PREPROCESSOR] = json.loads(processor.read_text())
  kind = hf.get("model_type")
  arch = ARCHITECTURES.get(kind)
  if arch is None:
    raise CheckpointMismatch(
        f"{source}: model_type {kind!r} is not one of {sorted(ARCHITECTURES)}"
    )
  family = registry.family_of(kind)
  if expect_model is not None and family != expect_model:
    raise CheckpointMismatch(
        f"{source}: a {kind!r} checkpoint cannot initialise a"
        f" {expect_model!r} model (it is a {family!r} model)"
    )
  return path, hf, arch, registry.MODELS[family]


def checkpoint_config(source: str, expect_model: Optional[str] = None) -> Any:
  """The model config (:class:`models.GPT2Config`, ...) of checkpoint
  ``source``, from its ``config.json``."""
  _, hf, arch, _ = _architecture(source, expect_model)
  return arch.config(hf, source)


def flat_params(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters by path (``blocks/0/attn/qkv/kernel``)."""
  return {_path(k): v for k, v in nnx.to_flat_state(nnx.state(model))}


def fit_params(
    flat: dict[str, Any],
    values: dict[str, np.ndarray],
    heads: tuple[str, ...],
    named: Callable[[str], str] = lambda path: path,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """Matches ``values`` (by path) to a model's parameters ``flat``
  (:func:`flat_params`): ``(every parameter's value, the fresh ones,
  problems)``. A parameter under ``heads`` that ``values`` lacks or holds in
  another shape keeps its initialisation (fresh); any other is a problem,
  described through ``named(path)``."""
  out, fresh, problems = {}, [], []
  for path, variable in flat.items():
    value, want = values.get(path), tuple(variable[...].shape)
    if value is not None:
      value = np.asarray(value)
    if value is None or value.shape != want:
      if path.startswith(heads):
        fresh.append(path)  # a new head, or one for another number of labels
        out[path] = np.asarray(variable[...])
      elif value is None:
        problems.append(f"missing {named(path)}")
      else:
        problems.append(f"{named(path)} has shape {value.shape}, not {want}")
      continue
    out[path] = value
  return out, fresh, problems


def set_params(model: nnx.Module, values: dict[str, np.ndarray]) -> None:
  """Sets every parameter of ``model`` from ``values`` (by path), cast to its
  dtype."""
  state = nnx.state(model)
  nnx.update(
      model,
      nnx.from_flat_state({
          k: v.replace(jnp.asarray(values[_path(k)], v[...].dtype))
          for k, v in nnx.to_flat_state(state)
      }),
  )


def load(
    source: str,
    *,
    expect_model: Optional[str] = None,
    seed: int = 0,
    config: Optional[Any] = None,
    **overrides,
) -> tuple[nnx.Module, LoadReport]:
  """The model of checkpoint ``source`` (see :func:`resolve`) with its weights.

  Args:
    source: ``hf:NAME`` or a directory.
    expect_model: the family that will train it (a key of
      :data:`models.registry.MODELS`): a checkpoint of another is refused.
    seed: initialises what the checkpoint does not hold (a new head).
    config: the model config to build, by default :func:`checkpoint_config`.
    overrides: fields of the model config to set (``num_labels`` for a
      classifier on an encoder, ``dtype``, ``param_dtype``, ``remat``,
      ``stacked``). A head whose size changes is initialised afresh.

  Raises:
    CheckpointMismatch: naming the model type, tensor or shape that does not
      fit.
  """
  path, hf, arch, spec = _architecture(source, expect_model)
  kind = hf["model_type"]
  config = dataclasses.replace(config or arch.config(hf, source), **overrides)
  tensors = _strip(read_tensors(path), arch.prefix)
  names = arch.names(config)
  model = spec.model(
      dataclasses.replace(config, stacked=False), rngs=nnx.Rngs(seed)
  )
  flat = flat_params(model)
  unnamed = [p for p in flat if p not in names]
  if unnamed:  # the names table and the model disagree: a bug here
    raise CheckpointMismatch(
        f"no {kind} tensor maps to our parameter(s) {', '.join(unnamed)}"
    )
  sources, converted = {}, {}
  for ours in flat:
    theirs, convert = names[ours][:2]
    sources[ours] = theirs if isinstance(theirs, tuple) else (theirs,)
    if all(t in tensors for t in sources[ours]):
      converted[ours] = convert(*(tensors[t] for t in sources[ours]))
  values, fresh, problems = fit_params(
      flat,
      converted,
      spec.heads,
      named=lambda p: f"tensor {', '.join(sources[p])} (for {p})",
  )
  used = {t for p in converted if p not in fresh for t in sources[p]}
  ignorable = re.compile(arch.ignorable)
  leftover = sorted(set(tensors) - used)
  unknown = [t for t in leftover if not ignorable.search(t)]
  if unknown:
    problems.append(
        f"{len(unknown)} tensor(s) fit no parameter of a {kind} model:"
        f" {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
    )
  if problems:
    raise CheckpointMismatch(
        f"{source} ({kind}) does not fit: " + "; ".join(problems[:12])
    )
  if config.stacked:
    values = stack_layers(values)
    model = spec.model(config, rngs=nnx.Rngs(seed))
  set_params(model, values)
  report = LoadReport(
      source=source,
      model_type=kind,
      config=config,
      fresh=fresh,
      ignored=[t for t in leftover if ignorable.search(t)],
  )
  return model, report
