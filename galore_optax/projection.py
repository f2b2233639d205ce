"""Projection math: a leaf seen as a batch of matrices, its low-rank basis, and
the two projections.

A targeted leaf of any shape is viewed as ``G`` of shape ``(*batch, m, n)``: the
axes named as rows are flattened into ``m``, the axes named as columns into
``n``, and every other axis is a batch axis with a basis of its own (for example
the layer axis of weights stacked for ``scan``).

A basis has up to two factors (computed in :mod:`galore_optax.subspace`) from
``G = U S V^T``:

- ``left = U_r``, shape ``(*batch, m, r)``;
- ``right = V_r^T``, shape ``(*batch, r, n)`` (stored transposed, as
  galore-torch does).

With only ``left``: ``R = left^T G`` (r x n) and back-projection ``left N``.
With only ``right``: ``R = G right^T`` (m x r) and back-projection ``N right``.
With both (``proj_type='full'``): ``R = left^T G right^T`` (r x r) and ``left N
right``.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Union

import jax
import jax.numpy as jnp

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

# The projections' matmul precision: full float32, as the reference computes
# them. XLA's default would use TF32 on NVIDIA GPUs and bf16 passes on TPUs;
# pass ``precision="default"`` (or "high") to scale_by_galore to allow that.
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST

Axes = Union[int, Sequence[int]]


class MatrixAxes(NamedTuple):
  """Which axes of a leaf form the rows and which the columns of its matrix.

  Axes not named are batch axes: each index along them gets its own basis.
  For a Flax attention kernel stored as ``(embed, heads, head_dim)`` use
  ``MatrixAxes(rows=0, cols=(1, 2))``; for MLP kernels stacked over layers as
  ``(layers, d_in, d_out)`` use ``MatrixAxes(rows=1, cols=2)``.
  """

  rows: Axes = 0
  cols: Axes = 1


class MatrixView(NamedTuple):
  """A static reshaping of one leaf into a batch of ``(m, n)`` matrices."""

  shape: tuple[int, ...]
  perm: tuple[int, ...]
  batch_shape: tuple[int, ...]
  m: int
  n: int

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``x`` of ``shape`` -> ``(*batch_shape, m, n)``."""
    return jnp.transpose(x, self.perm).reshape(
        self.batch_shape + (self.m, self.n)
    )

  def from_matrix(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix`."""
    permuted_shape = tuple(self.shape[a] for a in self.perm)
    inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
    return jnp.transpose(y.reshape(permuted_shape), inverse)


def _as_axes(axes: Axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for {ndim} axes")
  return tuple(a % ndim for a in axes)


def matrix_view(shape: Sequence[int], axes: MatrixAxes) -> MatrixView:
  """Builds the view of a leaf of ``shape`` as matrices with rows/cols ``axes``.

  Raises:
    ValueError: if the axes are out of range, overlap or leave rows or columns
      empty.
  """
  shape = tuple(shape)
  rows = _as_axes(axes.rows, len(shape))
  cols = _as_axes(axes.cols, len(shape))
  if not rows or not cols:
    raise ValueError(
        f"rows {axes.rows} and cols {axes.cols} must each name at least one"
        " axis"
    )
  if (
      set(rows) & set(cols)
      or len(set(rows)) < len(rows)
      or len(set(cols)) < len(cols)
  ):
    raise ValueError(
        f"rows {axes.rows} and cols {axes.cols} must be distinct axes"
    )
  batch = tuple(a for a in range(len(shape)) if a not in rows + cols)
  return MatrixView(
      shape=shape,
      perm=batch + rows + cols,
      batch_shape=tuple(shape[a] for a in batch),
      m=math.prod(shape[a] for a in rows),
      n=math.prod(shape[a] for a in cols),
  )


def basis_sides(m: int, n: int, proj_type: str) -> tuple[bool, bool]:
  """Returns ``(use_left, use_right)`` for an ``m x n`` matrix, by
  galore-torch's rules.

  'std' keeps the basis on the smaller side, so the low-rank moments lie along
  the larger one: ``m >= n`` -> right (``R`` is m x r), else left (``R`` is r x
  n). 'reverse_std' chooses the other side; 'left' and 'right' force one; 'full'
  uses both.
  """
  if proj_type == "std":
    return (False, True) if m >= n else (True, False)
  if proj_type == "reverse_std":
    return (True, False) if m >= n else (False, True)
  if proj_type == "left":
    return True, False
  if proj_type == "right":
    return False, True
  if proj_type == "full":
    return True, True
  raise ValueError(
      f"unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}"
  )


def low_rank_shape(
    view: MatrixView, rank: int, use_left: bool, use_right: bool
) -> tuple[int, ...]:
  """Shape of the projected gradient ``R`` of a leaf."""
  return view.batch_shape + (
      rank if use_left else view.m,
      rank if use_right else view.n,
  )


def _partition(spec: Optional[tuple]):
  return None if spec is None else jax.P(*spec)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def project(
    g: jax.Array,
    left: Optional[jax.Array],
    right: Optional[jax.Array],
    spec: Optional[tuple] = None,
    precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
) -> jax.Array:
  """``R = left^T G right^T``, skipping an absent factor.

  Args:
    g: ``(*batch, m, n)``.
    left: ``U_r`` ``(*batch, m, r)`` or None.
    right: ``V_r^T`` ``(*batch, r, n)`` or None.
    spec: ``G``'s partition spec on an explicit mesh (see
      :mod:`galore_optax.sharding`); a projected side loses its sharding,
      which XLA must be told when that side was sharded.
    precision: of the products (:data:`DEFAULT_PRECISION`: full float32).
  """
  if left is not None:
    spec = None if spec is None else spec[:-2] + (None, spec[-1])
    g = jnp.matmul(
        _t(left), g, precision=precision, out_sharding=_partition(spec)
    )
  if right is not None:
    spec = None if spec is None else spec[:-1] + (None,)
    g = jnp.matmul(
        g, _t(right), precision=precision, out_sharding=_partition(spec)
    )
  return g


def project_back(
    n: jax.Array,
    left: Optional[jax.Array],
    right: Optional[jax.Array],
    precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
) -> jax.Array:
  """``left N right``, skipping an absent factor: the inverse map of
  :func:`project`."""
  if left is not None:
    n = jnp.matmul(left, n, precision=precision)
  if right is not None:
    n = jnp.matmul(n, right, precision=precision)
  return n
