"""Pre-LayerNorm transformer blocks shared by GPT-2 and ViT.

Parameter paths read ``blocks/<i>/attn/{qkv,proj}/kernel`` and
``blocks/<i>/mlp/{fc,proj}/kernel``, so the paper's GaLore rule (attention and
MLP matrices only) is the regex :data:`GALORE_TARGETS`. Stacked blocks
(``stacked=True``, what the layer-wise step scans over) drop the ``<i>``: each
leaf gains a leading axis of length ``n_layers`` instead.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from flax import nnx

# Attention and MLP weight matrices; not embeddings, norms, biases or heads.
GALORE_TARGETS = r"/(attn|mlp)/\w+/kernel$"

# --param-dtype / --compute-dtype
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def batch_spec(like: jax.Array, ndim: int):
  """A spec sharding the leading (batch) axis as ``like``'s, for an ``ndim``-d
  result; else None.

  Explicit-sharding meshes refuse to guess where a gather's, broadcast's or
  reshape's output lives; models pass this as its ``out_sharding``. Without such
  a mesh it is None.
  """
  spec = jax.typeof(like).sharding.spec
  return jax.P(spec[0], *([None] * (ndim - 1))) if any(spec) else None


def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
  """``table[ids]``: (vocab, d) and (*batch) -> (*batch, d), sharded like
  ``ids`` on an explicit mesh."""
  spec = jax.typeof(ids).sharding.spec
  return table.at[ids].get(
      out_sharding=jax.P(*spec, None) if any(spec) else None
  )


def _dense(
    d_in: int, d_out: int, std: float, dtypes: dict, rngs: nnx.Rngs
) -> nnx.Linear:
  return nnx.Linear(
      d_in,
      d_out,
      kernel_init=nnx.initializers.normal(std),
      bias_init=nnx.initializers.zeros_init(),
      rngs=rngs,
      **dtypes,
  )


def dtypes(compute: str, param: str) -> dict:
  """The ``dtype`` / ``param_dtype`` keywords of Flax layers from their names
  in :data:`DTYPES`."""
  return dict(dtype=DTYPES[compute], param_dtype=DTYPES[param])


class Attention(nnx.Module):
  """Multi-head self-attention with one fused ``qkv`` matrix (d, 3d) and an
  output ``proj`` (d, d)."""

  def __init__(
      self,
      d_model: int,
      n_heads: int,
      *,
      causal: bool,
      out_std: float,
      dtypes: dict,
      rngs: nnx.Rngs,
  ):
    if d_model % n_heads:
      raise ValueError(
          f"d_model {d_model} is not divisible by n_heads {n_heads}"
      )
    self.n_heads, self.causal = n_heads, causal
    self.qkv = _dense(d_model, 3 * d_model, 0.02, dtypes, rngs)
    self.proj = _dense(d_model, d_model, out_std, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: (batch, length, d_model) -> same shape."""
    b, t, d = x.shape
    q, k, v = jnp.split(
        self.qkv(x).reshape(b, t, 3 * self.n_heads, d // self.n_heads),
        3,
        axis=2,
    )
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    return self.proj(out.reshape(b, t, d))


class MLP(nnx.Module):
  """``proj(gelu(fc(x)))`` with hidden width ``mlp_ratio * d_model``."""

  def __init__(
      self,
      d_model: int,
      mlp_ratio: int,
      *,
      out_std: float,
      dtypes: dict,
      rngs: nnx.Rngs,
  ):
    self.fc = _dense(d_model, mlp_ratio * d_model, 0.02, dtypes, rngs)
    self.proj = _dense(mlp_ratio * d_model, d_model, out_std, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(jax.nn.gelu(self.fc(x), approximate=True))


class Block(nnx.Module):
  """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(
      self,
      d_model: int,
      n_heads: int,
      mlp_ratio: int,
      n_layers: int,
      *,
      causal: bool,
      dtypes: dict,
      rngs: nnx.Rngs,
  ):
    # GPT-2's scaling of the residual projections
    out_std = 0.02 / (2 * n_layers) ** 0.5
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs, **dtypes)
    self.attn = Attention(
        d_model,
        n_heads,
        causal=causal,
        out_std=out_std,
        dtypes=dtypes,
        rngs=rngs,
    )
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs, **dtypes)
    self.mlp = MLP(
        d_model, mlp_ratio, out_std=out_std, dtypes=dtypes, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


Blocks = Union[nnx.List, Block]  # one Block per layer, or one stacked Block


def blocks(
    d_model: int,
    n_heads: int,
    mlp_ratio: int,
    n_layers: int,
    *,
    causal: bool,
    dtypes: dict,
    stacked: bool = False,
    rngs: nnx.Rngs,
) -> Blocks:
  """``n_layers`` blocks: an ``nnx.List``, or (``stacked``) one ``Block`` whose
  every leaf has a leading layer axis.

  Both draw the same initial weights from ``rngs``.
  """
  layers = [
      Block(
          d_model,
          n_heads,
          mlp_ratio,
          n_layers,
          causal=causal,
          dtypes=dtypes,
          rngs=rngs,
      )
      for _ in range(n_layers)
  ]
  if not stacked:
    return nnx.List(layers)
  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]
  return nnx.merge(graphdef, jax.tree.map(lambda *x: jnp.stack(x), *states))


def run_blocks(layers: Blocks, x: jax.Array, *, remat: bool) -> jax.Array:
  """``x`` through every block in order (stacked blocks by ``lax.scan``);
  ``remat`` recomputes each block's activations in the backward pass instead
  of keeping them. XLA's CPU compiler undoes remat in the unrolled loop over an
  ``nnx.List``, not in the scan, so the CLI stacks the blocks for remat."""

  def step(x, layer_state, graphdef):
    return nnx.merge(graphdef, layer_state)(x)

  if remat:
    step = jax.checkpoint(step, static_argnums=(2,))
  if isinstance(layers, nnx.List):
    for layer in layers:
      if remat:
        graphdef, state = nnx.split(layer)
        x = step(x, state, graphdef)
      else:
        x = layer(x)
    return x
  graphdef, state = nnx.split(layers)
  x, _ = jax.lax.scan(lambda x, s: (step(x, s, graphdef), None), x, state)
  return x
