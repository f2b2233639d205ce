"""``scale_by_galore``: run any optax transform in a low-rank subspace of each matrix gradient."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import moments as moments_lib
from galore_optax import projection
from galore_optax import sharding
from galore_optax import subspace
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


class RefreshState(NamedTuple):
  """Per-leaf refresh bookkeeping: params-shaped trees of int32 scalars (zero for leaves left alone)."""

  next_step: optax.Updates  # the optimizer step at which the leaf's basis is next recomputed
  interval: optax.Updates   # its current gap: update_proj_gap, or more under lazy refresh
  stable: optax.Updates     # similar refreshes in a row (lazy refresh)
  computed: optax.Updates   # bases computed so far
  skipped: optax.Updates    # refreshes that kept the previous basis (gradient or basis not finite, or zero)


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: optimizer steps taken, int32 scalar. A leaf's basis is refreshed when
      ``count >= refresh.next_step``: at steps 0, T, 2T, ... unless lazy refresh widens
      its interval or a failed refresh retries at the next step.
    projector: the bases, a :class:`GaLoreProjector`.
    inner_state: the inner transform's state, initialised on the low-rank shapes of
      targeted leaves and the full shapes of the others.
    refresh: per-leaf bookkeeping, a :class:`RefreshState`.
  """

  count: jax.Array
  projector: GaLoreProjector
  inner_state: optax.OptState
  refresh: RefreshState


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


def _sides(p: targets_lib.LeafPlan, left: jax.Array, right: jax.Array) -> subspace.Basis:
  return (left if p.use_left else None, right if p.use_right else None)


def _resolve_svd(svd: subspace.SvdSpec) -> tuple[str, subspace.RandomizedSVD]:
  if isinstance(svd, subspace.RandomizedSVD):
    for name in ("oversample", "power_iters", "seed"):
      value = getattr(svd, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "oversample" else 0):
        raise ValueError(f"RandomizedSVD.{name} must be an int >= {1 if name == 'oversample' else 0}, got {value!r}")
    return "randomized", svd
  if svd not in subspace.SVD_METHODS:
    raise ValueError(f"unknown svd {svd!r}; expected one of {subspace.SVD_METHODS} or a RandomizedSVD")
  return svd, subspace.RandomizedSVD()


def _resolve_lazy(lazy: Optional[subspace.LazyRefresh], gap: int) -> Optional[subspace.LazyRefresh]:
  if lazy is None:
    return None
  if not isinstance(lazy, subspace.LazyRefresh):
    raise TypeError(f"lazy_refresh must be a galore_optax.LazyRefresh or None, got {lazy!r}")
  lazy = lazy._replace(max_gap=lazy.max_gap or 8 * gap)
  if not 0 <= lazy.threshold <= 1:
    raise ValueError(f"LazyRefresh.threshold must be in [0, 1], got {lazy.threshold}")
  _check_static_int("LazyRefresh.patience", lazy.patience)
  _check_static_int("LazyRefresh.max_gap", lazy.max_gap)
  if lazy.max_gap < gap:
    raise ValueError(f"LazyRefresh.max_gap {lazy.max_gap} is below update_proj_gap {gap}")
  return lazy


def scale_by_galore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore: the ``inner`` transform sees low-rank projections of matrix gradients.

  For a targeted leaf with gradient ``G`` (``m x n`` per batch index) and basis ``P`` from
  the SVD of ``G`` at steps 0, T, 2T, ... (see :mod:`galore_optax.projection`)::

    R = project(G, P)                 # m x r, r x n or r x r
    N, inner_state = inner.update(R)  # e.g. Adam's m / (sqrt(v) + eps)
    update = scale * project_back(N, P)

  Other leaves pass through ``inner`` at full shape and are not scaled. The defaults
  reproduce galore-torch: exact SVD, moments kept across a refresh.

  A refresh never poisons training: when the gradient or the computed basis is not finite,
  or the gradient is all zero, the leaf keeps its previous basis (at its very first refresh,
  the first ``r`` coordinate axes), its moments are left alone, the event is counted in
  ``state.refresh.skipped`` and the refresh is retried at the next step.

  Args:
    inner: a transform that does not read params (``optax.scale_by_adam()``,
      ``optax.trace``, ``optax.scale_by_lion()``, ...). Default: ``optax.scale_by_adam()``.
    rank: an int, a pytree of ints with the structure of params (entries of untargeted
      leaves are ignored; see :func:`galore_optax.adaptive_ranks`), or
      ``fn(path, shape) -> int``. Clamped to ``min(m, n)``. Static.
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
    svd: how a basis is computed: 'exact', 'randomized' (or a
      :class:`galore_optax.RandomizedSVD` to tune it) or 'gram'
      (see :mod:`galore_optax.subspace`). All give canonical signs.
    moments: the inner state of a refreshed leaf: 'keep', 'reset' or 'transport'
      (see :mod:`galore_optax.moments`).
    lazy_refresh: a :class:`galore_optax.LazyRefresh` to let stable leaves refresh less often.
    axis_name: the ``pmap``/``shard_map`` axis name (or tuple of names) the update runs under
      with replicated gradients, to spread the refresh SVDs over its devices. Not needed
      under ``jit`` with ``jax.set_mesh``: the mesh is then used (see
      :mod:`galore_optax.sharding`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GaLoreState`.

  Raises:
    ValueError, TypeError: at construction for bad options, at init for bad leaves.
  """
  inner = optax.with_extra_args_support(optax.scale_by_adam() if inner is None else inner)
  if isinstance(rank, (int, float, jax.Array, np.ndarray)):  # pytrees and callables: per leaf, at init
    _check_static_int("rank", rank)
  _check_static_int("update_proj_gap", update_proj_gap)
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {projection.PROJ_TYPES}")
  method, randomized = _resolve_svd(svd)
  lazy = _resolve_lazy(lazy_refresh, update_proj_gap)
  slots = moments_lib.find_slots(inner, moments)

  def plan(tree):
    return targets_lib.plan_leaves(
        tree, rank=rank, proj_type=proj_type, targets=targets, matrix_axes=matrix_axes)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # e.g. the placeholder of optax.tree.map_params: every subtree is params-like
      return GaLoreState(jnp.zeros([], jnp.int32), GaLoreProjector(params, params), inner.init(params),
                         RefreshState(*([params] * len(RefreshState._fields))))
    lefts, rights, proxies, intervals = [], [], [], []
    for leaf, p in zip(leaves, plan(params)):
      if p is None:
        lefts.append(_unused(leaf.dtype))
        rights.append(_unused(leaf.dtype))
        proxies.append(leaf)
        intervals.append(jnp.zeros([], jnp.int32))
        continue
      v = p.view
      spec = sharding.spec_of(jax.eval_shape(v.to_matrix, leaf))
      left_spec, right_spec = sharding.basis_specs(spec)
      new = lambda shape, spec: sharding.zeros(shape, leaf.dtype, spec, like=leaf)
      lefts.append(new(v.batch_shape + (v.m, p.rank), left_spec) if p.use_left else _unused(leaf.dtype))
      rights.append(new(v.batch_shape + (p.rank, v.n), right_spec) if p.use_right else _unused(leaf.dtype))
      proxies.append(new(p.low_rank_shape, sharding.projected_spec(spec, p.use_left, p.use_right)))
      intervals.append(jnp.full([], update_proj_gap, jnp.int32))
    # Distinct arrays, not one shared zero: donating the state must not donate a buffer twice.
    zeros = lambda: treedef.unflatten([jnp.zeros([], jnp.int32) for _ in leaves])
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projector=GaLoreProjector(treedef.unflatten(lefts), treedef.unflatten(rights)),
        inner_state=inner.init(treedef.unflatten(proxies)),
        refresh=RefreshState(zeros(), treedef.unflatten(intervals), zeros(), zeros(), zeros()),
    )

  def new_basis(p):
    """``(g2, key) ->`` the basis of one matrix gradient, or NaN where it cannot be used."""

    def compute(args):
      g2, key = args
      usable = jnp.all(jnp.isfinite(g2)) & jnp.any(g2 != 0)
      # An unusable gradient never reaches the SVD (LAPACK's can loop forever on inf or NaN).
      return jax.lax.cond(
          usable,
          lambda: subspace.compute_basis(g2, p.rank, p.use_left, p.use_right, method=method, key=key,
                                         oversample=randomized.oversample, power_iters=randomized.power_iters),
          lambda: jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), jax.eval_shape(
              lambda g: subspace.compute_basis(g, p.rank, p.use_left, p.use_right), g2)))

    return compute

  def adopt_basis(g_shape, p, count, candidate, basis, book, moment_leaves):
    """One leaf's refresh given its candidate basis: the new (or kept) basis, bookkeeping, moments."""
    old_left, old_right = basis
    _, interval, stable, computed, skipped = book  # next_step is recomputed below
    new_left, new_right = candidate
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in candidate if x is not None]))
    first = computed == 0

    def choose(new, old, side):
      if new is None:
        return old
      fallback = subspace.axis_basis(g_shape, side, p.rank, old.dtype)
      spec = sharding.spec_of(old)
      return jnp.where(ok, sharding.reshard(new, spec), jnp.where(first, sharding.reshard(fallback, spec), old))

    left, right = choose(new_left, old_left, "left"), choose(new_right, old_right, "right")
    # Overlaps of whole bases: gathered on a mesh (they are small next to the gradient).
    whole = sharding.replicate
    if moments == "reset":
      moment_leaves = tuple(jnp.where(ok, jnp.zeros_like(m), m) for m in moment_leaves)
    elif moments == "transport":
      c_left = subspace.overlap(whole(left), whole(old_left), -2) if p.use_left else None
      c_right = subspace.overlap(whole(old_right), whole(right), -1) if p.use_right else None
      moment_leaves = tuple(
          jnp.where(ok & ~first, moments_lib.transport(m, s.kind, c_left, c_right), m)
          for m, s in zip(moment_leaves, slots))

    if lazy is not None:
      sims = [subspace.similarity(whole(old_left), whole(left), -2)] if p.use_left else []
      sims += [subspace.similarity(whole(old_right), whole(right), -1)] if p.use_right else []
      similar = ok & ~first & (sum(sims) / len(sims) >= lazy.threshold)
      stable = jnp.where(similar, stable + 1, jnp.where(ok, 0, stable))
      grow = stable >= lazy.patience
      interval = jnp.where(grow, jnp.minimum(2 * interval, lazy.max_gap), interval)
      stable = jnp.where(grow, 0, stable)
    book = (jnp.where(ok, count + interval, count + 1), interval, stable,
            computed + ok.astype(jnp.int32), skipped + (~ok).astype(jnp.int32))
    return (left, right), book, moment_leaves

  def refresh(count, matrices, plans, due, carries):
    """Refreshes the leaves that are ``due``: their bases spread over devices, then adopted one by one."""
    keys = {i: jax.random.fold_in(jax.random.fold_in(jax.random.key(randomized.seed), count), i) for i in plans}
    candidates = sharding.spread([new_basis(plans[i]) for i in plans],
                                 [(matrices[i], keys[i]) for i in plans], [due[i] for i in plans], axis_name)
    return {i: jax.lax.cond(due[i],
                            lambda c, i=i, cand=cand: adopt_basis(matrices[i].shape, plans[i], count, cand, *c),
                            lambda c: c, carries[i])
            for i, cand in zip(plans, candidates)}

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform works on projected shapes; params do not fit it
    leaves, treedef = jax.tree.flatten(updates)
    plans = {i: p for i, p in enumerate(plan(updates)) if p is not None}
    count = state.count
    flat = lambda tree: treedef.flatten_up_to(tree)
    lefts, rights = flat(state.projector.left), flat(state.projector.right)
    books = list(zip(*(flat(t) for t in state.refresh)))
    slot_leaves = [flat(moments_lib.get_at(state.inner_state, s.path)) for s in slots]

    matrices = {i: p.view.to_matrix(leaves[i]) for i, p in plans.items()}
    due = {i: count >= books[i][0] for i in plans}
    carries = {i: ((lefts[i], rights[i]), books[i], tuple(s[i] for s in slot_leaves)) for i in plans}
    if plans:  # one cond around all leaves' refreshes: their SVDs can then run on different devices
      carries = jax.lax.cond(jnp.any(jnp.stack(list(due.values()))),
                             lambda c: refresh(count, matrices, plans, due, c), lambda c: c, carries)
    for i, ((lefts[i], rights[i]), books[i], moment_leaves) in carries.items():
      for s, m in zip(slot_leaves, moment_leaves):
        s[i] = m

    low = list(leaves)
    for i, p in plans.items():
      spec = sharding.spec_of(matrices[i])
      low[i] = projection.project(matrices[i], *_sides(p, lefts[i], rights[i]), spec=spec)

    inner_state = state.inner_state
    for s, leaves_of_slot in zip(slots, slot_leaves):
      inner_state = moments_lib.set_at(inner_state, s.path, treedef.unflatten(leaves_of_slot))
    inner_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None, **extra_args)

    out = flat(inner_updates)
    for i, p in plans.items():
      back = projection.project_back(out[i], *_sides(p, lefts[i], rights[i]))
      out[i] = (scale * p.view.from_matrix(back)).astype(leaves[i].dtype)

    new_state = GaLoreState(
        count=optax.safe_int32_increment(count),
        projector=GaLoreProjector(treedef.unflatten(lefts), treedef.unflatten(rights)),
        inner_state=inner_state,
        refresh=RefreshState(*(treedef.unflatten(list(field)) for field in zip(*books))),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _galore_states(opt_state: Any) -> list[GaLoreState]:
  is_galore = lambda x: isinstance(x, GaLoreState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_galore) if is_galore(x)]


def refresh_stats(opt_state: Any, update_proj_gap: int) -> dict:
  """Refresh totals over the :class:`GaLoreState` s inside ``opt_state`` (any chain or wrapper).

  Returns a dict with ``steps`` (optimizer steps), ``bases_computed``, ``refreshes_skipped``,
  ``fixed_schedule`` (the bases a fixed interval of ``update_proj_gap`` would have computed
  by now) and ``svds_saved`` (``fixed_schedule - bases_computed``: what lazy refresh saved).
  A skipped refresh is retried at the next step, so skips do not reduce ``bases_computed``.
  """
  totals = dict(steps=0, bases_computed=0, refreshes_skipped=0, fixed_schedule=0)
  for state in _galore_states(opt_state):
    steps = int(state.count)
    totals["steps"] = max(totals["steps"], steps)
    targeted = [int(i) > 0 for i in jax.tree.leaves(state.refresh.interval)]  # 0 marks leaves left alone
    totals["bases_computed"] += sum(int(c) for c in jax.tree.leaves(state.refresh.computed))
    totals["refreshes_skipped"] += sum(int(s) for s in jax.tree.leaves(state.refresh.skipped))
    totals["fixed_schedule"] += sum(targeted) * math.ceil(steps / update_proj_gap)
  totals["svds_saved"] = totals["fixed_schedule"] - totals["bases_computed"]
  return totals
