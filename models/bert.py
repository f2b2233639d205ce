"""A BERT / RoBERTa-style encoder in Flax NNX: token, position and segment
embeddings, bidirectional blocks (post-LayerNorm as BERT and RoBERTa, or
pre-LayerNorm), and either a masked-LM head or a sequence classification /
regression head.

Inputs are a tuple ``(tokens, segments, mask)`` of (batch, length) arrays:
token ids, segment (token type) ids, and a bool mask that is False at padding.
The attention matrices are kept apart, ``attn/{query,key,value,proj}``, as in
BERT, so that GaLore (``GALORE_TARGETS``) and LoRA see the matrices the paper
fine-tunes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer

Inputs = tuple[jax.Array, jax.Array, jax.Array]  # tokens, segments, mask


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  max_len: int = 512
  type_vocab_size: int = 2
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-12
  # RoBERTa numbers positions from its padding id + 1 (and gives padding the
  # padding id); BERT from 0. None: BERT's rule.
  padding_position: Optional[int] = None
  pre_ln: bool = False  # BERT and RoBERTa are post-LayerNorm
  # 0: the masked-LM head; k > 0: a k-way classification head (1: regression)
  num_labels: int = 0
  dtype: str = "float32"  # of the computation (transformer.DTYPES)
  param_dtype: str = "float32"
  remat: bool = False  # recompute each block's activations in the backward
  stacked: bool = False  # blocks as one stacked Block


PRESETS = {
    # tests
    "tiny": BertConfig(
        vocab_size=260, max_len=128, d_model=64, n_layers=2, n_heads=4
    ),
    # the default run: bytes and 4 special tokens
    "cpu": BertConfig(
        vocab_size=260, max_len=256, d_model=128, n_layers=4, n_heads=4
    ),
    "base": BertConfig(),  # BERT-base (RoBERTa-base: vocabulary 50265)
    "large": BertConfig(d_model=1024, n_layers=24, n_heads=16),
}


class Bert(nnx.Module):
  """``(tokens, segments, mask)`` -> MLM logits (batch, length, vocab), or
  class logits (batch, num_labels) from the first position."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.d_model
    dtypes = transformer.dtypes(config.dtype, config.param_dtype)
    embed = lambda n: nnx.Embed(
        n,
        d,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        **dtypes,
    )
    layer_norm = lambda: nnx.LayerNorm(
        d, epsilon=config.layer_norm_eps, rngs=rngs, **dtypes
    )
    dense = lambda n: nnx.Linear(
        d,
        n,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        **dtypes,
    )
    positions = config.max_len + (
        0 if config.padding_position is None else config.padding_position + 1
    )
    self.tok = embed(config.vocab_size)
    self.pos = embed(positions)
    self.seg = embed(config.type_vocab_size)
    self.ln_embed = layer_norm()
    self.blocks = transformer.blocks(
        d,
        config.n_heads,
        config.mlp_ratio,
        config.n_layers,
        causal=False,
        dtypes=dtypes,
        stacked=config.stacked,
        rngs=rngs,
        eps=config.layer_norm_eps,
        activation="gelu",
        post_ln=not config.pre_ln,
        fused_qkv=False,
    )
    self.ln_f = layer_norm() if config.pre_ln else None
    if config.num_labels:
      self.pool = dense(d)
      self.classifier = dense(config.num_labels)
    else:
      self.mlm_dense = dense(d)
      self.mlm_ln = layer_norm()
      self.mlm_bias = nnx.Param(
          jnp.zeros((config.vocab_size,), dtypes["param_dtype"])
      )

  def positions(self, mask: jax.Array) -> jax.Array:
    """Position ids (batch, length) of right- or left-padded rows."""
    pad = self.config.padding_position
    if pad is None:
      return jnp.broadcast_to(jnp.arange(mask.shape[-1]), mask.shape)
    mask = mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) * mask + pad

  def embed(self, inputs: Inputs) -> jax.Array:
    """-> the first block's input (batch, length, d_model)."""
    tokens, segments, mask = inputs
    transformer.check_length(tokens.shape[-1], self.config.max_len)
    x = (
        transformer.embed(self.tok.embedding[...], tokens)
        + transformer.embed(self.pos.embedding[...], self.positions(mask))
        + transformer.embed(self.seg.embedding[...], segments)
    )
    return self.ln_embed(x).astype(transformer.DTYPES[self.config.dtype])

  def features(self, inputs: Inputs) -> jax.Array:
    """The last block's output (batch, length, d_model)."""
    x = transformer.run_blocks(
        self.blocks, self.embed(inputs), remat=self.config.remat, mask=inputs[2]
    )
    return x if self.ln_f is None else self.ln_f(x)

  def output(self, x: jax.Array) -> jax.Array:
    """Features -> MLM logits (batch, length, vocab) or class logits (batch,
    num_labels)."""
    if self.config.num_labels:
      return self.classifier(jnp.tanh(self.pool(x[:, 0])))
    x = self.mlm_ln(jax.nn.gelu(self.mlm_dense(x), approximate=False))
    # tied output embedding
    return (
        transformer.logits(x, self.tok.embedding[...], self.tok.dtype)
        + self.mlm_bias[...]
    )

  def __call__(self, inputs: Inputs) -> jax.Array:
    return self.output(self.features(inputs))
