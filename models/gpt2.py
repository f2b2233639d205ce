"""GPT-2 in Flax NNX: learned positions, pre-LayerNorm causal blocks, GELU MLP,
tied embeddings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  max_len: int = 1024
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


PRESETS = {
    # tests
    "tiny": GPT2Config(
        vocab_size=256, max_len=128, d_model=64, n_layers=2, n_heads=4
    ),
    # the default run
    "cpu": GPT2Config(
        vocab_size=256, max_len=256, d_model=128, n_layers=4, n_heads=4
    ),
    "124m": GPT2Config(),  # GPT-2 small
    "350m": GPT2Config(d_model=1024, n_layers=24, n_heads=16),  # GPT-2 medium
    "774m": GPT2Config(d_model=1280, n_layers=36, n_heads=20),  # GPT-2 large
    "1.5b": GPT2Config(d_model=1600, n_layers=48, n_heads=25),  # GPT-2 XL
    # LLaMA-7B's width and depth with GPT-2's blocks, for memory planning
    "7b": GPT2Config(d_model=4096, n_layers=32, n_heads=32),
}


class GPT2(nnx.Module):
  """``tokens`` (batch, length) int -> next-token logits (batch, length,
  vocab)."""

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    self.config = config
    dtypes = transformer.dtypes(config.dtype, config.param_dtype)
    self.wte = nnx.Embed(
        config.vocab_size,
        config.d_model,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        **dtypes,
    )
    self.wpe = nnx.Embed(
        config.max_len,
        config.d_model,
        embedding_init=nnx.initializers.normal(0.01),
        rngs=rngs,
        **dtypes,
    )
    self.blocks = transformer.blocks(
        config.d_model,
        config.n_heads,
        config.mlp_ratio,
        config.n_layers,
        causal=True,
        eps=config.layer_norm_eps,
        activation=config.activation,
        dtypes=dtypes,
        stacked=config.stacked,
        rngs=rngs,
    )
    self.ln_f = nnx.LayerNorm(
        config.d_model, epsilon=config.layer_norm_eps, rngs=rngs, **dtypes
    )

  def embed(self, tokens: jax.Array) -> jax.Array:
    """(batch, length) int -> the first block's input (batch, length,
    d_model)."""
    length = tokens.shape[-1]
    transformer.check_length(length, self.config.max_len)
    x = transformer.embed(self.wte.embedding[...], tokens) + self.wpe(
        jnp.arange(length)
    )
    return x.astype(transformer.DTYPES[self.config.dtype])

  def output(self, x: jax.Array) -> jax.Array:
    """The last block's output -> logits (batch, length, vocab)."""
    # tied output embedding
    return transformer.logits(
        self.ln_f(x), self.wte.embedding[...], self.wte.dtype
    )

  def features(self, tokens: jax.Array) -> jax.Array:
    """The last block's output."""
    return transformer.run_blocks(
        self.blocks, self.embed(tokens), remat=self.config.remat
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.output(self.features(tokens))
