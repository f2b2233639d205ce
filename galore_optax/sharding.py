"""GaLore on a device mesh: where its state lives and who computes each refresh.

Placement. On a mesh with explicit axes (``jax.make_mesh``'s default) every array's type
carries its :class:`~jax.sharding.PartitionSpec`. For a leaf seen as ``(*batch, m, n)``
matrices with spec ``(*b, row, col)``:

- ``left`` ``U_r`` ``(*batch, m, r)`` is ``(*b, row, None)``: its m-side rows follow the
  parameter's rows; ``right`` ``V_r^T`` ``(*batch, r, n)`` is ``(*b, None, col)``;
- the projected gradient and the inner moments drop the spec of each projected side:
  ``(*b, None, col)`` under a left basis, ``(*b, row, None)`` under a right one.

So with FSDP on the larger side of each matrix (where the moments of ``proj_type='std'``
live) the projections need no communication, and the state is split like the parameters.
On auto meshes and single devices these helpers do nothing: XLA places what it likes.

Refresh. Under ``jax.set_mesh`` (or, with ``axis_name``, inside ``pmap``/``shard_map``),
the bases due at a step are computed round-robin: leaf ``k`` on device ``k mod D``, the others
contributing zeros to one ``psum`` that hands every device every new basis. Each device
thus runs about ``1/D`` of the SVDs, at the price of gathering the due gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Spec = Optional[tuple]  # a full-length PartitionSpec as a tuple; None off explicit meshes


def spec_of(x: Any) -> Spec:
  """``x``'s partition spec padded to ``x.ndim`` if it lives on an explicit mesh, else None."""
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  if not isinstance(sharding, NamedSharding) or AxisType.Explicit not in sharding.mesh.axis_types:
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (len(x.shape) - len(spec))


def basis_specs(spec: Spec) -> tuple[Spec, Spec]:
  """Specs of ``left`` ``(*b, m, r)`` and ``right`` ``(*b, r, n)`` for a matrix of spec ``(*b, row, col)``."""
  if spec is None:
    return None, None
  return spec[:-1] + (None,), spec[:-2] + (None, spec[-1])


def projected_spec(spec: Spec, use_left: bool, use_right: bool) -> Spec:
  """Spec of the projected matrix: each side with a basis loses its sharding."""
  if spec is None:
    return None
  return spec[:-2] + (None if use_left else spec[-2], None if use_right else spec[-1])


def zeros(shape: Sequence[int], dtype, spec: Spec, like: Any = None) -> jax.Array:
  """Zeros of ``shape`` placed by ``spec`` on the mesh of ``like`` (plain zeros when spec is None)."""
  if spec is None:
    return jnp.zeros(shape, dtype)
  sharding = like.sharding if isinstance(like, jax.ShapeDtypeStruct) else jax.typeof(like).sharding
  return jnp.zeros(shape, dtype, out_sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def reshard(x: jax.Array, spec: Spec) -> jax.Array:
  """``x`` moved to ``spec`` (no-op when spec is None or already so)."""
  if spec is None or spec_of(x) == tuple(spec):
    return x
  return jax.sharding.reshard(x, PartitionSpec(*spec))


def replicate(x: jax.Array) -> jax.Array:
  """``x`` gathered onto every device of an explicit mesh (no-op elsewhere)."""
  spec = spec_of(x)
  return x if spec is None or not any(spec) else jax.sharding.reshard(x, PartitionSpec())


def _context_axes() -> Optional[tuple[str, ...]]:
  """The axes of the mesh set with ``jax.set_mesh``, when they can host a ``shard_map``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or AxisType.Manual in mesh.axis_types:
    return None  # no mesh, one device, or already inside a shard_map
  return tuple(mesh.axis_names)


def spread(fns: Sequence[Callable[[Any], Any]], args: Sequence[Any], active: Sequence[jax.Array],
           axis_name: Any = None) -> list[Any]:
  """``[fn(arg) if active else zeros]``, computed round-robin over devices; results everywhere.

  Args:
    fns: one function per item, ``arg -> pytree of arrays`` (no collectives inside).
    args: their inputs, pytrees of arrays (passed in, never closed over: ``shard_map``
      cannot close over arrays sharded on explicit axes).
    active: boolean scalars, the same on every device; inactive items return zeros.
    axis_name: the ``pmap``/``shard_map`` axis (or tuple of axes) this code runs under, if any.
      Without it, the mesh set by ``jax.set_mesh`` is used; with neither, everything is
      computed here.
  """

  def run(i: int, on: jax.Array, arg: jax.Array):
    shapes = jax.eval_shape(fns[i], arg)
    return jax.lax.cond(on, fns[i], lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), arg)

  def owned(names, on_and_args):
    me, size = jax.lax.axis_index(names), jax.lax.psum(1, names)
    outs = [run(i, on & (me == i % size), a) for i, (on, a) in enumerate(on_and_args)]
    return jax.lax.psum(outs, names)  # owners hold the result, everyone else zeros

  items = list(zip(active, args))
  if axis_name is not None:
    return owned(axis_name, items)
  items = [(on, jax.tree.map(replicate, a)) for on, a in items]  # an SVD takes whole matrices
  names = _context_axes()
  if names is None:
    return [run(i, on, a) for i, (on, a) in enumerate(items)]
  return jax.shard_map(lambda xs: owned(names, xs), in_specs=PartitionSpec(), out_specs=PartitionSpec(),
                       axis_names=set(names), check_vma=False)(items)
