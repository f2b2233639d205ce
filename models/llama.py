"""LLaMA-family decoders in Flax NNX (LLaMA 1-3, Mistral, Qwen2): RMSNorm,
rotary position embeddings, grouped-query attention, SwiGLU MLP, no biases
(Qwen2's query, key and value biases as an option), output tied to the
embedding or not.

Parameter paths read ``blocks/<i>/attn/{q,k,v,o}/kernel`` and
``blocks/<i>/mlp/{gate,up,down}/kernel``, so GaLore's rule
(:data:`models.transformer.GALORE_TARGETS`) targets the seven matrices the
paper projects. Stacked blocks (``stacked=True``) drop the ``<i>``, as
:mod:`models.transformer`'s do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer

# rope_scaling's rope_type values built here; others are refused by name
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  max_len: int = 1024  # max_position_embeddings
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: Optional[int] = None  # grouped-query attention; None: n_heads
  head_dim: Optional[int] = None  # None: d_model // n_heads
  hidden: int = 11008  # the MLP's intermediate size
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # rope_scaling: "default" (none), "linear" (positions / factor) or "llama3"
  # (Llama 3.1's frequency-dependent factor)
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  sliding_window: Optional[int] = None  # Mistral's: keys within this distance
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2's
  dtype: str = "float32"  # of the computation (transformer.DTYPES)
  param_dtype: str = "float32"
  remat: bool = False  # recompute each block's activations in the backward
  stacked: bool = False  # blocks as one stacked block (the layer-wise step's)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.n_heads


def _galore_preset(d: int, hidden: int, heads: int, layers: int):
  """A config of the GaLore repository (configs/llama_*.json): vocabulary
  32000, 1024 positions, RMSNorm eps 1e-6, untied output."""
  return LlamaConfig(d_model=d, hidden=hidden, n_heads=heads, n_layers=layers)


PRESETS = {
    # tests: grouped-query attention, 2 key/value heads for 4 query heads
    "tiny": LlamaConfig(
        vocab_size=256,
        max_len=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden=176,
    ),
    # the default run: 9m's blocks on a byte vocabulary
    "cpu": LlamaConfig(
        vocab_size=256,
        max_len=256,
        d_model=128,
        n_layers=4,
        n_heads=4,
        hidden=352,
    ),
    "9m": _galore_preset(128, 352, 4, 4),
    "20m": _galore_preset(256, 688, 4, 4),
    "60m": _galore_preset(512, 1376, 8, 8),
    "130m": _galore_preset(768, 2048, 12, 12),
    "350m": _galore_preset(1024, 2736, 16, 24),
    "1b": _galore_preset(2048, 5461, 32, 24),
    "7b": _galore_preset(4096, 11008, 32, 32),
}


def rope_frequencies(config: LlamaConfig) -> jax.Array:
  """The rotary inverse frequencies (head_size / 2,), float32, with
  ``rope_type``'s scaling.

  ``llama3``: wavelengths longer than ``original_max_len / low_freq_factor``
  are divided by ``factor``, those shorter than ``original_max_len /
  high_freq_factor`` kept, and those between interpolated linearly in
  ``original_max_len / wavelength``.
  """
  half = config.head_size // 2
  inv = 1.0 / config.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  if config.rope_type == "linear":
    return inv / config.rope_factor
  if config.rope_type == "llama3":
    old, factor = config.rope_original_max_len, config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / inv
    smooth = (old / wavelength - low) / (high - low)
    between = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(
        wavelength > old / low,
        inv / factor,
        jnp.where(wavelength < old / high, inv, between),
    )
  return inv


def rotate(x: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding of ``x`` (batch, length, heads, head_size) at positions
  0..length-1, in the half-split layout of Hugging Face's checkpoints (the
  first half of each head pairs with the second)."""
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
  angles = jnp.concatenate([angles, angles], -1)[None, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  turned = jnp.concatenate([-second, first], -1)
  return (x * jnp.cos(angles) + turned * jnp.sin(angles)).astype(x.dtype)


def _linear(d_in, d_out, std, dtypes, rngs, bias=False) -> nnx.Linear:
  return nnx.Linear(
      d_in,
      d_out,
      use_bias=bias,
      kernel_init=nnx.initializers.normal(std),
      rngs=rngs,
      **dtypes,
  )


class Attention(nnx.Module):
  """Grouped-query causal self-attention: ``q`` (d, heads * head_size), ``k``
  and ``v`` (d, kv_heads * head_size), ``o`` (heads * head_size, d)."""

  def __init__(self, config: LlamaConfig, *, dtypes: dict, rngs: nnx.Rngs):
    if config.n_heads % config.kv_heads:
      raise ValueError(
          f"n_heads {config.n_heads} is not a multiple of n_kv_heads"
          f" {config.kv_heads}"
      )
    self.config = config
    d, hs = config.d_model, config.head_size
    self.q = _linear(
        d, config.n_heads * hs, 0.02, dtypes, rngs, config.qkv_bias
    )
    self.k = _linear(
        d, config.kv_heads * hs, 0.02, dtypes, rngs, config.qkv_bias
    )
    self.v = _linear(
        d, config.kv_heads * hs, 0.02, dtypes, rngs, config.qkv_bias
    )
    out_std = 0.02 / (2 * config.n_layers) ** 0.5
    self.o = _linear(config.n_heads * hs, d, out_std, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    c = self.config
    heads = lambda y: y.reshape(b, t, -1, c.head_size)
    inv_freq = rope_frequencies(c)
    q = rotate(heads(self.q(x)), inv_freq)
    k = rotate(heads(self.k(x)), inv_freq)
    window = c.sliding_window
    # a key at most window - 1 positions back, where the window is shorter
    # than the sequence (else plain causal attention)
    local = (window - 1, 0) if window and window < t else None
    out = jax.nn.dot_product_attention(
        q, k, heads(self.v(x)), is_causal=True, local_window_size=local
    )
    return self.o(out.reshape(b, t, -1))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, dtypes: dict, rngs: nnx.Rngs):
    d, h = config.d_model, config.hidden
    out_std = 0.02 / (2 * config.n_layers) ** 0.5
    self.gate = _linear(d, h, 0.02, dtypes, rngs)
    self.up = _linear(d, h, 0.02, dtypes, rngs)
    self.down = _linear(h, d, out_std, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-RMSNorm: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""

  def __init__(self, config: LlamaConfig, *, dtypes: dict, rngs: nnx.Rngs):
    norm = lambda: nnx.RMSNorm(
        config.d_model, epsilon=config.rms_norm_eps, rngs=rngs, **dtypes
    )
    self.attn_norm = norm()
    self.attn = Attention(config, dtypes=dtypes, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, dtypes=dtypes, rngs=rngs)

  def __call__(
      self, x: jax.Array, mask: Optional[jax.Array] = None
  ) -> jax.Array:
    # mask: run_blocks' argument, unused: a causal decoder has no padding
    del mask
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """``tokens`` (batch, length) int -> next-token logits (batch, length,
  vocab)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    if config.rope_type not in ROPE_TYPES:
      raise ValueError(
          f"rope scaling {config.rope_type!r} is not built here; these are:"
          f" {ROPE_TYPES}"
      )
    self.config = config
    dtypes = transformer.dtypes(config.dtype, config.param_dtype)
    self.embed_tokens = nnx.Embed(
        config.vocab_size,
        config.d_model,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        **dtypes,
    )
    layers = [
        Block(config, dtypes=dtypes, rngs=rngs) for _ in range(config.n_layers)
    ]
    self.blocks = (
        transformer.stack(layers) if config.stacked else nnx.List(layers)
    )
    self.norm = nnx.RMSNorm(
        config.d_model, epsilon=config.rms_norm_eps, rngs=rngs, **dtypes
    )
    if not config.tie_embeddings:
      self.lm_head = _linear(
          config.d_model, config.vocab_size, 0.02, dtypes, rngs
      )

  def embed(self, tokens: jax.Array) -> jax.Array:
    """(batch, length) int -> the first block's input (batch, length,
    d_model)."""
    transformer.check_length(tokens.shape[-1], self.config.max_len)
    x = transformer.embed(self.embed_tokens.embedding[...], tokens)
    return x.astype(transformer.DTYPES[self.config.dtype])

  def output(self, x: jax.Array) -> jax.Array:
    """The last block's output -> logits (batch, length, vocab)."""
    x = self.norm(x)
    if self.config.tie_embeddings:
      table, dtype = self.embed_tokens.embedding[...], self.embed_tokens.dtype
    else:
      table, dtype = self.lm_head.kernel[...].T, self.lm_head.dtype
    return transformer.logits(x, table, dtype)

  def features(self, tokens: jax.Array) -> jax.Array:
    """The last block's output."""
    return transformer.run_blocks(
        self.blocks, self.embed(tokens), remat=self.config.remat
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.output(self.features(tokens))
