"""GaLore on a device mesh: where its state lives and who computes each refresh.

Placement. On a mesh with explicit axes (``jax.make_mesh``'s default) every
array's type carries its :class:`~jax.sharding.PartitionSpec`. For a leaf seen
as ``(*batch, m, n)`` matrices with spec ``(*b, row, col)``:

- ``left`` ``U_r`` ``(*batch, m, r)`` is ``(*b, row, None)``: its m-side rows
  follow the parameter's rows; ``right`` ``V_r^T`` ``(*batch, r, n)`` is ``(*b,
  None, col)``;
- the projected gradient and the inner moments drop the spec of each projected
  side: ``(*b, None, col)`` under a left basis, ``(*b, row, None)`` under a
  right one.

So with FSDP on the larger side of each matrix (where the moments of
``proj_type='std'`` live) the projections need no communication, and the state
is split like the parameters. On auto meshes and single devices these helpers do
nothing: XLA places what it likes.

Refresh. Under ``jax.set_mesh`` (or, with ``axis_name``, inside
``pmap``/``shard_map``), the bases due at a step are computed round-robin, each
on one device, and shared with one ``psum``: each device thus runs about ``1/D``
of the SVDs. A due gradient split over one mesh axis (FSDP) travels whole only
to the device that computes its basis: gradients of the same shape and split go
in rounds of ``D``, one per device, and an ``all_to_all`` along the split axis
leaves each device the whole matrix of its own (see :func:`spread`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# A full-length PartitionSpec as a tuple; None off explicit meshes.
Spec = Optional[tuple]


def spec_of(x: Any) -> Spec:
  """``x``'s partition spec padded to ``x.ndim`` if it lives on an explicit
  mesh, else None."""
  sharding = (
      x.sharding
      if isinstance(x, jax.ShapeDtypeStruct)
      else jax.typeof(x).sharding
  )
  if (
      not isinstance(sharding, NamedSharding)
      or AxisType.Explicit not in sharding.mesh.axis_types
  ):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (len(x.shape) - len(spec))


def basis_specs(spec: Spec) -> tuple[Spec, Spec]:
  """Specs of ``left`` ``(*b, m, r)`` and ``right`` ``(*b, r, n)`` for a matrix
  of spec ``(*b, row, col)``."""
  if spec is None:
    return None, None
  return spec[:-1] + (None,), spec[:-2] + (None, spec[-1])


def projected_spec(spec: Spec, use_left: bool, use_right: bool) -> Spec:
  """Spec of the projected matrix: each side with a basis loses its sharding."""
  if spec is None:
    return None
  return spec[:-2] + (
      None if use_left else spec[-2],
      None if use_right else spec[-1],
  )


def zeros(
    shape: Sequence[int], dtype, spec: Spec, like: Any = None
) -> jax.Array:
  """Zeros of ``shape`` placed by ``spec`` on the mesh of ``like`` (plain zeros
  when spec is None)."""
  if spec is None:
    return jnp.zeros(shape, dtype)
  sharding = (
      like.sharding
      if isinstance(like, jax.ShapeDtypeStruct)
      else jax.typeof(like).sharding
  )
  return jnp.zeros(
      shape,
      dtype,
      out_sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)),
  )


def reshard(x: jax.Array, spec: Spec) -> jax.Array:
  """``x`` moved to ``spec`` (no-op when spec is None or already so)."""
  if spec is None or spec_of(x) == tuple(spec):
    return x
  return jax.sharding.reshard(x, PartitionSpec(*spec))


def replicate(x: jax.Array) -> jax.Array:
  """``x`` gathered onto every device of an explicit mesh (no-op elsewhere)."""
  spec = spec_of(x)
  return (
      x
      if spec is None or not any(spec)
      else jax.sharding.reshard(x, PartitionSpec())
  )


# Whether refreshes are spread over the devices of the mesh set with
# ``jax.set_mesh`` (True), or every device computes every due basis (False:
# kept so benchmarks can compare the two).
SPREAD_OVER_MESH = True


def _context_axes() -> Optional[tuple[str, ...]]:
  """The axes of the mesh set with ``jax.set_mesh``, when they can host a
  ``shard_map`` and :data:`SPREAD_OVER_MESH` is on."""
  mesh = jax.sharding.get_abstract_mesh()
  if not SPREAD_OVER_MESH:
    return None
  if mesh.empty or mesh.size == 1 or AxisType.Manual in mesh.axis_types:
    return None  # no mesh, one device, or already inside a shard_map
  return tuple(mesh.axis_names)


def spreads_over_mesh() -> bool:
  """Whether :func:`spread` would share its items among the devices of the
  mesh set with ``jax.set_mesh``."""
  return _context_axes() is not None


# Whether a due gradient split over one mesh axis is brought whole only to the
# device that computes its basis (True), or gathered onto every device (False:
# the earlier behaviour, kept so benchmarks can compare the two).
GATHER_TO_OWNER = True


def _split_axis(spec: Spec) -> Optional[tuple[int, str]]:
  """``(dim, axis)`` when ``spec`` splits exactly one dimension, among the last
  two, over exactly one mesh axis; else None."""
  if spec is None:
    return None
  split = [(dim, a) for dim, a in enumerate(spec) if a is not None]
  if len(split) != 1:
    return None
  dim, axis = split[0]
  if isinstance(axis, tuple):
    axis = axis[0] if len(axis) == 1 else None
  if not isinstance(axis, str) or dim < len(spec) - 2:
    return None
  return dim, axis


def _zeros_of(shapes: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def spread(
    fns: Sequence[Callable[[jax.Array, Any], Any]],
    matrices: Sequence[jax.Array],
    extras: Sequence[Any],
    active: Sequence[jax.Array],
    axis_name: Any = None,
) -> list[Any]:
  """``[fn(matrix, extra) if active else zeros]``, round-robin over devices;
  results everywhere.

  Item ``k`` is computed on one device only, the ``k``-th in round-robin order
  (among items that share shapes and placement; with one such group, device
  ``k mod D``), and one ``psum`` hands every device every result.

  Under ``jax.set_mesh``, a matrix split over one mesh axis (FSDP) travels whole
  only to its owner: items with the same shapes and split go in rounds of ``D``,
  one per device, and an ``all_to_all`` along the split axis gives each device
  the whole matrix of its own item. A device thus holds one whole gradient at a
  time, not every due one. Matrices split otherwise are gathered everywhere.

  Args:
    fns: one function per item, ``(matrix, extra) -> pytree of arrays`` (no
      collectives inside); items whose matrices share shape, dtype and
      placement must give results of the same shapes.
    matrices: their matrices (passed in, never closed over: ``shard_map`` cannot
      close over arrays sharded on explicit axes).
    extras: small replicated inputs, one pytree per item (e.g. a PRNG key).
    active: boolean scalars, the same on every device; inactive items give
      zeros.
    axis_name: the ``pmap``/``shard_map`` axis (or tuple of axes) this code runs
      under with replicated matrices, if any. Without it, the mesh set by
      ``jax.set_mesh`` is used; with neither, everything is computed here.
  """
  n = len(fns)
  whole = [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in matrices]

  def compute(i, on, matrix, extra):
    zeros = _zeros_of(jax.eval_shape(fns[i], matrix, extra))
    return jax.lax.cond(on, fns[i], lambda *_: zeros, matrix, extra)

  def owned(names, matrices, extras):
    """Inside the mapped axes ``names``, with whole matrices on every device."""
    me, size = jax.lax.axis_index(names), jax.lax.psum(1, names)
    outs = [
        compute(i, active[i] & (me == i % size), matrices[i], extras[i])
        for i in range(n)
    ]
    return jax.lax.psum(outs, names)  # owners hold results, the others zeros

  if axis_name is not None:
    return owned(axis_name, matrices, extras)
  names = _context_axes()
  if names is None:  # an SVD takes whole matrices
    return [
        compute(i, active[i], replicate(matrices[i]), extras[i])
        for i in range(n)
    ]
  mesh = jax.sharding.get_abstract_mesh()
  specs = [spec_of(m) for m in matrices]
  split = [_split_axis(s) if GATHER_TO_OWNER else None for s in specs]
  local = [i for i in range(n) if split[i] is None]

  def body(matrices, extras, active):
    shapes = [jax.eval_shape(fns[i], whole[i], extras[i]) for i in range(n)]
    me = jax.lax.axis_index(names)
    outs = [None] * n
    for k, i in enumerate(local):  # whole on every device: no gathering
      mine = active[i] & (me == k % mesh.size)
      outs[i] = compute(i, mine, matrices[i], extras[i])
    rounds = _rounds(split, whole, shapes, len(local), mesh.size)
    for (dim, axis), owners in rounds:
      results = _owner_round(
          names, mesh, axis, dim, owners, fns, shapes, matrices, extras, active
      )
      for i, out in results.items():
        outs[i] = out
    return jax.lax.psum(outs, names)

  in_specs = [
      PartitionSpec(*specs[i]) if split[i] else PartitionSpec()
      for i in range(n)
  ]
  matrices = [m if split[i] else replicate(m) for i, m in enumerate(matrices)]
  return jax.shard_map(
      body,
      in_specs=(in_specs, PartitionSpec(), PartitionSpec()),
      out_specs=PartitionSpec(),
      axis_names=set(names),
      check_vma=False,
  )(matrices, list(extras), list(active))


def _rounds(split, whole, shapes, start, size):
  """The split items in rounds: ``[((dim, axis), {device: item})]``.

  Items whose matrices share shape, dtype and split, and whose results share
  shapes, are dealt round-robin from position ``start`` on; a round holds the
  positions ``[r * size, (r + 1) * size)``, so at most one item per device.
  """
  groups: dict[Any, list[int]] = {}
  for i, where in enumerate(split):
    if where is not None:
      results = [(s.shape, s.dtype) for s in jax.tree.leaves(shapes[i])]
      key = (
          whole[i].shape,
          whole[i].dtype,
          where,
          jax.tree.structure(shapes[i]),
          tuple(results),
      )
      groups.setdefault(key, []).append(i)
  rounds, position = [], start
  for key, items in groups.items():
    by_round: dict[int, dict[int, int]] = {}
    for i in items:
      by_round.setdefault(position // size, {})[position % size] = i
      position += 1
    rounds += [(key[2], owners) for owners in by_round.values()]
  return rounds


def _owner_round(
    names, mesh, axis, dim, slots, fns, shapes, matrices, extras, active
):
  """One round of split items, at most one per device (``slots``: device ->
  item), inside a ``shard_map`` over ``names``.

  The matrices are local shards, split along ``dim`` over ``axis``. Each device
  stacks its shards of the items owned along its ``axis`` row; an ``all_to_all``
  over ``axis`` leaves it the whole matrix of its own item, whose ``fn`` it then
  runs. Returns item -> result on its owner, zeros elsewhere.
  """
  sizes = dict(mesh.shape)
  others = [a for a in names if a != axis]
  strides = {
      a: math.prod(sizes[b] for b in names[names.index(a) + 1 :]) for a in names
  }
  rows = list(itertools.product(*(range(sizes[a]) for a in others)))

  def device(row, k):
    coords = {**dict(zip(others, row)), axis: k}
    return sum(coords[a] * strides[a] for a in names)

  items = list(slots.values())
  like = matrices[items[0]]
  out_shapes = shapes[items[0]]
  me = jax.lax.axis_index(names)

  def stack(row):
    owners = [slots.get(device(row, k)) for k in range(sizes[axis])]
    return jnp.stack(
        [jnp.zeros_like(like) if i is None else matrices[i] for i in owners]
    )

  def run_round():
    if len(rows) > 1:
      mine = jax.lax.switch(
          jax.lax.axis_index(tuple(others)),
          [functools.partial(stack, r) for r in rows],
      )
    else:
      mine = stack(rows[0])
    whole = jax.lax.all_to_all(
        mine, axis, split_axis=0, concat_axis=1 + dim, tiled=True
    )[0]
    branches = [
        (lambda w, fn=fns[slots[d]], e=extras[slots[d]]: fn(w, e))
        if d in slots
        else (lambda w: _zeros_of(out_shapes))
        for d in range(mesh.size)
    ]
    on = jnp.stack([
        active[slots[d]] if d in slots else jnp.bool_(False)
        for d in range(mesh.size)
    ])[me]
    out = jax.lax.cond(
        on,
        lambda: jax.lax.switch(me, branches, whole),
        lambda: _zeros_of(out_shapes),
    )

    def on_owner(d):  # the result on device ``d``, zeros on the others
      return jax.tree.map(
          lambda o: jnp.where(me == d, o, jnp.zeros_like(o)), out
      )

    return {i: on_owner(d) for d, i in slots.items()}

  due = jnp.any(jnp.stack([active[i] for i in items]))
  zeros = {i: _zeros_of(out_shapes) for i in items}
  return jax.lax.cond(due, run_round, lambda: zeros)
