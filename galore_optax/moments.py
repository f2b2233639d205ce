"""What happens to the inner optimizer's state when a leaf's basis is refreshed.

- ``keep`` (galore-torch): the low-rank moments are reused as they are in the
  new basis.
- ``reset``: a refreshed leaf restarts its inner optimizer: its moments are
  zeroed and its step count (Adam's bias correction, Adafactor's decay
  schedule) starts again from zero. The inner state's non-moment leaves (the
  step counts) are then kept per targeted leaf, and each targeted leaf runs
  the inner update with its own (see :func:`split_state`).
- ``transport``: the moments are re-expressed in the new basis. With ``C_l =
  L_new^T L_old`` and ``C_r = R_old R_new^T`` (identity for an unused side), a
  first moment becomes ``C_l M C_r``: the full-space moment ``L M R`` projected
  onto the new subspace, which is exact when the new basis spans the old
  subspace. A second moment is an elementwise mean of squares, so, treating the
  old coordinates as uncorrelated, a new coordinate's is the ``C^2``-weighted
  sum of the old ones, ``(C_l o C_l) V (C_r o C_r)``; the share of a new
  direction that lies outside the old subspace, ``1 - sum_j C_ij^2``, has no
  history and gets the mean of the old second moments along the projected axes,
  so that Adam neither divides by zero nor loses scale (in the manner of LDAdam
  and Flora). Under a signed permutation of the basis both rules are exact.

The moments are found in the inner state the way ``optax.tree.map_params`` finds
parameter trees: by initialising the inner transform on a placeholder and seeing
which subtrees it fills. ``transport`` knows the moments of ``scale_by_adam``
(and ``scale_by_reference_adam``), ``trace`` (SGD momentum) and
``scale_by_lion``.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import projection

MOMENT_POLICIES = ("keep", "reset", "transport")

# (state type, field) -> "first" or "second" moment.
KNOWN_MOMENTS = {
    (optax.ScaleByAdamState, "mu"): "first",
    (optax.ScaleByAdamState, "nu"): "second",
    (optax.TraceState, "trace"): "first",
    (optax.ScaleByLionState, "mu"): "first",
}


class _Slot:
  """A pytree with no leaves: ``inner.init(_Slot())`` puts one wherever it keeps
  a params tree."""


jax.tree_util.register_pytree_node(
    _Slot, lambda s: ((), None), lambda _, __: _Slot()
)


class MomentSlot(NamedTuple):
  # field names, tuple indices or dict keys from the inner state's root
  path: tuple[Any, ...]
  owner: str  # e.g. 'ScaleByAdamState.mu'
  kind: Optional[str]  # 'first', 'second', or None when unknown


def _walk(node, path, owner_type=None, field=None):
  if isinstance(node, _Slot):
    kind = KNOWN_MOMENTS.get((owner_type, field))
    yield MomentSlot(
        path, f"{getattr(owner_type, '__name__', 'state')}.{field}", kind
    )
  elif isinstance(node, tuple) and hasattr(node, "_fields"):
    for name in node._fields:
      yield from _walk(getattr(node, name), path + (name,), type(node), name)
  elif isinstance(node, (tuple, list)):
    for i, child in enumerate(node):
      yield from _walk(child, path + (i,), owner_type, field)
  elif isinstance(node, dict):
    for key, child in node.items():
      yield from _walk(child, path + (key,), owner_type, field)


def find_slots(
    inner: optax.GradientTransformation, policy: str
) -> list[MomentSlot]:
  """The params-shaped subtrees of ``inner``'s state, checked against
  ``policy``.

  Raises:
    ValueError: for an unknown policy, an inner state that cannot be searched,
      or (for ``transport``) a params-shaped entry that is not a known first or
      second moment.
  """
  if policy not in MOMENT_POLICIES:
    raise ValueError(
        f"unknown moments policy {policy!r}; expected one of {MOMENT_POLICIES}"
    )
  if policy == "keep":
    return []
  try:
    slots = list(_walk(inner.init(_Slot()), ()))
  except Exception as e:  # an init that needs real arrays
    raise ValueError(
        f"moments={policy!r} cannot find the moments in the inner state: "
        f"its init failed on a placeholder ({type(e).__name__}: {e})"
    ) from None
  unknown = [s.owner for s in slots if s.kind is None]
  if policy == "transport" and unknown:
    raise ValueError(
        "moments='transport' does not know how to transport"
        f" {', '.join(unknown)}; it supports"
        f" {sorted({f'{t.__name__}.{f}' for t, f in KNOWN_MOMENTS})}. Use"
        " moments='keep' or 'reset' with this inner transform"
    )
  return slots


def get_at(tree: Any, path: Sequence[Any]) -> Any:
  for key in path:
    tree = (
        getattr(tree, key)
        if isinstance(key, str) and hasattr(tree, "_fields")
        else tree[key]
    )
  return tree


def set_at(tree: Any, path: Sequence[Any], value: Any) -> Any:
  if not path:
    return value
  key, rest = path[0], path[1:]
  if isinstance(key, str) and hasattr(tree, "_fields"):
    return tree._replace(**{key: set_at(getattr(tree, key), rest, value)})
  if isinstance(tree, dict):
    return {**tree, key: set_at(tree[key], rest, value)}
  items = list(tree)
  items[key] = set_at(items[key], rest, value)
  return type(tree)(items)


class ScalarLayout(NamedTuple):
  """The inner state with its moment slots taken out: what ``reset`` keeps per
  leaf.

  Attributes:
    treedef: the structure of the inner state with each slot replaced by a
      leafless placeholder.
    initial: its leaves (step counts) as ``inner.init`` sets them.
  """

  treedef: Any
  initial: tuple[np.ndarray, ...]


def scalar_layout(
    inner: optax.GradientTransformation, slots: Sequence[MomentSlot]
) -> ScalarLayout:
  """The :class:`ScalarLayout` of ``inner``'s state, from a placeholder init."""
  with jax.ensure_compile_time_eval():  # concrete even inside a trace
    scalars, treedef = split_state(inner.init(_Slot()), slots)
    return ScalarLayout(treedef, tuple(np.asarray(x) for x in scalars))


def split_state(
    state: Any, slots: Sequence[MomentSlot]
) -> tuple[tuple[Any, ...], Any]:
  """``state`` -> (its non-moment leaves, the structure they fill)."""
  skeleton = state
  for slot in slots:
    skeleton = set_at(skeleton, slot.path, _Slot())
  leaves, treedef = jax.tree.flatten(skeleton)
  return tuple(leaves), treedef


def merge_state(
    treedef: Any,
    scalars: Sequence[Any],
    slots: Sequence[MomentSlot],
    moments: Sequence[Any],
) -> Any:
  """The inverse of :func:`split_state`, with ``moments`` put in the slots."""
  state = treedef.unflatten(scalars)
  for slot, value in zip(slots, moments):
    state = set_at(state, slot.path, value)
  return state


def own_update(
    inner: optax.GradientTransformationExtraArgs,
    layout: ScalarLayout,
    slots: Sequence[MomentSlot],
    update: jax.Array,
    scalars: Sequence[jax.Array],
    moments: Sequence[jax.Array],
    **extra_args: Any,
) -> tuple[jax.Array, tuple[jax.Array, ...], list[jax.Array]]:
  """One leaf's step of ``inner`` with its own state (``moments='reset'``).

  Args:
    update: the leaf's projected gradient.
    scalars: the leaf's own copies of the inner state's step counts.
    moments: the leaf's entries of the moment slots.

  Returns:
    ``(the leaf's update, its new scalars, its new moments)``.
  """
  state = merge_state(layout.treedef, scalars, slots, moments)
  update, state = inner.update(update, state, None, **extra_args)
  new_scalars, _ = split_state(state, slots)
  return update, new_scalars, [get_at(state, s.path) for s in slots]


def transport(
    moment: jax.Array,
    kind: str,
    c_left: Optional[jax.Array],
    c_right: Optional[jax.Array],
) -> jax.Array:
  """Re-expresses one low-rank moment (``(*batch, a, b)``) in the new basis.

  See the module docstring; ``c_left`` and ``c_right`` are the ``r x r``
  overlaps of the new and old bases (None for an unused side).
  """
  m = moment.astype(jnp.float32)
  full = jax.lax.Precision.HIGHEST  # refresh-time math, in full float32
  if kind == "first":
    moved = projection.project_back(m, c_left, c_right, precision=full)
    return moved.astype(moment.dtype)
  sq_left = None if c_left is None else c_left**2
  sq_right = None if c_right is None else c_right**2
  moved = projection.project_back(m, sq_left, sq_right, precision=full)
  coverage = jnp.ones_like(moved)
  axes = []
  if sq_left is not None:
    coverage = coverage * jnp.sum(sq_left, axis=-1, keepdims=True)
    axes.append(-2)
  if sq_right is not None:
    coverage = coverage * jnp.sum(sq_right, axis=-2, keepdims=True)
    axes.append(-1)
  mean = jnp.mean(m, axis=tuple(axes), keepdims=True)
  return (moved + jnp.clip(1 - coverage, 0, 1) * mean).astype(moment.dtype)
