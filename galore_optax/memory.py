"""Memory accounting: bytes of params and of optimizer state, leaf by leaf,
against AdamW.

For a targeted ``m x n`` matrix at rank ``r`` under 'std' GaLore-Adam holds
``min(m, n) r`` (the basis) ``+ 2 max(m, n) r`` (the two moments) elements,
where AdamW holds ``2 m n``. Nothing here allocates: states are shaped with
``jax.eval_shape``.
"""

from __future__ import annotations

import collections
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import numpy as np
import optax

from galore_optax import quantization
from galore_optax import targets as targets_lib


class LeafMemory(NamedTuple):
  path: str
  shape: tuple[int, ...]
  param_bytes: int
  state_bytes: int
  adamw_bytes: int


class MemoryReport(NamedTuple):
  """Per-leaf bytes, plus state not tied to a leaf (step counts, schedules)."""

  leaves: list[LeafMemory]
  other_state_bytes: int
  adamw_other_bytes: int

  @property
  def param_bytes(self) -> int:
    return sum(leaf.param_bytes for leaf in self.leaves)

  @property
  def state_bytes(self) -> int:
    return (
        sum(leaf.state_bytes for leaf in self.leaves) + self.other_state_bytes
    )

  @property
  def adamw_bytes(self) -> int:
    return (
        sum(leaf.adamw_bytes for leaf in self.leaves) + self.adamw_other_bytes
    )

  @property
  def state_ratio(self) -> float:
    """Optimizer-state bytes as a fraction of AdamW's."""
    return self.state_bytes / max(self.adamw_bytes, 1)

  def table(self, max_rows: Optional[int] = None) -> str:
    """A plain-text table, largest leaves first, with a total line."""
    rows = sorted(self.leaves, key=lambda leaf: -leaf.param_bytes)
    shown = rows if max_rows is None else rows[:max_rows]
    lines = [
        f"{'leaf':<40} {'shape':>16} {'params':>10} {'state':>10} {'adamw':>10}"
    ]
    for leaf in shown:
      lines.append(
          f"{leaf.path[-40:]:<40} {str(leaf.shape):>16}"
          f" {human_bytes(leaf.param_bytes):>10}"
          f" {human_bytes(leaf.state_bytes):>10}"
          f" {human_bytes(leaf.adamw_bytes):>10}"
      )
    if len(shown) < len(rows):
      lines.append(f"... {len(rows) - len(shown)} more leaves")
    lines.append(
        f"{'total':<40} {'':>16} {human_bytes(self.param_bytes):>10}"
        f" {human_bytes(self.state_bytes):>10}"
        f" {human_bytes(self.adamw_bytes):>10}"
    )
    lines.append(f"optimizer state: {self.state_ratio:.1%} of AdamW's")
    return "\n".join(lines)


def human_bytes(n: int) -> str:
  """1536 -> '1.50K' (binary units)."""
  for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
    if n >= size:
      return f"{n / size:.2f}{unit}"
  return f"{n}B"


def _nbytes(x: Any) -> int:
  if quantization.is_quantized(x):  # its codes and scales
    return x.nbytes
  return (
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      if hasattr(x, "dtype")
      else 0
  )


def _state_bytes_by_leaf(
    optimizer: optax.GradientTransformation, params: Any
) -> tuple[dict[str, int], int]:
  """Bytes of ``optimizer``'s state attributed to the params leaf each state
  leaf belongs to."""
  state = jax.eval_shape(optimizer.init, params)
  paths = jax.tree_util.tree_map_with_path(
      lambda p, _: targets_lib.path_str(p), params
  )
  per_leaf: dict[str, int] = collections.defaultdict(int)
  other = [0]

  def attribute(state_leaf, path):
    per_leaf[path] += _nbytes(state_leaf)
    return state_leaf

  def non_param(subtree):
    other[0] += sum(_nbytes(x) for x in jax.tree.leaves(subtree))
    return subtree

  try:
    optax.tree.map_params(
        optimizer,
        attribute,
        state,
        paths,
        transform_non_params=non_param,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        or quantization.is_quantized(x),
    )
  except (ValueError, TypeError):
    # a transform whose init cannot take map_params' placeholder
    per_leaf.clear()
    other[0] = sum(_nbytes(x) for x in jax.tree.leaves(state))
  return per_leaf, other[0]


def memory_report(
    params: Any,
    optimizer: optax.GradientTransformation,
    baseline: Optional[optax.GradientTransformation] = None,
) -> MemoryReport:
  """Bytes of ``params`` and of ``optimizer``'s state, beside ``baseline``'s
  (AdamW).

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (nothing is
      allocated).
    optimizer: any optax transform, e.g. :func:`galore_optax.galore_adamw`.
    baseline: what to compare against; default ``optax.adamw(1e-3)``.

  Example:
    >>> import jax, jax.numpy as jnp, galore_optax
    >>> params = {"w": jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
    >>> report = galore_optax.memory_report(
    ...     params, galore_optax.galore_adamw(1e-3, rank=128))
    >>> # (768 + 2 * 3072) * 128 / (2 * 768 * 3072)
    >>> print(f"{report.state_ratio:.3f}")
    0.188
  """
  baseline = optax.adamw(1e-3) if baseline is None else baseline
  state, state_other = _state_bytes_by_leaf(optimizer, params)
  base, base_other = _state_bytes_by_leaf(baseline, params)
  leaves = []
  for path, leaf in zip(
      targets_lib.leaf_paths(params), jax.tree.leaves(params)
  ):
    leaves.append(
        LeafMemory(
            path,
            tuple(leaf.shape),
            _nbytes(leaf),
            state.get(path, 0),
            base.get(path, 0),
        )
    )
  return MemoryReport(leaves, state_other, base_other)
