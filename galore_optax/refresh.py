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

:func:`refresh` runs both for each due leaf: on one device in one loop per
:func:`group_key` (or in the leaf's own ``lax.cond``, :func:`refresh_leaf`), on
a mesh with the SVDs spread over devices (:func:`galore_optax.sharding.spread`).
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


def is_orthonormal(basis: subspace.Basis) -> jax.Array:
  """Whether each side of ``basis`` is finite and orthonormal to
  :data:`ORTHONORMALITY_TOL`, a bool scalar."""
  errors = [
      subspace.orthonormality_error(b, axis)
      for b, axis in zip(basis, (-2, -1))
      if b is not None
  ]
  return jnp.max(jnp.stack(errors)) < ORTHONORMALITY_TOL  # False for NaN


def sketch_key(
    config: RefreshConfig, count: jax.Array, leaf_index: jax.Array
) -> jax.Array:
  """The randomized refresh's key of leaf ``leaf_index`` at step ``count``:
  the same on every device (:class:`galore_optax.RandomizedSVD`)."""
  seed = jax.random.key(config.randomized.seed)
  return jax.random.fold_in(jax.random.fold_in(seed, count), leaf_index)


def candidate_basis(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    g: jax.Array,
    key: jax.Array,
) -> tuple[subspace.Basis, jax.Array]:
  """The float32 basis of one matrix gradient ``g`` (``(*batch, m, n)``) and
  whether it may be used: False when ``g`` is not finite or all zero, or the
  basis is not finite or not orthonormal to :data:`ORTHONORMALITY_TOL`.

  ``key`` (:func:`sketch_key`) draws the randomized sketch."""
  # One reduction answers both questions about g: NaN and inf propagate.
  peak = jnp.max(jnp.abs(g))
  usable = jnp.isfinite(peak) & (peak > 0)
  # An unusable gradient never reaches the decomposition (LAPACK's SVD can loop
  # forever on inf or NaN): zeros go in its place, and the result is refused.
  g = jnp.where(usable, g, jnp.zeros((), g.dtype))
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
  return basis, usable & is_orthonormal(basis)


def adopt_basis(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    count: jax.Array,
    candidate: subspace.Basis,
    ok: jax.Array,
    record: LeafRecord,
) -> LeafRecord:
  """One due leaf's refresh, given its :func:`candidate_basis` and whether it
  may be used."""
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


def refresh_leaf(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    count: jax.Array,
    g: jax.Array,
    leaf_index: jax.Array,
    record: LeafRecord,
) -> LeafRecord:
  """One due leaf's whole refresh: :func:`candidate_basis`, then
  :func:`adopt_basis`."""
  key = sketch_key(config, count, leaf_index)
  candidate, ok = candidate_basis(plan, config, g, key)
  return adopt_basis(plan, config, count, candidate, ok, record)


def _unchanged(count, g, leaf_index, record):
  del count, g, leaf_index
  return record


def opaque_indices(count: jax.Array, k: int) -> tuple[jax.Array, ...]:
  """The ints ``0 .. k-1`` as ``k`` separate scalars XLA cannot constant-fold.

  Taking member ``t`` out of a stacked ``(k, ...)`` result at the constant
  offset ``t`` gives each member a kernel of its own (XLA's CPU backend bakes
  the offset into the generated code, about 20 ms of compilation each); at an
  index that is a runtime value the members' kernels are identical and
  compiled once. A loop whose trip count XLA cannot know (``count`` is never
  negative, which XLA does not know) makes the indices runtime values.
  """
  zero = jnp.minimum(count, 0).astype(jnp.int32)
  bump = lambda _, indices: tuple(i + zero for i in indices)
  start = tuple(jnp.int32(t) for t in range(k))
  return jax.lax.fori_loop(0, zero + 1, bump, start)


def _looped_refresh(
    plan: targets_lib.LeafPlan,
    config: RefreshConfig,
    count: jax.Array,
    matrices: list[jax.Array],
    leaf_indices: list[int],
    due: list[jax.Array],
    records: list[LeafRecord],
) -> list[LeafRecord]:
  """The refresh of one group's ``k`` members: their candidates computed by
  one loop, so that the program holds one member's decomposition and checks
  whatever ``k``; each member's gradient is picked by a ``lax.switch`` (never
  stacked into a ``k`` times larger copy), and each member adopts its
  candidate taken out at an :func:`opaque_indices` index, so that the members'
  adoptions compile to the same kernels."""
  compute = functools.partial(candidate_basis, plan, config)
  indices = jnp.asarray(leaf_indices, jnp.uint32)
  shapes = jax.eval_shape(compute, matrices[0], sketch_key(config, count, 0))
  pick = [lambda gs, t=t: gs[t] for t in range(len(matrices))]
  due_flags = jnp.stack(due)

  def one(j, stacked):
    member = lambda j, key: compute(jax.lax.switch(j, pick, matrices), key)
    zeros = lambda *_: jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes
    )
    key = sketch_key(config, count, indices[j])
    candidate = jax.lax.cond(due_flags[j], member, zeros, j, key)
    return jax.tree.map(
        lambda all_, x: jax.lax.dynamic_update_index_in_dim(all_, x, j, 0),
        stacked,
        candidate,
    )

  empty = jax.tree.map(
      lambda x: jnp.zeros((len(matrices), *x.shape), x.dtype), shapes
  )
  stacked = jax.lax.fori_loop(0, len(matrices), one, empty)

  # The members' adoptions are one function of the same shapes: traced once,
  # its equations then inlined for each member.
  @functools.partial(jax.jit, inline=True)
  def adopt(at, due, record):
    take = lambda x: jax.lax.dynamic_index_in_dim(x, at, keepdims=False)
    candidate = jax.tree.map(take, stacked)
    return _select(
        due, adopt_basis(plan, config, count, *candidate, record), record
    )

  return [
      adopt(at, due[t], records[t])
      for t, at in enumerate(opaque_indices(count, len(matrices)))
  ]


def _when_any(due: dict[int, jax.Array], fn, records):
  """``fn(records)`` in one cond, run when any leaf is due."""
  any_due = jnp.any(jnp.stack(list(due.values())))
  return jax.lax.cond(any_due, fn, lambda r: r, records)


def _select(due: jax.Array, refreshed: LeafRecord, record: LeafRecord):
  # What the refresh left as it was stays the very same value, so that a cond
  # around it forwards it instead of copying it through.
  return jax.tree.map(
      lambda new, old: old if new is old else jnp.where(due, new, old),
      refreshed,
      record,
  )


def refresh(
    count: jax.Array,
    plans: dict[int, targets_lib.LeafPlan],
    matrices: dict[int, jax.Array],
    records: dict[int, LeafRecord],
    config: RefreshConfig,
) -> dict[int, LeafRecord]:
  """Refreshes the leaves that are due at step ``count``; the others pass.

  On one device with ``config.group_leaves``, the leaves of one
  :func:`group_key` refresh in one loop (:func:`_looped_refresh`), all loops
  inside one cond run when any leaf is due: the program holds one
  decomposition per distinct shape, whatever the number of leaves, and the
  members' adoptions compile to shared kernels. Without it each leaf refreshes
  inside its own ``lax.cond`` on its due flag (:func:`refresh_leaf`). Either
  way a step computes only the due leaves' decompositions.

  On a mesh, or under ``config.axis_name``, the candidates are spread over the
  devices, one leaf's SVD per device (:func:`galore_optax.sharding.spread`), and
  each due leaf adopts its own.
  """
  if not plans:
    return records
  due = {i: count >= records[i].book.next_step for i in plans}
  index = lambda i: jnp.asarray(i, jnp.uint32)
  if config.axis_name is not None or sharding.spreads_over_mesh():

    def spread(records):
      fns = [
          functools.partial(candidate_basis, plans[i], config) for i in plans
      ]
      candidates = sharding.spread(
          fns,
          [matrices[i] for i in plans],
          [sketch_key(config, count, i) for i in plans],
          [due[i] for i in plans],
          config.axis_name,
      )
      return {
          i: _select(
              due[i],
              adopt_basis(plans[i], config, count, *candidate, records[i]),
              records[i],
          )
          for i, candidate in zip(plans, candidates)
      }

    return _when_any(due, spread, records)
  if config.group_leaves:

    def looped(records):
      out = {}
      for members in groups(plans, records):
        out.update(
            zip(
                members,
                _looped_refresh(
                    plans[members[0]],
                    config,
                    count,
                    [matrices[i] for i in members],
                    members,
                    [due[i] for i in members],
                    [records[i] for i in members],
                ),
            )
        )
      return out

    return _when_any(due, looped, records)
  return {
      i: jax.lax.cond(
          due[i],
          functools.partial(refresh_leaf, plans[i], config),
          _unchanged,
          count,
          matrices[i],
          index(i),
          records[i],
      )
      for i in plans
  }
