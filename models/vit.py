"""ViT in Flax NNX: patch embedding, class token, learned positions, pre-norm
encoder, linear head."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  num_classes: int = 1000
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: int = 4
  # Flax's LayerNorm default; a Hugging Face checkpoint brings its own
  layer_norm_eps: float = 1e-6
  activation: str = "gelu_tanh"  # transformer.ACTIVATIONS
  dtype: str = "float32"  # of the computation (transformer.DTYPES)
  param_dtype: str = "float32"
  remat: bool = False  # recompute each block's activations in the backward
  stacked: bool = False  # blocks as one stacked Block (the layer-wise step's)
  # per-channel (pixel - mean) / std, as a pretrained checkpoint's image
  # processor applies it to pixels in [0, 1]; empty: pixels enter as given
  pixel_mean: tuple[float, ...] = ()
  pixel_std: tuple[float, ...] = ()

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # tests
    "tiny": ViTConfig(
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        d_model=32,
        n_layers=2,
        n_heads=2,
    ),
    # digits, the default run
    "cpu": ViTConfig(
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        d_model=128,
        n_layers=4,
        n_heads=4,
    ),
    "b16": ViTConfig(),  # ViT-B/16
}


def normalise(
    images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """(b, H, W, C) pixels -> ``(pixels - mean) / std`` per channel; the pixels
  unchanged when ``mean`` is empty."""
  if not mean:
    return images
  mean, std = (jnp.asarray(v, images.dtype) for v in (mean, std))
  return (images - mean) / std


def patchify(
    images: jax.Array, image_size: int, channels: int, patch_size: int
) -> jax.Array:
  """(b, H, W, C) -> (b, num_patches, patch_size^2 C), row by row; the images
  must be (image_size, image_size, channels)."""
  b, h, w, c = images.shape
  if (h, w, c) != (image_size, image_size, channels):
    raise ValueError(
        f"images of shape {(h, w, c)} do not fit the model's "
        f"{(image_size, image_size, channels)}"
    )
  p = patch_size
  x = jnp.reshape(
      images,
      (b, h // p, p, w // p, p, c),
      out_sharding=transformer.batch_spec(images, 6),
  )
  return jnp.reshape(
      x.transpose(0, 1, 3, 2, 4, 5),
      (b, (h // p) * (w // p), p * p * c),
      out_sharding=transformer.batch_spec(images, 3),
  )


def with_class_token(patches: jax.Array, cls_token: jax.Array) -> jax.Array:
  """(b, n, d) patch embeddings -> (b, 1 + n, d): the class token (d values,
  any leading unit axes) first, in the patches' dtype."""
  b, _, d = patches.shape
  cls = jnp.broadcast_to(
      cls_token.astype(patches.dtype).reshape(1, 1, d),
      (b, 1, d),
      out_sharding=transformer.batch_spec(patches, 3),
  )
  return jnp.concatenate([cls, patches], axis=1)


class ViT(nnx.Module):
  """``images`` (batch, height, width, channels) float -> class logits (batch,
  num_classes)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    if config.image_size % config.patch_size:
      raise ValueError(
          f"image_size {config.image_size} is not a multiple of patch_size"
          f" {config.patch_size}"
      )
    self.config = config
    d = config.d_model
    dtypes = transformer.dtypes(config.dtype, config.param_dtype)
    param_dtype = dtypes["param_dtype"]
    self.patch_embed = nnx.Linear(
        config.patch_size**2 * config.channels, d, rngs=rngs, **dtypes
    )
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d), param_dtype))
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(
            rngs.params(), (1, config.num_patches + 1, d), param_dtype
        )
    )
    self.blocks = transformer.blocks(
        d,
        config.n_heads,
        config.mlp_ratio,
        config.n_layers,
        causal=False,
        eps=config.layer_norm_eps,
        activation=config.activation,
        dtypes=dtypes,
        stacked=config.stacked,
        rngs=rngs,
    )
    self.ln = nnx.LayerNorm(
        d, epsilon=config.layer_norm_eps, rngs=rngs, **dtypes
    )
    self.head = nnx.Linear(
        d,
        config.num_classes,
        kernel_init=nnx.initializers.zeros_init(),
        rngs=rngs,
        **dtypes,
    )

  def patchify(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    images = normalise(images, cfg.pixel_mean, cfg.pixel_std)
    return patchify(images, cfg.image_size, cfg.channels, cfg.patch_size)

  def embed(self, images: jax.Array) -> jax.Array:
    """(batch, H, W, C) -> the first block's input (batch, 1 + num_patches,
    d_model): the class token, then the patches."""
    x = self.patch_embed(self.patchify(images))
    x = with_class_token(x, self.cls_token[...]) + self.pos_embed[...]
    return x.astype(transformer.DTYPES[self.config.dtype])

  def output(self, x: jax.Array) -> jax.Array:
    """The last block's output -> class logits (batch, num_classes)."""
    return self.head(self.ln(x[:, 0]))

  def features(self, images: jax.Array) -> jax.Array:
    """The last block's output."""
    return transformer.run_blocks(
        self.blocks, self.embed(images), remat=self.config.remat
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.output(self.features(images))
