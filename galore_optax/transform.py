"""``scale_by_galore``: any optax transform, run in a low-rank subspace of each
matrix gradient."""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import moments as moments_lib
from galore_optax import projection
from galore_optax import quantization
from galore_optax import refresh as refresh_lib
from galore_optax import scaling
from galore_optax import sharding
from galore_optax import step_size
from galore_optax import steps
from galore_optax import subspace
from galore_optax import targets as targets_lib
from galore_optax.refresh import RefreshState


class GaLoreProjector(NamedTuple):
  """The bases of every leaf; both trees have the structure of params.

  For a targeted leaf seen as ``(*batch, m, n)`` matrices, ``left`` holds
  ``U_r`` ``(*batch, m, r)`` and ``right`` holds ``V_r^T`` ``(*batch, r, n)``
  where its projection type uses that side. Unused entries, and all entries of
  leaves left alone, are scalar zeros.
  """

  left: optax.Updates
  right: optax.Updates


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: optimizer steps taken, int32 scalar. A leaf's basis is refreshed
      when ``count >= refresh.next_step``: at steps 0, T, 2T, ... unless lazy
      refresh widens its interval or a refused refresh retries at the next step.
    projector: the bases, a :class:`GaLoreProjector`.
    inner_state: the inner transform's state, initialised on the low-rank
      shapes of targeted leaves and the full shapes of the others.
    refresh: per-leaf bookkeeping, a :class:`galore_optax.RefreshState`.
    leaf_scalars: under ``moments='reset'``, one params-shaped tree per
      non-moment leaf of the inner state (its step counts): each targeted
      leaf's own copy, restarted at its refresh. Empty otherwise.
    residual_norm: under ``residual='fira'``, a params-shaped tree holding for
      each targeted leaf the norm of the residual it last applied, one float32
      per matrix (``batch``-shaped), for the norm-growth limiter; scalar zeros
      for other leaves. Empty otherwise.
  """

  count: jax.Array
  projector: GaLoreProjector
  inner_state: optax.OptState
  refresh: RefreshState
  leaf_scalars: tuple[Any, ...] = ()
  residual_norm: Any = ()


RESIDUALS = (None, "fira")


def _unused(dtype) -> jax.Array:
  # A scalar, not a zero-size array: orbax refuses to save zero-size arrays.
  return jnp.zeros((), dtype)


def _sides(p: targets_lib.LeafPlan, record: refresh_lib.LeafRecord):
  return (
      record.left if p.use_left else None,
      record.right if p.use_right else None,
  )


def scale_by_galore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore: the ``inner`` transform sees low-rank projections of matrix
  gradients.

  For a targeted leaf with gradient ``G`` (``m x n`` per batch index) and a
  basis ``P`` from the SVD of ``G`` at steps 0, T, 2T, ... (see
  :mod:`galore_optax.projection` and :mod:`galore_optax.refresh`)::

    R = project(G, P)                 # m x r, r x n or r x r
    N, inner_state = inner.update(R)  # e.g. Adam's m / (sqrt(v) + eps)
    update = scale * project_back(N, P)

  Other leaves pass through ``inner`` at full shape and are not scaled. The
  defaults reproduce galore-torch: exact SVD, moments kept across a refresh,
  projections in full float32.

  With ``residual='fira'`` (Fira, arXiv 2410.01623) the gradient left over by
  the low-rank step is applied too, scaled by what ``inner`` did in the
  subspace, and kept from growing faster than 1.01 per step::

    S = (G - scale * project_back(R, P)) * ||N|| / (||R|| + 1e-8)
    S = S / max(1, ||S|| / (1.01 ||S_prev||))     # from the second step on
    update = scale * project_back(N, P) + S

  The norms are per channel, along the axis the projection shortened (one ratio
  per column of ``G`` with a left basis, per row with a right one), and over the
  whole matrix for 'full'. As in Fira's reference, ``scale`` also weighs the
  subtracted projection: with ``scale=1`` ``S`` is the part of ``G`` outside the
  subspace, and at full rank it vanishes.

  A refresh never poisons training: a gradient that is not finite or all zero,
  or a basis that is not finite or not orthonormal, is refused; the leaf keeps
  its previous basis (at its very first refresh, the first ``r`` coordinate
  axes) and its moments, the event is counted in ``state.refresh.skipped`` and
  the refresh is retried at the next step.

  Args:
    inner: a transform that does not read params (``optax.scale_by_adam()``,
      ``optax.trace``, ``optax.scale_by_lion()``, ...). Default:
      ``optax.scale_by_adam()``.
    rank: an int, a pytree of ints with the structure of params (entries of
      untargeted leaves are ignored; see :func:`galore_optax.adaptive_ranks`),
      or ``fn(path, shape) -> int``. Clamped to ``min(m, n)``. Static.
    update_proj_gap: T, steps between refreshes of the bases. Static.
    scale: alpha, multiplies the back-projected update: a number (0.25 is the
      reference's; may be injected), or a rule that gives each matrix the
      factor restoring a full-rank update's size (see
      :mod:`galore_optax.step_size`), so that one learning rate suits targeted
      and untargeted leaves: ``'rms'`` (``sqrt(k / r)`` for a side of length
      ``k`` projected to rank ``r``; ``sqrt(m n) / r`` for 'full') for inner
      optimizers with normalised outputs (Adam, Adafactor, Lion), ``'norm'``
      (``||G|| / ||R||``, each step) for linear ones (SGD, momentum). A rule
      multiplies the whole update, Fira's residual included (whose
      subtraction is then the true ``G - P R``). A rule is static.
    proj_type: 'std' (basis on the smaller side, moments along the larger),
      'reverse_std', 'left', 'right' or 'full'. Static.
    targets: which leaves are projected: a pytree of bools, a callable on
      params returning one (e.g. :func:`galore_optax.match_paths`), or None for
      the default: every matrix leaf whose path names no embedding or head.
    matrix_axes: the rows and columns of a leaf's matrix: a
      :class:`galore_optax.MatrixAxes` for all leaves, a pytree of them (None
      entries for non-matrices) or ``fn(path, shape) -> MatrixAxes | None``.
      Default: 2-D leaves are ``(rows=0, cols=1)``, others are not matrices.
      Unnamed axes are batch axes.
    svd: how a basis is computed: 'exact', 'randomized' (or a
      :class:`galore_optax.RandomizedSVD` to tune it) or 'gram' (see
      :mod:`galore_optax.subspace`). All give canonical signs.
    moments: the inner state of a refreshed leaf: 'keep', 'reset' or
      'transport' (see :mod:`galore_optax.moments`).
    lazy_refresh: a :class:`galore_optax.LazyRefresh` to let stable leaves
      refresh less often.
    precision: of the projections ``project`` and ``project_back``. Default
      ``jax.lax.Precision.HIGHEST``, full float32 as the reference computes;
      ``'default'`` lets XLA use TF32 (NVIDIA) or bf16 passes (TPU), faster
      and less exact. The SVDs always run in full float32.
    axis_name: the ``pmap``/``shard_map`` axis name (or tuple of names) the
      update runs under with replicated gradients, to spread the refresh SVDs
      over its devices. Not needed under ``jit`` with ``jax.set_mesh``: the mesh
      is then used (see :mod:`galore_optax.sharding`).
    moment_bits: None (the inner state in its own dtype) or 8: the inner
      optimizer's moments, the low-rank ones of targeted leaves and the
      full-size ones of the others, are kept block-wise in 8 bits
      (:func:`galore_optax.quantize_state`'s rules; leaves under 4096
      elements stay as they are).
    projector_bits: None, 8 or 4: the bases are kept block-wise quantized on
      a linear grid (INT8, or INT4 packed two a byte; blocks of 256, one float32
      scale each) and dequantized for the projections; a refresh quantizes its
      new basis.
    residual: None, or 'fira' to apply the scaled, limited residual above
      (one float32 of state per matrix). Static.
    group_leaves: leaves of one shape, rank and dtype refresh in one loop
      per such group, whose members adopt their bases through identical
      kernels, so that the program's decompositions and generated code grow
      with the number of distinct shapes rather than of leaves (on one device;
      on a mesh each leaf's SVD goes to its own device). False refreshes each
      leaf in its own ``lax.cond``, with the same result. Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GaLoreState`.

  Raises:
    ValueError, TypeError: at construction for bad options, at init for bad
      leaves, naming the option or the leaf.

  Example:
    Any params-free optax transform runs in the subspace; here SGD with
    momentum, the projected matrices under the 'norm' rule:

    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax.chain(
    ...     galore_optax.scale_by_galore(
    ...         optax.trace(0.9), rank=8, scale="norm"
    ...     ),
    ...     optax.scale_by_learning_rate(0.1),
    ... )
    >>> state = tx.init(params)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> updates, state = tx.update(grads, state, params)
    >>> galore = galore_optax.find_states(state, galore_optax.GaLoreState)[0]
    >>> galore.inner_state.trace["w"].shape  # the momentum buffer: 64 x 8
    (64, 8)
  """
  inner = optax.with_extra_args_support(
      optax.scale_by_adam() if inner is None else inner
  )
  if isinstance(rank, (int, float, jax.Array, np.ndarray)):
    # pytrees and callables are checked per leaf, at init
    refresh_lib.check_static_int("rank", rank)
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(
        f"unknown proj_type {proj_type!r}; expected one of"
        f" {projection.PROJ_TYPES}"
    )
  config = refresh_lib.make_config(
      inner,
      update_proj_gap=update_proj_gap,
      svd=svd,
      moments=moments,
      lazy_refresh=lazy_refresh,
      axis_name=axis_name,
      group_leaves=group_leaves,
  )
  n_scalars = 0 if config.scalars is None else len(config.scalars.initial)
  if residual not in RESIDUALS:
    raise ValueError(
        f"unknown residual {residual!r}; expected one of {RESIDUALS}"
    )
  step_size.check_scale(scale)
  if residual is not None and isinstance(scale, str) and scale == "norm":
    raise ValueError(
        "scale='norm' is the rule of linear inner optimizers such as SGD;"
        " under Fira's residual use scale='rms' or a number"
    )
  quantization.check_bits(
      "moment_bits", moment_bits, (None, *quantization.MOMENT_BITS)
  )
  quantization.check_bits(
      "projector_bits", projector_bits, (None, *quantization.PROJECTOR_BITS)
  )
  state_plan = None if moment_bits is None else quantization.state_plan(inner)
  by_leaf = state_plan is not None and state_plan.by_leaf

  def store_inner(inner_state):
    if state_plan is None:
      return inner_state
    return quantization.quantize_tree(inner_state, state_plan)

  def store_basis(basis):
    if projector_bits is None or basis.ndim < 2:  # scalars mark unused sides
      return basis
    return quantization.quantize(basis, f"linear{projector_bits}")

  def plan(tree):
    return targets_lib.plan_leaves(
        tree,
        rank=rank,
        proj_type=proj_type,
        targets=targets,
        matrix_axes=matrix_axes,
    )

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
      # e.g. the placeholder of optax.tree.map_params: every params-shaped
      # subtree of the state is the placeholder itself
      n_fields = len(RefreshState._fields)
      return GaLoreState(
          count=jnp.zeros([], jnp.int32),
          projector=GaLoreProjector(params, params),
          inner_state=inner.init(params),
          refresh=RefreshState(*([params] * n_fields)),
          leaf_scalars=(params,) * n_scalars,
          residual_norm=() if residual is None else params,
      )
    lefts, rights, proxies, intervals, norms = [], [], [], [], []
    for leaf, p in zip(leaves, plan(params)):
      if p is None:
        lefts.append(_unused(leaf.dtype))
        rights.append(_unused(leaf.dtype))
        proxies.append(leaf)
        intervals.append(jnp.zeros([], jnp.int32))
        norms.append(_unused(jnp.float32))
        continue
      v = p.view
      spec = sharding.spec_of(jax.eval_shape(v.to_matrix, leaf))
      left_spec, right_spec = sharding.basis_specs(spec)
      new = lambda shape, spec, leaf=leaf: sharding.zeros(
          shape, leaf.dtype, spec, leaf
      )
      lefts.append(
          new(v.batch_shape + (v.m, p.rank), left_spec)
          if p.use_left
          else _unused(leaf.dtype)
      )
      rights.append(
          new(v.batch_shape + (p.rank, v.n), right_spec)
          if p.use_right
          else _unused(leaf.dtype)
      )
      low_spec = sharding.projected_spec(spec, p.use_left, p.use_right)
      proxies.append(new(p.low_rank_shape, low_spec))
      intervals.append(jnp.full([], config.update_proj_gap, jnp.int32))
      norms.append(scaling.norm_state(v.batch_shape, spec, leaf))

    # Distinct arrays, not one shared value: donating the state must not donate
    # a buffer twice.
    def per_leaf(value):
      return treedef.unflatten([jnp.array(value) for _ in leaves])

    scalars = () if config.scalars is None else config.scalars.initial
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projector=GaLoreProjector(
            treedef.unflatten([store_basis(b) for b in lefts]),
            treedef.unflatten([store_basis(b) for b in rights]),
        ),
        inner_state=store_inner(inner.init(treedef.unflatten(proxies))),
        refresh=RefreshState(
            next_step=per_leaf(np.int32(0)),
            interval=treedef.unflatten(intervals),
            stable=per_leaf(np.int32(0)),
            computed=per_leaf(np.int32(0)),
            skipped=per_leaf(np.int32(0)),
        ),
        leaf_scalars=tuple(per_leaf(s) for s in scalars),
        residual_norm=() if residual is None else treedef.unflatten(norms),
    )

  def with_moments(inner_state, records, treedef):
    """The inner state with each targeted leaf's moments from ``records``."""
    for k, s in enumerate(config.slots):
      column = treedef.flatten_up_to(moments_lib.get_at(inner_state, s.path))
      for i, r in records.items():
        column[i] = r.moments[k]
      inner_state = moments_lib.set_at(
          inner_state, s.path, treedef.unflatten(column)
      )
    return inner_state

  def dequantize_targeted(inner_state, plans, treedef):
    """The inner state with the targeted leaves' (low-rank) moments
    dequantized; the others stay quantized for :func:`update_by_leaf`."""
    for path, _ in state_plan.slots:
      column = treedef.flatten_up_to(moments_lib.get_at(inner_state, path))
      for i in plans:
        column[i] = quantization.dequantize_tree(column[i])
      inner_state = moments_lib.set_at(
          inner_state, path, treedef.unflatten(column)
      )
    return inner_state

  def refresh_step(state, inner_state, plans, matrices, flat):
    """1. Each targeted leaf's :class:`refresh_lib.LeafRecord`, with a new
    basis (and its moments transported or reset) where it is due; and its
    bases as stored (quantized codes under ``projector_bits``)."""
    stored = {
        i: (left, right)
        for i, (left, right) in enumerate(
            zip(flat(state.projector.left), flat(state.projector.right))
        )
        if i in plans
    }
    books = [RefreshState(*b) for b in zip(*(flat(t) for t in state.refresh))]
    slots = [
        flat(moments_lib.get_at(inner_state, s.path)) for s in config.slots
    ]
    scalars = [flat(t) for t in state.leaf_scalars]
    records = refresh_lib.refresh(
        state.count,
        plans,
        matrices,
        {
            i: refresh_lib.LeafRecord(
                *(quantization.dequantize_tree(b) for b in stored[i]),
                books[i],
                tuple(column[i] for column in slots),
                tuple(column[i] for column in scalars),
            )
            for i in plans
        },
        config,
    )
    if projector_bits is None:
      return records, {i: (r.left, r.right) for i, r in records.items()}
    for i, r in records.items():
      # A due leaf's new basis is quantized once; the others keep their
      # codes, so a stored basis never drifts. What is stored is what the
      # projections use.
      due = state.count >= books[i].next_step
      stored[i] = tuple(
          jax.tree.map(
              lambda new, old, due=due: jnp.where(due, new, old),
              store_basis(new),
              old,
          )
          for new, old in zip((r.left, r.right), stored[i])
      )
      records[i] = r._replace(
          left=quantization.dequantize_tree(stored[i][0]),
          right=quantization.dequantize_tree(stored[i][1]),
      )
    return records, stored

  def inner_step(low, inner_state, plans, records, treedef, extra_args):
    """3. ``inner`` on the low-rank and untargeted leaves alike. Under
    ``moments='reset'`` each targeted leaf steps its own copy of the inner
    state, whose step count restarted at its last refresh (what the shared
    update computed for these leaves is discarded; XLA drops it)."""
    inner_state = with_moments(inner_state, records, treedef)
    if by_leaf:
      out, inner_state = quantization.update_by_leaf(
          inner,
          state_plan,
          treedef.unflatten(list(low)),
          inner_state,
          extra_args,
      )
      out = treedef.flatten_up_to(out)
    else:
      out, inner_state = steps.inner_update(
          inner, low, inner_state, treedef, extra_args
      )
    if config.scalars is None:
      return out, inner_state, records
    for i in plans:
      r = records[i]
      out[i], own_scalars, own_moments = moments_lib.own_update(
          inner,
          config.scalars,
          config.slots,
          low[i],
          r.scalars,
          r.moments,
          **extra_args,
      )
      records[i] = r._replace(
          moments=tuple(own_moments), scalars=tuple(own_scalars)
      )
    return out, with_moments(inner_state, records, treedef), records

  # Fira's residual from one full-size product where the bases are
  # orthonormal (not quantized ones)
  fused_residual = projector_bits is None

  def back_project_step(
      leaves, plans, matrices, records, low, out, norms, count
  ):
    """4. ``scale * project_back(N, P)``, plus Fira's residual; a rule's
    factor multiplies the whole."""
    for i, p in plans.items():
      sides = _sides(p, records[i])
      alpha, factor = step_size.galore_factors(scale, p, matrices[i], low[i])
      if residual is not None and fused_residual and p.use_left != p.use_right:
        back, norms[i] = steps.fira_update(
            matrices[i],
            out[i],
            low[i],
            *sides,
            alpha,
            norms[i],
            count == 0,
            precision,
        )
        out[i] = p.view.from_matrix(factor * back).astype(leaves[i].dtype)
        continue
      back = alpha * projection.project_back(
          out[i], *sides, precision=precision
      )
      if residual is not None:
        outside = matrices[i] - alpha * projection.project_back(
            low[i], *sides, precision=precision
        )
        limited, norms[i] = steps.rescale(
            outside,
            out[i],
            low[i],
            scaling.projected_axes(p.use_left, p.use_right),
            norms[i],
            count == 0,
        )
        back = back + limited
      out[i] = p.view.from_matrix(factor * back).astype(leaves[i].dtype)
    return out, norms

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform works on projected shapes
    if state_plan is not None or projector_bits is not None:
      # flax.nnx.Optimizer may hand quantized nodes back as bare mappings
      state = quantization.restore_quantized(
          state, jax.eval_shape(init_fn, updates)
      )
    leaves, treedef = jax.tree.flatten(updates)
    flat = treedef.flatten_up_to
    plans = {i: p for i, p in enumerate(plan(updates)) if p is not None}
    matrices = {i: p.view.to_matrix(leaves[i]) for i, p in plans.items()}
    inner_state = (
        dequantize_targeted(state.inner_state, plans, treedef)
        if by_leaf
        else quantization.dequantize_tree(state.inner_state)
    )

    records, stored = refresh_step(state, inner_state, plans, matrices, flat)
    low = steps.project(
        leaves,
        plans,
        matrices,
        lambda i: _sides(plans[i], records[i]),
        precision,
    )
    out, inner_state, records = inner_step(
        low, inner_state, plans, records, treedef, extra_args
    )
    out, norms = back_project_step(
        leaves,
        plans,
        matrices,
        records,
        low,
        out,
        None if residual is None else flat(state.residual_norm),
        state.count,
    )

    # The new state: the targeted leaves' entries from their records.
    def column(tree, entry):
      values = flat(tree)
      for i, r in records.items():
        values[i] = entry(i, r)
      return treedef.unflatten(values)

    return treedef.unflatten(out), GaLoreState(
        count=optax.safe_int32_increment(state.count),
        projector=GaLoreProjector(
            column(state.projector.left, lambda i, r: stored[i][0]),
            column(state.projector.right, lambda i, r: stored[i][1]),
        ),
        inner_state=store_inner(inner_state),
        refresh=RefreshState(*(
            column(tree, lambda i, r, k=k: r.book[k])
            for k, tree in enumerate(state.refresh)
        )),
        leaf_scalars=tuple(
            column(tree, lambda i, r, k=k: r.scalars[k])
            for k, tree in enumerate(state.leaf_scalars)
        ),
        residual_norm=() if residual is None else treedef.unflatten(norms),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bases_computed(opt_state: Any) -> jax.Array:
  """Bases computed so far over every GaLore state, an int32 scalar: a train
  step can return it to tell which steps refreshed.

  States stacked on leading axes (one per layer, as the layer-wise step keeps
  them) count every entry.
  """
  total = jnp.zeros([], jnp.int32)
  for state in steps.find_states(opt_state, GaLoreState):
    for computed in jax.tree.leaves(state.refresh.computed):
      total = total + jnp.sum(computed)
  return total


def refresh_stats(opt_state: Any, update_proj_gap: int) -> dict:
  """Refresh totals over the :class:`GaLoreState` s inside ``opt_state``.

  Returns a dict with ``steps`` (optimizer steps), ``bases_computed``,
  ``refreshes_skipped``, ``fixed_schedule`` (the bases a fixed interval of
  ``update_proj_gap`` would have computed by now) and ``svds_saved``
  (``fixed_schedule - bases_computed``: what lazy refresh saved). A skipped
  refresh is retried at the next step, so skips do not reduce
  ``bases_computed``.
  """
  totals = dict(
      steps=0, bases_computed=0, refreshes_skipped=0, fixed_schedule=0
  )
  for state in steps.find_states(opt_state, GaLoreState):
    # np.sum / np.max: a stacked state (one per layer) counts every entry
    taken = int(np.max(state.count))
    totals["steps"] = max(totals["steps"], taken)
    # an interval of 0 marks a leaf left alone
    intervals = jax.tree.leaves(state.refresh.interval)
    targeted = sum(int(np.sum(np.asarray(i) > 0)) for i in intervals)
    computed = jax.tree.leaves(state.refresh.computed)
    skipped = jax.tree.leaves(state.refresh.skipped)
    totals["bases_computed"] += sum(int(np.sum(c)) for c in computed)
    totals["refreshes_skipped"] += sum(int(np.sum(s)) for s in skipped)
    totals["fixed_schedule"] += targeted * math.ceil(taken / update_proj_gap)
  totals["svds_saved"] = totals["fixed_schedule"] - totals["bases_computed"]
  return totals
