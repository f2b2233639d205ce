"""Full-rank updates scaled by low-rank statistics, and the norm-growth limiter.

Fira (arXiv 2410.01623) and APOLLO (arXiv 2412.05270) both turn a full-size
matrix ``X`` (``m x n``, Fira's gradient residual or APOLLO's raw gradient) into
an update by the ratio of norms of the inner optimizer's output ``N`` and its
input ``R`` in the subspace: ``phi = ||N|| / (||R|| + 1e-8)``, taken either per
channel (along the projected axis of ``R``, so one ratio per row or column of
the unprojected side) or per tensor. Then a limiter keeps the scaled update's
norm from growing faster than ``gamma`` per step, one scalar per matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import sharding

RATIO_EPS = 1e-8  # added to the denominators, as both references do
GROWTH_LIMIT = 1.01  # Fira's gamma

SCALINGS = ("channel", "tensor")


def projected_axes(use_left: bool, use_right: bool) -> tuple[int, ...]:
  """The axes of ``R`` (``(*batch, m|r, n|r)``) that a projection shortened:
  -2 with a left basis (``R`` is r x n, one channel per column), -1 with a
  right one (m x r, one channel per row), both for 'full'."""
  return tuple(axis for axis, used in ((-2, use_left), (-1, use_right)) if used)


def _norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def norm_ratio(
    numerator: jax.Array, denominator: jax.Array, axes: tuple[int, ...]
) -> jax.Array:
  """``||numerator|| / (||denominator|| + 1e-8)`` over ``axes``, which are kept
  with size 1 so that the ratio broadcasts over ``(*batch, m, n)``. float32."""
  return _norm(numerator, axes) / (_norm(denominator, axes) + RATIO_EPS)


def norm_state(batch_shape: tuple[int, ...], spec, like) -> jax.Array:
  """The limiter's state of one leaf: a float32 zero per matrix
  (``batch_shape``), placed like the batch axes of its matrix view, whose
  partition spec is ``spec``."""
  return sharding.zeros(
      batch_shape, jnp.float32, None if spec is None else spec[:-2], like
  )


def limit_growth(
    update: jax.Array,
    previous_norm: jax.Array,
    first: jax.Array,
    gamma: float = GROWTH_LIMIT,
) -> tuple[jax.Array, jax.Array]:
  r"""Fira's norm-growth limiter, per matrix.

  With ``S = update`` (``(*batch, m, n)``) and ``s_prev = previous_norm``
  (``batch``-shaped, the norm of the last applied ``S``)::

    c = max(||S|| / (s_prev + 1e-8), gamma) / gamma
    S <- S / c

  so a norm that grows by more than ``gamma`` is brought back to ``gamma
  s_prev``. Where ``first`` is true nothing is limited (no previous step).

  Returns:
    ``(S, ||S||)``, the second to be passed back as ``previous_norm``.
  """
  norm = _norm(update, (-2, -1))[..., 0, 0]
  factor = jnp.maximum(norm / (previous_norm + RATIO_EPS), gamma) / gamma
  factor = jnp.where(first, 1.0, factor)
  limited = update / factor[..., None, None].astype(update.dtype)
  return limited, norm / factor
