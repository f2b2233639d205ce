"""``scale_by_apollo``: the raw gradient, scaled by what an optimizer does to a
random projection of it (APOLLO, arXiv 2412.05270)."""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import scaling
from galore_optax import sharding
from galore_optax import step_size
from galore_optax import steps
from galore_optax import targets as targets_lib
from galore_optax.refresh import check_static_int


class ApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: optimizer steps taken, int32 scalar; with the seed it determines the
      projections, which are never stored.
    inner_state: the inner transform's state, initialised on the low-rank
      shapes of targeted leaves and the full shapes of the others.
    scaled_norm: a params-shaped tree: for each targeted leaf the norm of the
      scaled gradient it last applied, one float32 per matrix
      (``batch``-shaped), for the norm-growth limiter; scalar zeros for other
      leaves.
  """

  count: jax.Array
  inner_state: optax.OptState
  scaled_norm: optax.Updates


def projection_key(
    seed: int, leaf_index: int, count: jax.Array, update_proj_gap: int
) -> jax.Array:
  """The key of leaf ``leaf_index``'s projection at step ``count``: the same for
  the ``update_proj_gap`` steps from each multiple of it, on every device."""
  key = jax.random.fold_in(jax.random.key(seed), leaf_index)
  return jax.random.fold_in(key, count // update_proj_gap)


def random_bases(
    key: jax.Array, plan: targets_lib.LeafPlan, dtype=jnp.float32
) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """``(left, right)`` for :func:`galore_optax.projection.project`: the one side
  ``plan`` projects is a Gaussian with entries of variance ``1 / r`` (``left``
  ``(*batch, m, r)`` or ``right`` ``(*batch, r, n)``), the other is None.
  Drawn in float32, then cast to ``dtype`` (the leaf's, as the reference does,
  so that the low-rank moments keep the leaf's dtype)."""
  v, r = plan.view, plan.rank
  shape = (v.m, r) if plan.use_left else (r, v.n)
  basis = jax.random.normal(key, v.batch_shape + shape, jnp.float32)
  basis = (basis / jnp.sqrt(jnp.float32(r))).astype(dtype)
  return (basis, None) if plan.use_left else (None, basis)


def grouped_bases(
    seed: int,
    plans: dict[int, targets_lib.LeafPlan],
    dtypes: dict[int, Any],
    count: jax.Array,
    update_proj_gap: int,
) -> dict[int, tuple[Optional[jax.Array], Optional[jax.Array]]]:
  """:func:`random_bases` of every leaf of ``plans`` (leaf index -> plan) at
  step ``count``, the same to the bit, drawn with one program per group of
  leaves whose projections share a shape and dtype: the keys and the Gaussian
  draws vmapped over the group, so that a model with a hundred matrices of
  three shapes compiles three draws, not a hundred."""
  groups: dict[Any, list[int]] = {}
  for i, p in plans.items():
    v = p.view
    side = (v.m, p.rank) if p.use_left else (p.rank, v.n)
    groups.setdefault((v.batch_shape + side, p.use_left, dtypes[i]), []).append(
        i
    )
  bases = {}
  for (shape, use_left, dtype), members in groups.items():
    keys = jax.vmap(lambda i: projection_key(seed, i, count, update_proj_gap))(
        jnp.asarray(members)
    )
    draw = lambda k, shape=shape: jax.random.normal(k, shape, jnp.float32)
    drawn = jax.vmap(draw)(keys)
    drawn = (
        drawn / jnp.sqrt(jnp.float32(shape[-1 if use_left else -2]))
    ).astype(dtype)
    for j, i in enumerate(members):
      bases[i] = (drawn[j], None) if use_left else (None, drawn[j])
  return bases


def scale_by_apollo(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: targets_lib.RankSpec = 256,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 1.0,
    scaling_type: str = "channel",
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    seed: int = 0,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO: ``inner`` runs on a random projection of each matrix gradient;
  the update is the raw gradient, scaled by the ratio of norms it produced.

  For a targeted leaf with gradient ``G`` (``m x n`` per batch index) and a
  Gaussian ``P`` (entries ``N(0, 1/r)``) drawn from ``seed``, the leaf and
  ``count // update_proj_gap``, so regenerated every T steps and never stored::

    R = project(G, P)                   # m x r or r x n, as scale_by_galore
    N, inner_state = inner.update(R)    # e.g. Adam's m / (sqrt(v) + eps)
    S = G * ||N|| / (||R|| + 1e-8)      # per channel or per tensor
    S = S / max(1, ||S|| / (1.01 ||S_prev||))   # from the second step on
    update = sqrt(scale) * S

  Per channel the norms run along the axis the projection shortened (one ratio
  per column of ``G`` with a left basis, per row with a right one); per tensor
  over the whole matrix. Other leaves pass through ``inner`` at full shape.
  This is step for step APOLLO's reference (``apollo-torch``'s ``AdamW`` with
  ``proj='random'``) given the same projections; its random numbers come from
  torch's generator, ours from ``jax.random``.

  Args:
    inner: a transform that does not read params. Default:
      ``optax.scale_by_adam()``.
    rank: as :func:`galore_optax.scale_by_galore`. Static.
    update_proj_gap: T, steps between new projections. Static.
    scale: multiplies the update by ``sqrt(scale)`` (the paper uses 1 for
      APOLLO and 128 for APOLLO-Mini). May be injected. Or ``'rms'``: ``k /
      r`` per matrix (``k`` the projected side's length), which restores a
      full-rank update's RMS (see :mod:`galore_optax.step_size`); static.
    scaling_type: 'channel' or 'tensor': how the norm ratio is taken. Static.
    proj_type: 'std', 'reverse_std', 'left' or 'right' (one side only). Static.
    targets, matrix_axes: as :func:`galore_optax.scale_by_galore`.
    seed: of the projections; each leaf folds in its index. Static.
    precision: of the projection ``R = project(G, P)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`ApolloState`.
  """
  inner = optax.with_extra_args_support(
      optax.scale_by_adam() if inner is None else inner
  )
  if isinstance(rank, int):  # pytrees and callables are checked per leaf
    check_static_int("rank", rank)
  check_static_int("update_proj_gap", update_proj_gap)
  check_static_int("seed", seed, minimum=0)
  step_size.check_scale(scale, rules=("rms",))
  if scaling_type not in scaling.SCALINGS:
    raise ValueError(
        f"unknown scaling_type {scaling_type!r}; expected one of"
        f" {scaling.SCALINGS}"
    )
  if proj_type not in projection.PROJ_TYPES or proj_type == "full":
    raise ValueError(
        f"proj_type {proj_type!r} is not one APOLLO offers: it projects one"
        " side; expected 'std', 'reverse_std', 'left' or 'right'"
    )

  plan = functools.partial(
      targets_lib.plan_leaves,
      rank=rank,
      proj_type=proj_type,
      targets=targets,
      matrix_axes=matrix_axes,
  )

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # the placeholder of optax.tree.map_params
      return ApolloState(jnp.zeros([], jnp.int32), inner.init(params), params)
    proxies, norms = [], []
    for leaf, p in zip(leaves, plan(params)):
      if p is None:
        proxies.append(leaf)
        norms.append(jnp.zeros((), jnp.float32))
        continue
      spec = sharding.spec_of(jax.eval_shape(p.view.to_matrix, leaf))
      low_spec = sharding.projected_spec(spec, p.use_left, p.use_right)
      proxies.append(
          sharding.zeros(p.low_rank_shape, leaf.dtype, low_spec, leaf)
      )
      norms.append(scaling.norm_state(p.view.batch_shape, spec, leaf))
    return ApolloState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(treedef.unflatten(proxies)),
        scaled_norm=treedef.unflatten(norms),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform works on projected shapes
    leaves, treedef = jax.tree.flatten(updates)
    plans = {i: p for i, p in enumerate(plan(updates)) if p is not None}
    matrices = {i: p.view.to_matrix(leaves[i]) for i, p in plans.items()}
    bases = grouped_bases(
        seed,
        plans,
        {i: leaves[i].dtype for i in plans},
        state.count,
        update_proj_gap,
    )
    low = steps.project(leaves, plans, matrices, bases.__getitem__, precision)
    out, inner_state = steps.inner_update(
        inner, low, state.inner_state, treedef, extra_args
    )
    norms = treedef.flatten_up_to(state.scaled_norm)
    for i, p in plans.items():
      axes = (
          scaling.projected_axes(p.use_left, p.use_right)
          if scaling_type == "channel"
          else (-2, -1)
      )
      scaled, norms[i] = steps.rescale(
          matrices[i], out[i], low[i], axes, norms[i], state.count == 0
      )
      factor = jnp.sqrt(step_size.apollo_factor(scale, p))
      out[i] = p.view.from_matrix(factor * scaled).astype(leaves[i].dtype)
    return treedef.unflatten(out), ApolloState(
        count=optax.safe_int32_increment(state.count),
        inner_state=inner_state,
        scaled_norm=treedef.unflatten(norms),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
