"""The refresh of GaLore's bases: when it happens, how a basis is checked and
adopted.

A targeted leaf's basis is recomputed when the optimizer step ``count`` reaches
its ``next_step``: at steps 0, T, 2T, ... with the defaults. At such a step:

1. :func:`candidate_basis` computes the basis of the leaf's gradient in
   float32 (:mod:`galore_optax.subspace`) and checks it: a gradient that is not
   finite or is all zero never reaches the SVD, and a basis that is not finite
   or whose ``P^T P`` is further than :data:`ORTHONORMALITY_TOL` from the
   identity is refused.
2. :func:`adopt_basis` takes a good candidate, cast to the state's dtype, and
   applies the moment policy (:mod:`galore_optax.moments`) and lazy refresh.
   A refused candidate leaves basis and moments as they were (at a leaf's very
   first refresh, the first ``r`` coordinate axes are taken), counts as
   skipped, and is retried at the next step.

:func:`refresh` runs both for the due leaves inside one ``lax.cond``: on one
device the candidates of leaves that share a shape come from one loop (one
decomposition in the program per :func:`group_key`), on a mesh the SVDs are
spread over devices (:func:`galore_optax.sharding.spread`).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp

from galore_optax import moments as moments_lib
from galore_optax import sharding
from galore_optax import subspace
from galore_optax import targets as targets_lib

# Largest ``max |P^T P - I|`` of an adopted basis: float32 SVDs reach 1e-5.
ORTHONORMALITY_TOL = 1e-3


class RefreshState(NamedTuple):
  """Per-leaf refresh bookkeeping: params-shaped trees of int32 scalars.

  Entries of leaves GaLore leaves alone are zero.
  """

  next_step: Any  # the optimizer step at which the basis is next recomputed
  interval: Any  # the current gap: update_proj_gap, or more under lazy refresh
  stable: Any  # similar refreshes in a row (lazy refresh)
  computed: Any  # bases computed so far
  skipped: Any  # refreshes refused (see the module docstring)


class RefreshConfig(NamedTuple):
  """The checked refresh options of one ``scale_by_galore``."""

  update_proj_gap: int
  method: str
  randomized: subspace.RandomizedSVD
  moments: str
  slots: tuple[moments_lib.MomentSlot, ...]
  scalars: Optional[moments_lib.ScalarLayout]  # under moments='reset' only
  lazy: Optional[subspace.LazyRefresh]
  axis_name: Any
  group_leaves: bool = True


class LeafRecord(NamedTuple):
  """One targeted leaf's share of the GaLore state, as a refresh sees it.

  Attributes:
    left: ``U_r`` ``(*batch, m, r)``, or a scalar if unused.
    right: ``V_r^T`` ``(*batch, r, n)``, or a scalar if unused.
    book: the leaf's entries of :class:`RefreshState` (int32 scalars).
    moments: the leaf's entries of the inner state's moment slots.
    scalars: under ``moments='reset'``, the leaf's own copies of the inner
      state's step counts; else empty.
  """

  left: jax.Array
  right: jax.Array
  book: RefreshState
  moments: tuple[jax.Array, ...]
  scalars: tuple[jax.Array, ...]


def check_static_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(
        f"{name} must be a Python int, got {value!r}: it fixes array shapes or"
        " the refresh schedule, so with optax.inject_hyperparams list"
        f" {name!r} in static_args"
    )
  if value < minimum:
    qualifier = "positive" if minimum == 1 else f">= {minimum}"
    raise ValueError(f"{name} must be {qualifier}, got {value}")


def _resolve_svd(svd: subspace.SvdSpec) -> tuple[str, subspace.RandomizedSVD]:
  if isinstance(svd, subspace.RandomizedSVD):
    check_static_int("RandomizedSVD.oversample", svd.oversample)
    check_static_int("RandomizedSVD.power_iters", svd.power_iters, minimum=0)
    check_static_int("RandomizedSVD.seed", svd.seed, minimum=0)
    return "randomized", svd
  if svd not in subspace.SVD_METHODS:
    raise ValueError(
        f"unknown svd {svd!r}; expected one of {subspace.SVD_METHODS} or a"
        " RandomizedSVD"
    )
  return svd, subspace.RandomizedSVD()


def _resolve_lazy(
    lazy: Optional[subspace.LazyRefresh], gap: int
) -> Optional[subspace.LazyRefresh]:
  if lazy is None:
    return None
  if not isinstance(lazy, subspace.LazyRefresh):
    raise TypeError(
        f"lazy_refresh must be a galore_optax.LazyRefresh or None, got {lazy!r}"
    )
  lazy = lazy._replace(max_gap=lazy.max_gap or 8 * gap)
  if not 0 <= lazy.threshold <= 1:
    raise ValueError(
        f"LazyRefresh.threshold must be in [0, 1], got {lazy.threshold}"
    )
  check_static_int("LazyRefresh.patience", lazy.patience)
  check_static_int("LazyRefresh.max_gap", lazy.max_gap)
  if lazy.max_gap < gap:
    raise ValueError(
        f"LazyRefresh.max_gap {lazy.max_gap} is below update_proj_gap {gap}"
    )
  return lazy


def make_config(
    inner: Any,
    *,
    update_proj_gap: int,
    svd: subspace.SvdSpec,
    moments: str,
    lazy_refresh: Optional[subspace.LazyRefresh],
    axis_name: Any,
    group_leaves: bool = True,
) -> RefreshConfig:
  """Checks the refresh options of ``scale_by_galore`` around ``inner``.

  Raises:
    ValueError, TypeError: naming the offending option.
  """
  check_static_int("update_proj_gap", update_proj_gap)
  method, randomized = _resolve_svd(svd)
  slots = tuple(moments_lib.find_slots(inner, moments))
  scalars = (
      moments_lib.scalar_layout(inner, slots) if moments == "reset" else None
  )
  return RefreshConfig(
      update_proj_gap=update_proj_gap,
      method=method,
      randomized=randomized,
      moments=moments,
      slots=slots,
      scalars=scalars,
      lazy=_resolve_lazy(lazy_refresh, update_proj_gap),
      axis_name=axis_name,
      group_leaves=bool(group_leaves),
  )


def _nan_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), tree)


def refuse_unless_orthonormal(basis: subspace.Basis) -> subspace.Basis:
  """``basis`` if each of its sides is orthonormal to :data:`ORTHONORMALITY_TOL`
  (and finite), else NaNs of its shapes."""
  errors = [
      subspace.orthonormality_error(b, axis)
      for b, axis in zip(basis, (-2, -1))
      if b is not None
  ]
  good = jnp.max(jnp.stack(errors)) < ORTHONORMALITY_TOL  # False for NaN
  return jax.tree.map(lambda b: jnp.where(good, b, jnp.nan), basis)


def candidate_basis(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    g: jax.Array,
    key: jax.Array,
) -> subspace.Basis:
  """The float32 basis of one matrix gradient ``g`` (``(*batch, m, n)``).

  NaN where it must not be used: ``g`` not finite or all zero, or the basis not
  finite or not orthonormal to :data:`ORTHONORMALITY_TOL`.
  """

  def compute():
    basis = subspace.compute_basis(
        g,
        plan.rank,
        plan.use_left,
        plan.use_right,
        method=config.method,
        key=key,
        oversample=config.randomized.oversample,
        power_iters=config.randomized.power_iters,
    )
    return refuse_unless_orthonormal(basis)

  shapes = jax.eval_shape(compute)
  usable = jnp.all(jnp.isfinite(g)) & jnp.any(g != 0)
  # An unusable gradient never reaches the SVD: LAPACK's can loop forever on
  # inf or NaN.
  return jax.lax.cond(usable, compute, lambda: _nan_like(shapes))


def adopt_basis(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    count: jax.Array,
    candidate: subspace.Basis,
    record: LeafRecord,
) -> LeafRecord:
  """One due leaf's refresh, given its :func:`candidate_basis`."""
  ok = jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(x)) for x in candidate if x is not None])
  )
  book = record.book
  first = book.computed == 0
  shape = plan.view.batch_shape + (plan.view.m, plan.view.n)

  def choose(new, old, side):
    if new is None:
      return old
    spec = sharding.spec_of(old)
    fallback = subspace.axis_basis(shape, side, plan.rank, old.dtype)
    new = sharding.reshard(new.astype(old.dtype), spec)
    kept = jnp.where(first, sharding.reshard(fallback, spec), old)
    return jnp.where(ok, new, kept)

  new_left, new_right = candidate
  left = choose(new_left, record.left, "left")
  right = choose(new_right, record.right, "right")
  # Overlaps of whole bases: gathered on a mesh (small next to the gradient).
  whole = sharding.replicate
  moment_leaves, scalars = record.moments, record.scalars
  if config.moments == "reset":
    moment_leaves = tuple(
        jnp.where(ok, jnp.zeros_like(m), m) for m in moment_leaves
    )
    scalars = tuple(
        jnp.where(ok, jnp.asarray(init, s.dtype), s)
        for s, init in zip(scalars, config.scalars.initial)
    )
  elif config.moments == "transport":
    c_left = c_right = None
    if plan.use_left:
      c_left = subspace.overlap(whole(left), whole(record.left), -2)
    if plan.use_right:
      c_right = subspace.overlap(whole(record.right), whole(right), -1)
    moment_leaves = tuple(
        jnp.where(
            ok & ~first,
            moments_lib.transport(m, slot.kind, c_left, c_right),
            m,
        )
        for m, slot in zip(moment_leaves, config.slots)
    )

  interval, stable = book.interval, book.stable
  if config.lazy is not None:
    sims = []
    if plan.use_left:
      sims.append(subspace.similarity(whole(record.left), whole(left), -2))
    if plan.use_right:
      sims.append(subspace.similarity(whole(record.right), whole(right), -1))
    similar = ok & ~first & (sum(sims) / len(sims) >= config.lazy.threshold)
    stable = jnp.where(similar, stable + 1, jnp.where(ok, 0, stable))
    grow = stable >= config.lazy.patience
    interval = jnp.where(
        grow, jnp.minimum(2 * interval, config.lazy.max_gap), interval
    )
    stable = jnp.where(grow, 0, stable)
  book = RefreshState(
      next_step=jnp.where(ok, count + interval, count + 1),
      interval=interval,
      stable=stable,
      computed=book.computed + ok.astype(jnp.int32),
      skipped=book.skipped + (~ok).astype(jnp.int32),
  )
  return LeafRecord(left, right, book, moment_leaves, scalars)


def group_key(plan: targets_lib.LeafPlan, record: LeafRecord) -> Any:
  """Leaves with equal keys refresh as one group: the same matrix shape, rank
  and sides, and the same shapes and dtypes of basis (the gradient's dtype),
  moments and bookkeeping."""
  full = plan.view.batch_shape + (plan.view.m, plan.view.n)
  layout = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(record))
  return (full, plan.rank, plan.use_left, plan.use_right, layout)


def groups(
    plans: dict[int, targets_lib.LeafPlan], records: dict[int, LeafRecord]
) -> list[list[int]]:
  """The targeted leaves' indices by :func:`group_key`, in order of their first
  member."""
  by_key: dict[Any, list[int]] = {}
  for i in plans:
    by_key.setdefault(group_key(plans[i], records[i]), []).append(i)
  return list(by_key.values())


def _group_candidates(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    matrices: list[jax.Array],
    leaf_indices: jax.Array,
    seed: jax.Array,
    due: jax.Array,
) -> list[subspace.Basis]:
  """The members' candidate bases (:func:`candidate_basis`), computed by one
  loop over the ``k`` members of a group: the program holds one member's
  decomposition, whatever ``k``.

  Each due member's gradient is picked by a ``lax.switch`` (the gradients are
  never stacked into a ``k`` times larger copy) and its key folded from its leaf
  index as a leaf refreshed alone folds it; members not due give NaNs, which
  no one adopts.
  """
  compute = functools.partial(candidate_basis, plan, config)
  shapes = jax.eval_shape(compute, matrices[0], seed)
  pick = [lambda gs, t=t: gs[t] for t in range(len(matrices))]

  def one(j, stacked):
    g = jax.lax.switch(j, pick, matrices)
    key = jax.random.fold_in(seed, leaf_indices[j])
    candidate = jax.lax.cond(
        due[j], compute, lambda *_: _nan_like(shapes), g, key
    )
    return jax.tree.map(
        lambda all_, x: jax.lax.dynamic_update_index_in_dim(all_, x, j, 0),
        stacked,
        candidate,
    )

  empty = jax.tree.map(
      lambda x: jnp.zeros((len(matrices), *x.shape), x.dtype), shapes
  )
  stacked = jax.lax.fori_loop(0, len(matrices), one, empty)
  return [
      jax.tree.map(lambda x, t=t: x[t], stacked) for t in range(len(matrices))
  ]


def refresh(
    count: jax.Array,
    plans: dict[int, targets_lib.LeafPlan],
    matrices: dict[int, jax.Array],
    records: dict[int, LeafRecord],
    config: RefreshConfig,
) -> dict[int, LeafRecord]:
  """Refreshes the leaves that are due at step ``count``; the others pass.

  One ``lax.cond`` around all leaves; inside it each due leaf adopts its
  candidate basis (a select, not a cond per leaf). On one device (and with
  ``config.group_leaves``) the candidates of leaves of one :func:`group_key`
  come from one loop (:func:`_group_candidates`), so the program's
  decompositions grow with the number of distinct shapes, not of leaves. On a
  mesh, or under ``config.axis_name``, each leaf's SVD is spread to its own
  device (:func:`galore_optax.sharding.spread`).
  """
  if not plans:
    return records
  due = {i: count >= records[i].book.next_step for i in plans}
  seed = jax.random.fold_in(jax.random.key(config.randomized.seed), count)
  grouped = (
      config.group_leaves
      and config.axis_name is None
      and not sharding.spreads_over_mesh()
  )

  def candidates(records) -> dict[int, subspace.Basis]:
    if grouped:
      out = {}
      for members in groups(plans, records):
        out.update(
            zip(
                members,
                _group_candidates(
                    plans[members[0]],
                    config,
                    [matrices[i] for i in members],
                    jnp.asarray(members, jnp.uint32),
                    seed,
                    jnp.stack([due[i] for i in members]),
                ),
            )
        )
      return out
    fns = [functools.partial(candidate_basis, plans[i], config) for i in plans]
    spread = sharding.spread(
        fns,
        [matrices[i] for i in plans],
        [jax.random.fold_in(seed, i) for i in plans],
        [due[i] for i in plans],
        config.axis_name,
    )
    return dict(zip(plans, spread))

  def run(records):
    # adoption is elementwise work and small products: selecting its result
    # costs less program than a cond per leaf
    return {
        i: jax.tree.map(
            functools.partial(jnp.where, due[i]),
            adopt_basis(plans[i], config, count, candidate, records[i]),
            records[i],
        )
        for i, candidate in candidates(records).items()
    }

  any_due = jnp.any(jnp.stack(list(due.values())))
  return jax.lax.cond(any_due, run, lambda r: r, records)
