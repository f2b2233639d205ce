"""CLIP in Flax NNX: a ViT image tower and a causal text transformer, each
projected into one embedding space, compared by cosine similarity at a learned
temperature.

Image tower: patches (no bias) plus a class token and learned positions,
a LayerNorm, pre-LN blocks (:mod:`models.transformer`, as ViT's), a LayerNorm
of the class token's output, a projection (no bias). Text tower: token and
learned position embeddings, causal pre-LN blocks, a final LayerNorm, the
features at the first end-of-text token, a projection (no bias). The attention
matrices are kept apart (``attn/{query,key,value,proj}``), as the Hugging Face
checkpoints hold them, so GaLore's rule (``GALORE_TARGETS``) picks both towers'
attention and MLP matrices.

Logits: ``exp(logit_scale) * normalize(image) @ normalize(text)^T``, (images,
texts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer
from models import vit


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  # image tower
  image_size: int = 224
  patch_size: int = 32
  channels: int = 3
  # per-channel (pixel - mean) / std (see models.vit.ViTConfig); empty: none
  pixel_mean: tuple[float, ...] = ()
  pixel_std: tuple[float, ...] = ()
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  # text tower
  vocab_size: int = 49408
  max_len: int = 77
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  # the id whose first occurrence is pooled; None: the largest id in each
  # sequence (OpenAI's end-of-text token is the vocabulary's last)
  eot_token: Optional[int] = 49407
  embed_dim: int = 512  # the shared embedding space
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"  # transformer.ACTIVATIONS
  logit_scale_init: float = math.log(1 / 0.07)
  dtype: str = "float32"  # of the computation (transformer.DTYPES)
  param_dtype: str = "float32"
  remat: bool = False  # recompute each block's activations in the backward
  stacked: bool = False  # each tower's blocks as one stacked Block

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def d_model(self) -> int:
    """The narrower tower's width (GaLore's default rank is a quarter of it)."""
    return min(self.vision_width, self.text_width)


# Byte-level captions: bytes 0-255, end-of-text 256 (also the padding).
BYTE_VOCAB, BYTE_EOT = 257, 256

PRESETS = {
    # tests: digits (8x8 grayscale) and byte captions
    "tiny": CLIPConfig(
        image_size=8,
        patch_size=2,
        channels=1,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        vocab_size=BYTE_VOCAB,
        max_len=48,
        text_width=32,
        text_layers=2,
        text_heads=2,
        eot_token=BYTE_EOT,
        embed_dim=32,
    ),
    # the default run on digits
    "cpu": CLIPConfig(
        image_size=8,
        patch_size=2,
        channels=1,
        vision_width=128,
        vision_layers=4,
        vision_heads=4,
        vocab_size=BYTE_VOCAB,
        max_len=48,
        text_width=128,
        text_layers=4,
        text_heads=4,
        eot_token=BYTE_EOT,
        embed_dim=128,
    ),
    "b32": CLIPConfig(),  # ViT-B/32 with OpenAI's text transformer
}


def _tower_blocks(config, width, layers, heads, causal, dtypes, rngs):
  return transformer.blocks(
      width,
      heads,
      config.mlp_ratio,
      layers,
      causal=causal,
      eps=config.layer_norm_eps,
      activation=config.activation,
      fused_qkv=False,
      dtypes=dtypes,
      stacked=config.stacked,
      rngs=rngs,
  )


class ImageTower(nnx.Module):
  """``images`` (batch, H, W, C) -> embeddings (batch, embed_dim), not
  normalised."""

  def __init__(self, config: CLIPConfig, dtypes: dict, rngs: nnx.Rngs):
    if config.image_size % config.patch_size:
      raise ValueError(
          f"image_size {config.image_size} is not a multiple of patch_size"
          f" {config.patch_size}"
      )
    self.config = config
    d, param_dtype = config.vision_width, dtypes["param_dtype"]
    init = nnx.initializers.normal(0.02)
    self.patch_embed = nnx.Linear(
        config.patch_size**2 * config.channels,
        d,
        use_bias=False,
        kernel_init=init,
        rngs=rngs,
        **dtypes,
    )
    self.cls_token = nnx.Param(init(rngs.params(), (d,), param_dtype))
    self.pos_embed = nnx.Param(
        init(rngs.params(), (config.num_patches + 1, d), param_dtype)
    )
    eps = config.layer_norm_eps
    self.ln_pre = nnx.LayerNorm(d, epsilon=eps, rngs=rngs, **dtypes)
    self.blocks = _tower_blocks(
        config,
        d,
        config.vision_layers,
        config.vision_heads,
        False,
        dtypes,
        rngs,
    )
    self.ln_post = nnx.LayerNorm(d, epsilon=eps, rngs=rngs, **dtypes)
    self.proj = nnx.Linear(
        d,
        config.embed_dim,
        use_bias=False,
        kernel_init=init,
        rngs=rngs,
        **dtypes,
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    images = vit.normalise(images, cfg.pixel_mean, cfg.pixel_std)
    x = self.patch_embed(
        vit.patchify(images, cfg.image_size, cfg.channels, cfg.patch_size)
    )
    x = vit.with_class_token(x, self.cls_token[...])
    x = x + self.pos_embed[...].astype(x.dtype)
    x = transformer.run_blocks(self.blocks, self.ln_pre(x), remat=cfg.remat)
    return self.proj(self.ln_post(x[:, 0]))


class TextTower(nnx.Module):
  """``tokens`` (batch, length) int -> embeddings (batch, embed_dim), not
  normalised: the features at each sequence's end-of-text token."""

  def __init__(self, config: CLIPConfig, dtypes: dict, rngs: nnx.Rngs):
    self.config = config
    d, param_dtype = config.text_width, dtypes["param_dtype"]
    init = nnx.initializers.normal(0.02)
    self.tok = nnx.Embed(
        config.vocab_size, d, embedding_init=init, rngs=rngs, **dtypes
    )
    self.pos_embed = nnx.Param(
        init(rngs.params(), (config.max_len, d), param_dtype)
    )
    self.blocks = _tower_blocks(
        config, d, config.text_layers, config.text_heads, True, dtypes, rngs
    )
    self.ln_final = nnx.LayerNorm(
        d, epsilon=config.layer_norm_eps, rngs=rngs, **dtypes
    )
    self.proj = nnx.Linear(
        d,
        config.embed_dim,
        use_bias=False,
        kernel_init=init,
        rngs=rngs,
        **dtypes,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    t = tokens.shape[1]
    transformer.check_length(t, cfg.max_len)
    x = transformer.embed(self.tok.embedding[...], tokens)
    x = (x + self.pos_embed[:t]).astype(transformer.DTYPES[cfg.dtype])
    x = self.ln_final(transformer.run_blocks(self.blocks, x, remat=cfg.remat))
    where = (
        tokens.argmax(-1)
        if cfg.eot_token is None
        else (tokens == cfg.eot_token).argmax(-1)
    )
    return self.proj(jnp.take_along_axis(x, where[:, None, None], 1)[:, 0])


def normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIP(nnx.Module):
  """``(images, tokens)`` -> logits (images, texts): the scaled cosine
  similarity of every image with every text."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtypes = transformer.dtypes(config.dtype, config.param_dtype)
    self.image = ImageTower(config, dtypes, rngs)
    self.text = TextTower(config, dtypes, rngs)
    self.logit_scale = nnx.Param(
        jnp.asarray(config.logit_scale_init, dtypes["param_dtype"])
    )

  def embed_images(self, images: jax.Array) -> jax.Array:
    """(batch, H, W, C) -> unit vectors (batch, embed_dim), float32."""
    return normalize(self.image(images))

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    """(batch, length) -> unit vectors (batch, embed_dim), float32."""
    return normalize(self.text(tokens))

  def similarity(self, images: jax.Array, texts: jax.Array) -> jax.Array:
    """Unit embeddings (n, e) and (m, e) -> logits (n, m), replicated on an
    explicit-sharding mesh. The scale is
    capped at 100, as CLIP's training caps it (its pretrained value)."""
    scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
    # whole on every device: each row mixes every text of the batch
    images, texts = transformer.replicated(images), transformer.replicated(
        texts
    )
    return jnp.minimum(scale, 100.0) * (images @ texts.T)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    return self.similarity(self.embed_images(images), self.embed_texts(tokens))
