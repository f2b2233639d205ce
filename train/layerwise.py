"""The layer-wise train step: each block's gradient is consumed by the optimizer
as soon as the backward pass produces it, so the whole gradient is never alive.

The model's blocks are stacked (``stacked=True``: every block leaf has a leading
layer axis) and the model exposes ``embed(inputs)`` (the first block's input),
``blocks`` and ``output(x)`` (the last block's output to predictions). One step:

1. forward: ``x_0 = embed(inputs)``, then a scan over the blocks that keeps only
   each block's input ``x_i`` (the blocks are rematerialised; see below);
2. the loss of ``output(x_L)`` and its gradient ``dL/dx_L`` (and the gradient of
   the parameters outside the blocks used by ``output``);
3. a loop from the last block to the first: recompute block ``i`` from ``x_i``,
   pull ``dL/dx_{i+1}`` back to its parameter gradient and ``dL/dx_i``, and at
   once update block ``i``'s parameters and optimizer state in place;
4. ``embed``'s share of the gradient, and the update of the parameters outside
   the blocks.

The optimizer is any optax transform. It runs once per block on the tree
``{"blocks": block}`` (whose paths, ``blocks/attn/qkv/kernel``, match the same
rules as the standard layout's ``blocks/<i>/attn/qkv/kernel``) and once on the
other parameters; its state is :class:`LayerwiseState`. Every per-leaf
transform (Adam, GaLore with its refreshes, 8-bit state, ``optax.MultiSteps``)
then computes what it computes on the whole tree. What couples leaves across the
tree does not carry over, and is handled here:

- global-norm clipping (``clip``): two passes. The first runs the backward loop
  only to sum the squared gradient norms; the second scales every gradient by
  ``optax.clip_by_global_norm``'s factor before the optimizer sees it. The
  result is exactly the standard step's ``optax.chain(clip_by_global_norm(c),
  tx)``, for the price of one more backward pass (and its recomputed forward).
- seeded randomness keyed by leaf index (GaLore's ``svd="randomized"``
  sketches) repeats from block to block: every block draws the same Gaussian
  test matrix. Each block's sketch is as good as before; it only differs from
  the standard step's, which draws one per leaf.

Why a layer-wise step always rematerialises: the forward residuals a block's
backward pass needs include its weights, so keeping them for every block would
hold a second copy of the parameters; recomputing the block from its input
costs one more forward pass instead.

The step keeps the blocks' 16-bit leaves as their bits (:class:`Bits`,
:func:`pack_params`; the state from :func:`init` likewise).
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax

BLOCKS = "blocks"  # the model attribute (and params key) of the stacked blocks


class LayerwiseState(NamedTuple):
  """The optimizer's state in a layer-wise run."""

  rest: Any  # of the parameters outside the blocks
  blocks: Any  # of each block, stacked on a leading layer axis


def split(params: dict) -> tuple[dict, Any]:
  """``params`` -> (every entry but the blocks, the stacked blocks)."""
  rest = {k: v for k, v in params.items() if k != BLOCKS}
  return rest, params[BLOCKS]


def _as_tree(block: Any) -> dict:
  return {BLOCKS: block}


def _n_layers(blocks: Any) -> int:
  return jax.tree.leaves(blocks)[0].shape[0]


@jax.tree_util.register_pytree_node_class
class Bits:
  """A 16-bit float array kept as its ``uint16`` bit pattern.

  XLA's CPU compiler has no 16-bit float ``dynamic_update_slice``: it converts
  the whole stacked array to float32 and back at every block (a float32 copy of
  the parameters, and that much traffic per block). Integer updates are done in
  place, so the layer-wise step keeps its stacked 16-bit leaves (parameters,
  optimizer state, saved block inputs) this way, and views one block at a time
  as its float dtype.
  """

  def __init__(self, data: jax.Array, dtype):
    self.data, self.dtype = data, jnp.dtype(dtype)

  def tree_flatten(self):
    return (self.data,), self.dtype

  @classmethod
  def tree_unflatten(cls, dtype, children):
    return cls(children[0], dtype)


def _is_bits(x: Any) -> bool:
  return isinstance(x, Bits)


def pack(tree: Any) -> Any:
  """Every 16-bit float leaf of ``tree`` as :class:`Bits`; other leaves as they
  are. Works on arrays and on ``jax.ShapeDtypeStruct`` s."""

  def one(x):
    if not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      bits = jax.ShapeDtypeStruct(x.shape, jnp.uint16, sharding=x.sharding)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return Bits(bits, x.dtype)

  return jax.tree.map(one, tree)


def unpack(tree: Any) -> Any:
  """Inverse of :func:`pack`."""
  return jax.tree.map(
      lambda x: (
          jax.lax.bitcast_convert_type(x.data, x.dtype) if _is_bits(x) else x
      ),
      tree,
      is_leaf=_is_bits,
  )


def _layer(tree: Any, i) -> Any:
  """Layer ``i`` of a stacked tree, 16-bit leaves unpacked.

  Read through a ``cond`` (whose other branch is never taken): XLA would fuse a
  plain slice into the update of another array carried by the same loop, and
  then copy the whole stacked array it reads at every block to update it in
  place. A ``cond`` is not fused, so its slice comes out on its own.
  """
  take = lambda i: lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False)
  slices = jax.lax.cond(
      i >= 0,
      lambda t: jax.tree.map(take(i), t),
      lambda t: jax.tree.map(take(0), t),
      tree,
  )
  return unpack(slices)


def _set_layer(tree: Any, i, value: Any) -> Any:
  """``tree`` with layer ``i`` replaced by ``value`` (in place under XLA)."""

  def put(x, v):
    if _is_bits(x):
      v = jax.lax.bitcast_convert_type(v.astype(x.dtype), jnp.uint16)
      return Bits(jax.lax.dynamic_update_index_in_dim(x.data, v, i, 0), x.dtype)
    return jax.lax.dynamic_update_index_in_dim(x, v, i, 0)

  return jax.tree.map(put, tree, value, is_leaf=_is_bits)


def _sum_squares(tree: Any) -> jax.Array:
  return sum(
      jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)
  )


def _init(tx: optax.GradientTransformation, params: dict) -> LayerwiseState:
  rest, blocks = split(params)
  return LayerwiseState(
      tx.init(rest), jax.lax.map(lambda b: tx.init(_as_tree(b)), blocks)
  )


def init(tx: optax.GradientTransformation, params: dict) -> LayerwiseState:
  """``tx``'s state for the layer-wise step: one for the parameters outside the
  blocks, and one per block (built block by block, stacked, 16-bit leaves
  packed)."""
  state = _init(tx, params)
  return state._replace(blocks=pack(state.blocks))


def pack_params(params: dict) -> dict:
  """``params`` as the layer-wise step keeps them: the blocks' 16-bit leaves
  packed (:class:`Bits`)."""
  rest, blocks = split(params)
  return {**rest, BLOCKS: pack(blocks)}


def unpack_params(params: dict) -> dict:
  """Inverse of :func:`pack_params`."""
  rest, blocks = split(params)
  return {**rest, BLOCKS: unpack(blocks)}


def per_block(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` on the stacked layout, applied as the layer-wise step applies it:
  once to the parameters outside the blocks, once to each block (a loop that
  rewrites the gradient's buffer block by block). Its state is a
  :class:`LayerwiseState`.

  The standard step uses it for the optimizers that are not element-wise when
  the blocks are stacked (``--remat block``), so a standard and a layer-wise
  step with the same ``tx`` compute the same.
  """

  def init_fn(params):
    return _init(tx, params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    rest_grads, block_grads = split(updates)
    rest_params, block_params = (
        split(params) if params is not None else (None,) * 2
    )
    rest_updates, rest_state = tx.update(rest_grads, state.rest, rest_params)

    def body(i, carry):
      out, states = carry
      params_i = (
          None if block_params is None else _as_tree(_layer(block_params, i))
      )
      updates_i, state_i = tx.update(
          _as_tree(_layer(out, i)), _layer(states, i), params_i
      )
      return (
          _set_layer(out, i, updates_i[BLOCKS]),
          _set_layer(states, i, state_i),
      )

    block_updates, block_states = jax.lax.fori_loop(
        0, _n_layers(block_grads), body, (block_grads, state.blocks)
    )
    return {**rest_updates, BLOCKS: block_updates}, LayerwiseState(
        rest_state, block_states
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def unstacked(params: dict) -> dict:
  """Abstract params in the unstacked layout (``blocks/<i>/...``): what ranks
  are checked and optimizer state is accounted on."""
  rest, blocks = split(params)
  layer = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), blocks
  )
  return {**rest, BLOCKS: {i: layer for i in range(_n_layers(blocks))}}


def clip_factor(norm: jax.Array, max_norm: float) -> Callable:
  """What ``optax.clip_by_global_norm(max_norm)`` does to each leaf, given the
  global norm."""
  trigger = norm < max_norm
  return lambda g: jax.lax.select(
      trigger, g, (g / norm.astype(g.dtype)) * max_norm
  )


def make_train_step(
    graphdef: nnx.GraphDef,
    block_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    head_loss: Callable,
    *,
    clip: float = 0.0,
    gather: Callable = lambda p: p,
) -> Callable:
  """``train_step(params, opt_state, batch)`` -> (params, opt_state,
  ``{"loss", "bases_computed"}``), the layer-wise step (module docstring), on
  :func:`pack_params` ' params and :func:`init` 's state.

  Args:
    graphdef: the whole model's (blocks stacked).
    block_graphdef: one block's, e.g. ``nnx.graphdef(model.blocks)``.
    tx: the optimizer, without global-norm clipping.
    head_loss: ``(model.output, x_L, batch) -> (loss, aux)``, the loss of the
      model's last part on the blocks' output (``Objective.head_loss``).
    clip: the global gradient-norm bound; 0 turns clipping off.
    gather: stored parameters -> those the forward pass uses (whole under FSDP).
      It is applied to one block at a time.
  """

  def block_apply(block, x):
    return nnx.merge(block_graphdef, gather(block))(x)

  def train_step(params, opt_state, batch):
    rest, blocks = split(params)
    inputs = batch[0]
    n_layers = _n_layers(blocks)

    def whole(rest):  # the blocks go unused (and XLA drops them)
      return nnx.merge(graphdef, {**gather(rest), BLOCKS: unpack(blocks)})

    x, embed_vjp = jax.vjp(lambda r: whole(r).embed(inputs), rest)

    def forward(x, block):
      return block_apply(unpack(block), x), pack(x)

    x, block_inputs = jax.lax.scan(forward, x, blocks)
    loss, output_vjp, _ = jax.vjp(
        lambda r, x: head_loss(whole(r).output, x, batch),
        rest,
        x,
        has_aux=True,
    )
    rest_grads, dx = output_vjp(jnp.ones_like(loss))

    def backward(carry, update: Callable = None):
      """The loop over blocks, last first; ``update(block, grads, state)``
      returns the new block and state, or None to only sum squared norms."""

      def body(j, carry):
        dx, blocks, states, sum_sq = carry
        i = n_layers - 1 - j
        block = _layer(blocks, i)
        _, vjp = jax.vjp(block_apply, block, _layer(block_inputs, i))
        grads, dx = vjp(dx)
        if update is None:
          return dx, blocks, states, sum_sq + _sum_squares(grads)
        block, state = update(block, grads, _layer(states, i))
        return (
            dx,
            _set_layer(blocks, i, block),
            _set_layer(states, i, state),
            sum_sq,
        )

      return jax.lax.fori_loop(0, n_layers, body, carry)

    zero = jnp.zeros([], jnp.float32)
    scale = lambda g: g
    if clip:
      dx_0, _, _, blocks_sq = backward((dx, blocks, opt_state.blocks, zero))
      rest_grads = jax.tree.map(jnp.add, rest_grads, embed_vjp(dx_0)[0])
      norm = jnp.sqrt(blocks_sq + _sum_squares(rest_grads))
      factor = clip_factor(norm, clip)
      scale = lambda g: jax.tree.map(factor, g)

    def update(block, grads, state):
      updates, state = tx.update(_as_tree(scale(grads)), state, _as_tree(block))
      return optax.apply_updates(block, updates[BLOCKS]), state

    dx_0, blocks, block_states, _ = backward(
        (dx, blocks, opt_state.blocks, zero), update
    )
    if not clip:
      rest_grads = jax.tree.map(jnp.add, rest_grads, embed_vjp(dx_0)[0])
    updates, rest_state = tx.update(scale(rest_grads), opt_state.rest, rest)
    rest = optax.apply_updates(rest, updates)
    opt_state = LayerwiseState(rest_state, block_states)
    metrics = {
        "loss": loss,
        "bases_computed": galore_optax.bases_computed(opt_state),
    }
    return {**rest, BLOCKS: blocks}, opt_state, metrics

  return train_step
