"""``scale_by_galore``: run any optax transform in a low-rank subspace of each matrix gradient."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import projection
from galore_optax import targets as targets_lib


class GaLoreProjector(NamedTuple):
  """The bases of every leaf; both trees have the structure of params.

  For a targeted leaf seen as ``(*batch, m, n)`` matrices, ``left`` holds ``U_r``
  ``(*batch, m, r)`` and ``right`` holds ``V_r^T`` ``(*batch, r, n)`` where its projection
  type uses that side. Unused entries, and all entries of leaves left alone, are scalar
  zeros.
  """

  left: optax.Updates
  right: optax.Updates


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: optimizer steps taken, int32 scalar; the bases are refreshed when
      ``count % update_proj_gap == 0``, i.e. at steps 0, T, 2T, ...
    projector: the bases, a :class:`GaLoreProjector`.
    inner_state: the inner transform's state, initialised on the low-rank shapes of
      targeted leaves and the full shapes of the others.
  """

  count: jax.Array
  projector: GaLoreProjector
  inner_state: optax.OptState


def _check_static_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(
        f"{name} must be a Python int, got {value!r}: it fixes array shapes or the refresh "
        f"schedule, so with optax.inject_hyperparams list {name!r} in static_args")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")


def _unused(dtype) -> jax.Array:
  # A scalar, not a zero-size array: orbax refuses to save zero-size arrays.
  return jnp.zeros((), dtype)


def scale_by_galore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore: the ``inner`` transform sees low-rank projections of matrix gradients.

  For a targeted leaf with gradient ``G`` (``m x n`` per batch index) and basis ``P`` from
  the SVD of ``G`` at steps 0, T, 2T, ... (see :mod:`galore_optax.projection`)::

    R = project(G, P)                 # m x r, r x n or r x r
    N, inner_state = inner.update(R)  # e.g. Adam's m / (sqrt(v) + eps)
    update = scale * project_back(N, P)

  Other leaves pass through ``inner`` at full shape and are not scaled. The inner state is
  never reset at a refresh (galore-torch's behaviour).

  Args:
    inner: a transform that does not read params (``optax.scale_by_adam()``,
      ``optax.trace``, ``optax.scale_by_lion()``, ...). Default: ``optax.scale_by_adam()``.
    rank: an int, a pytree of ints with the structure of params (entries of untargeted
      leaves are ignored), or ``fn(path, shape) -> int``. Clamped to ``min(m, n)``. Static.
    update_proj_gap: T, steps between refreshes of the bases. Static.
    scale: alpha, multiplies the back-projected update. May be injected.
    proj_type: 'std' (basis on the smaller side, moments along the larger), 'reverse_std',
      'left', 'right' or 'full'. Static.
    targets: which leaves are projected: a pytree of bools, a callable on params
      returning one (e.g. :func:`galore_optax.match_paths`), or None for the default:
      every matrix leaf whose path names no embedding or output head.
    matrix_axes: the rows and columns of a leaf's matrix: a
      :class:`galore_optax.MatrixAxes` for all leaves, a pytree of them (None entries for
      non-matrices) or ``fn(path, shape) -> MatrixAxes | None``. Default: 2-D leaves
      are ``(rows=0, cols=1)``, others are not matrices. Unnamed axes are batch axes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GaLoreState`.
  """
  inner = optax.with_extra_args_support(optax.scale_by_adam() if inner is None else inner)
  if isinstance(rank, (int, float, jax.Array, np.ndarray)):  # pytrees and callables: per leaf, at init
    _check_static_int("rank", rank)
  _check_static_int("update_proj_gap", update_proj_gap)
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {projection.PROJ_TYPES}")

  def plan(tree):
    return targets_lib.plan_leaves(
        tree, rank=rank, proj_type=proj_type, targets=targets, matrix_axes=matrix_axes)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # e.g. the placeholder of optax.tree.map_params: every subtree is params-like
      return GaLoreState(jnp.zeros([], jnp.int32), GaLoreProjector(params, params), inner.init(params))
    lefts, rights, proxies = [], [], []
    for leaf, p in zip(leaves, plan(params)):
      if p is None:
        lefts.append(_unused(leaf.dtype))
        rights.append(_unused(leaf.dtype))
        proxies.append(leaf)
        continue
      v = p.view
      lefts.append(jnp.zeros(v.batch_shape + (v.m, p.rank), leaf.dtype) if p.use_left else _unused(leaf.dtype))
      rights.append(jnp.zeros(v.batch_shape + (p.rank, v.n), leaf.dtype) if p.use_right else _unused(leaf.dtype))
      proxies.append(jnp.zeros(p.low_rank_shape, leaf.dtype))
    unflatten = treedef.unflatten
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projector=GaLoreProjector(unflatten(lefts), unflatten(rights)),
        inner_state=inner.init(unflatten(proxies)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform works on projected shapes; params do not fit it
    leaves, treedef = jax.tree.flatten(updates)
    plans = plan(updates)
    refresh = state.count % update_proj_gap == 0
    old_lefts = treedef.flatten_up_to(state.projector.left)
    old_rights = treedef.flatten_up_to(state.projector.right)

    lefts, rights, bases, low = [], [], [], []
    for g, p, old_left, old_right in zip(leaves, plans, old_lefts, old_rights):
      if p is None:
        lefts.append(old_left)
        rights.append(old_right)
        bases.append(None)
        low.append(g)
        continue
      g2 = p.view.to_matrix(g)

      def fresh(g2=g2, p=p, old_left=old_left, old_right=old_right):
        new_left, new_right = projection.svd_basis(g2, p.rank, p.use_left, p.use_right)
        return (old_left if new_left is None else new_left,
                old_right if new_right is None else new_right)

      left, right = jax.lax.cond(refresh, fresh, lambda l=old_left, r=old_right: (l, r))
      lefts.append(left)
      rights.append(right)
      bases.append((left if p.use_left else None, right if p.use_right else None))
      low.append(projection.project(g2, *bases[-1]))

    inner_updates, inner_state = inner.update(
        treedef.unflatten(low), state.inner_state, None, **extra_args)

    out = []
    for g, p, n, basis in zip(leaves, plans, treedef.flatten_up_to(inner_updates), bases):
      if p is None:
        out.append(n)
        continue
      back = projection.project_back(n, *basis)
      out.append((scale * p.view.from_matrix(back)).astype(g.dtype))

    new_state = GaLoreState(
        count=optax.safe_int32_increment(state.count),
        projector=GaLoreProjector(treedef.unflatten(lefts), treedef.unflatten(rights)),
        inner_state=inner_state,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
