"""Building blocks of the aliases that reproduce galore-torch's AdamW
exactly."""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _bias_correction(b1, b2, count: jax.Array) -> jax.Array:
  """``sqrt(1 - b2^t) / (1 - b1^t)`` at step ``t = count``."""
  t = count.astype(jnp.float32)
  return jnp.sqrt(1 - b2**t) / (1 - b1**t)


def scale_by_reference_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
  r"""Adam as galore-torch (and HF's old AdamW) computes it.

  ``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2`` and the update is
  ``sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)``: the bias correction
  is folded into the step size, so ``eps`` is added to the uncorrected
  ``sqrt(v_t)``. This differs from ``optax.scale_by_adam`` by an effective
  ``eps`` of ``eps * sqrt(1 - b2^t)``. The state is an
  ``optax.ScaleByAdamState`` (count, mu, nu).

  With ``bias_correction=False`` the factor is left out, for
  :func:`scale_by_bias_correction` to apply after a transform that must see
  the uncorrected ``m_t / (sqrt(v_t) + eps)``, as Fira's and APOLLO's
  references do.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_int32_increment(state.count)
    step_scale = _bias_correction(b1, b2, count) if bias_correction else 1.0
    updates = jax.tree.map(
        lambda m, v: (step_scale * m / (jnp.sqrt(v) + eps)).astype(m.dtype),
        mu,
        nu,
    )
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_bias_correction(
    b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
  """Multiplies the updates of step ``t`` (from 1) by Adam's ``sqrt(1 - b2^t) /
  (1 - b1^t)``: the factor ``scale_by_reference_adam(bias_correction=False)``
  leaves out. The state is an ``optax.ScaleByScheduleState`` (count)."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    factor = _bias_correction(b1, b2, count)
    updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


class DecoupledWeightDecayState(NamedTuple):
  count: jax.Array  # steps taken, to evaluate a learning-rate schedule


def add_decoupled_weight_decay(
    learning_rate: ScalarOrSchedule,
    weight_decay: float,
    mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay on the full weights, after the step, as
  galore-torch does.

  Placed after the learning-rate scaling, it turns an update ``u`` into ``u -
  lr_t * weight_decay * (p + u)``, so that ``p + u' = (p + u)(1 - lr_t
  weight_decay)``: the already-updated weight is decayed. It never passes
  through the low-rank subspace.
  """
  # The state exists whatever the value: optax.inject_hyperparams turns
  # weight_decay into an array, and its state must have the same structure.
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

  def init_fn(params):
    del params
    return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = optax.safe_int32_increment(state.count)
    if no_decay:
      return updates, DecoupledWeightDecayState(count=count)
    if params is None:
      raise ValueError(
          "weight decay needs params: pass them to update(updates, state,"
          " params)"
      )
    lr = (
        learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    updates = jax.tree.map(
        lambda u, p: None
        if u is None
        else (u - lr * weight_decay * (p + u)).astype(u.dtype),
        updates,
        params,
        is_leaf=lambda x: x is None,
    )
    return updates, DecoupledWeightDecayState(count=count)

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
