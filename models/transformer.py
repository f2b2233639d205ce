"""Transformer blocks shared by GPT-2, ViT, CLIP's towers (pre-LayerNorm) and
BERT (post-LayerNorm).

Parameter paths read ``blocks/<i>/attn/{qkv,proj}/kernel`` (BERT:
``attn/{query,key,value,proj}/kernel``) and ``blocks/<i>/mlp/{fc,proj}/kernel``,
so the paper's GaLore rule (attention and MLP matrices only) is the regex
:data:`GALORE_TARGETS`. Stacked blocks
(``stacked=True``, what the layer-wise step scans over) drop the ``<i>``: each
leaf gains a leading axis of length ``n_layers`` instead.
"""

from __future__ import annotations

import re
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
from flax import nnx

# Attention and MLP weight matrices; not embeddings, norms, biases or heads.
GALORE_TARGETS = r"/(attn|mlp)/\w+/kernel$"

# the parameter and computation dtypes a model config may name
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The MLP's nonlinearity: GELU's tanh form (GPT-2's), its exact erf form
# (BERT's, ViT's) and OpenAI CLIP's sigmoid approximation.
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def batch_spec(like: jax.Array, ndim: int):
  """A spec sharding the leading (batch) axis as ``like``'s, for an ``ndim``-d
  result; else None.

  Explicit-sharding meshes refuse to guess where a gather's, broadcast's or
  reshape's output lives; models pass this as its ``out_sharding``. Without such
  a mesh it is None.
  """
  spec = jax.typeof(like).sharding.spec
  return jax.P(spec[0], *([None] * (ndim - 1))) if any(spec) else None


def replicated(x: jax.Array) -> jax.Array:
  """``x`` whole on every device of an explicit-sharding mesh (for small
  arrays that mix batch rows, as CLIP's logits do); else ``x``."""
  if any(jax.typeof(x).sharding.spec):
    return jax.sharding.reshard(x, jax.P())
  return x


def check_length(length: int, max_len: int) -> None:
  """Refuses a sequence longer than a model's positions."""
  if length > max_len:
    raise ValueError(
        f"sequence length {length} exceeds the model's max_len {max_len}"
    )


# The (vocab, width) matrices: the token embeddings (also the tied outputs) and
# an untied output kernel (width, vocab). On an FSDP mesh they stay split in
# the forward pass (:func:`embed`, :func:`logits`), so that no device holds a
# whole table, or its gradient.
VOCABULARY_TABLES = r"(^|/)((wte|embed_tokens|tok)/embedding|lm_head/kernel)$"


def is_vocabulary_table(path: str) -> bool:
  """Whether a parameter's path (``galore_optax.path_str``) is one of
  :data:`VOCABULARY_TABLES`."""
  return re.search(VOCABULARY_TABLES, path) is not None


def _split(table: jax.Array, like: jax.Array):
  """Where a (vocab, width) ``table`` is split on an explicit mesh: (the mesh
  axes of its vocabulary and of its width, the mesh axes of ``like`` 's
  leading axis less those), or None where the table is whole."""
  table_spec = jax.typeof(table).sharding.spec
  if len(table_spec) != 2 or not any(table_spec):
    return None
  axes = lambda entry: entry if isinstance(entry, tuple) else (entry,)
  vocab, width = table_spec
  lead = jax.typeof(like).sharding.spec
  taken = axes(vocab) + axes(width)
  rows = tuple(
      a for a in axes(lead[0] if len(lead) else None) if a not in taken
  )
  return vocab, width, tuple(a for a in rows if a) or None


def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
  """``table[ids]``: (vocab, d) and (*batch) -> (*batch, d), sharded like
  ``ids`` on an explicit mesh.

  A table split over devices (FSDP) is looked up where it lies: the ids of
  every device of its axis are gathered (they are small), each device looks up
  its share, and the rows go back to their own devices, whole.
  """
  spec = jax.typeof(ids).sharding.spec
  split = _split(table, ids)
  if split is None:
    return table.at[ids].get(
        out_sharding=jax.P(*spec, None) if any(spec) else None
    )
  _, width, rows = split
  rest = (None,) * (ids.ndim - 1)
  ids = jax.sharding.reshard(ids, jax.P(rows, *rest))
  x = table.at[ids].get(out_sharding=jax.P(rows, *rest, width))
  return jax.sharding.reshard(x, jax.P(*spec, None))


def logits(x: jax.Array, table: jax.Array, dtype=None) -> jax.Array:
  """``x @ table.T``: (*batch, d) and (vocab, d) -> (*batch, vocab), in
  ``dtype`` (default: both promoted), sharded like ``x`` on an explicit mesh.

  A table split over devices (FSDP) stays so: the rows of every device of its
  axis are gathered (activations, small beside the table), each device
  computes its share of the logits (its vocabulary, or its partial sums over
  its slice of the width), and the logits go back to their rows' devices.
  """
  dtype = dtype or jnp.result_type(x.dtype, table.dtype)
  x, table = x.astype(dtype), table.astype(dtype)
  spec = jax.typeof(x).sharding.spec
  split = _split(table, x)
  if split is None:
    return jnp.einsum(
        "...d,vd->...v",
        x,
        table,
        out_sharding=jax.P(*spec[:-1], None) if any(spec) else None,
    )
  vocab, width, rows = split
  rest = (None,) * (x.ndim - 2)
  x = jax.sharding.reshard(x, jax.P(rows, *rest, width))
  # split by vocabulary: each device its columns of the logits; by width: the
  # partial sums are reduced onto the rows' devices
  out = jax.P(rows, *rest, vocab) if vocab else jax.P(spec[0], *rest, None)
  y = jnp.einsum("...d,vd->...v", x, table, out_sharding=out)
  return jax.sharding.reshard(y, jax.P(spec[0], *rest, None))


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
  """Multi-head self-attention with one fused ``qkv`` matrix (d, 3d), or
  separate ``query``, ``key`` and ``value`` matrices (d, d) as BERT keeps them
  (``fused=False``), and an output ``proj`` (d, d)."""

  def __init__(
      self,
      d_model: int,
      n_heads: int,
      *,
      causal: bool,
      out_std: float,
      dtypes: dict,
      rngs: nnx.Rngs,
      fused: bool = True,
  ):
    if d_model % n_heads:
      raise ValueError(
          f"d_model {d_model} is not divisible by n_heads {n_heads}"
      )
    self.n_heads, self.causal, self.fused = n_heads, causal, fused
    if fused:
      self.qkv = _dense(d_model, 3 * d_model, 0.02, dtypes, rngs)
    else:
      self.query, self.key, self.value = (
          _dense(d_model, d_model, 0.02, dtypes, rngs) for _ in range(3)
      )
    self.proj = _dense(d_model, d_model, out_std, dtypes, rngs)

  def __call__(
      self, x: jax.Array, mask: Optional[jax.Array] = None
  ) -> jax.Array:
    """``x``: (batch, length, d_model) -> same shape; ``mask`` (batch, length)
    bool, False at padding that no position may attend to."""
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, -1, d // self.n_heads)
    if self.fused:
      q, k, v = jnp.split(heads(self.qkv(x)), 3, axis=2)
    else:
      q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    if mask is not None:
      mask = mask[:, None, None, :]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=self.causal
    )
    return self.proj(out.reshape(b, t, d))


class MLP(nnx.Module):
  """``proj(act(fc(x)))`` with hidden width ``mlp_ratio * d_model``; ``act``
  one of :data:`ACTIVATIONS`."""

  def __init__(
      self,
      d_model: int,
      mlp_ratio: int,
      *,
      out_std: float,
      dtypes: dict,
      rngs: nnx.Rngs,
      activation: str = "gelu_tanh",
  ):
    self.activation = activation
    self.fc = _dense(d_model, mlp_ratio * d_model, 0.02, dtypes, rngs)
    self.proj = _dense(mlp_ratio * d_model, d_model, out_std, dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(ACTIVATIONS[self.activation](self.fc(x)))


class Block(nnx.Module):
  """Pre-LayerNorm: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``;
  post-LayerNorm (``post_ln``, BERT's): ``ln1(x + attn(x))`` then
  ``ln2(x + mlp(x))``.

  Options: ``eps``, the LayerNorms' epsilon; ``activation`` (see
  :class:`MLP`); ``fused_qkv`` (see :class:`Attention`).
  """

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
      eps: float = 1e-6,
      activation: str = "gelu_tanh",
      post_ln: bool = False,
      fused_qkv: bool = True,
  ):
    # GPT-2's scaling of the residual projections
    out_std = 0.02 / (2 * n_layers) ** 0.5
    self.post_ln = post_ln
    self.ln1 = nnx.LayerNorm(d_model, epsilon=eps, rngs=rngs, **dtypes)
    self.attn = Attention(
        d_model,
        n_heads,
        causal=causal,
        out_std=out_std,
        dtypes=dtypes,
        rngs=rngs,
        fused=fused_qkv,
    )
    self.ln2 = nnx.LayerNorm(d_model, epsilon=eps, rngs=rngs, **dtypes)
    self.mlp = MLP(
        d_model,
        mlp_ratio,
        out_std=out_std,
        dtypes=dtypes,
        rngs=rngs,
        activation=activation,
    )

  def __call__(
      self, x: jax.Array, mask: Optional[jax.Array] = None
  ) -> jax.Array:
    if self.post_ln:
      x = self.ln1(x + self.attn(x, mask))
      return self.ln2(x + self.mlp(x))
    x = x + self.attn(self.ln1(x), mask)
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
    **options,
) -> Blocks:
  """``n_layers`` blocks: an ``nnx.List``, or (``stacked``) one ``Block`` whose
  every leaf has a leading layer axis. ``options`` are :class:`Block`'s.

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
          **options,
      )
      for _ in range(n_layers)
  ]
  return stack(layers) if stacked else nnx.List(layers)


def stack(layers: list[nnx.Module]) -> nnx.Module:
  """Layers of one structure as one module whose every leaf has a leading
  layer axis (what :func:`run_blocks` scans over)."""
  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]
  return nnx.merge(graphdef, jax.tree.map(lambda *x: jnp.stack(x), *states))


def run_blocks(
    layers: Blocks,
    x: jax.Array,
    *,
    remat: bool,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
  """``x`` through every block in order (stacked blocks by ``lax.scan``);
  ``remat`` recomputes each block's activations in the backward pass instead
  of keeping them. XLA's CPU compiler undoes remat in the unrolled loop over an
  ``nnx.List``, not in the scan, so the CLI stacks the blocks for remat.
  ``mask``: see :class:`Attention`."""

  def step(x, layer_state, mask, graphdef):
    return nnx.merge(graphdef, layer_state)(x, mask)

  if remat:
    step = jax.checkpoint(step, static_argnums=(3,))
  if isinstance(layers, nnx.List):
    for layer in layers:
      if remat:
        graphdef, state = nnx.split(layer)
        x = step(x, state, mask, graphdef)
      else:
        x = layer(x, mask)
    return x
  graphdef, state = nnx.split(layers)
  x, _ = jax.lax.scan(lambda x, s: (step(x, s, mask, graphdef), None), x, state)
  return x
