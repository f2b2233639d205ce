"""The step-size rule: one learning rate for targeted and untargeted leaves.

A targeted matrix ``G`` (``m x n``) gets ``scale * back(N)``, where ``N`` is the
inner optimizer's output on the projected gradient ``R``. Every other leaf gets
the inner optimizer at full size and is not scaled. A learning rate tuned for
full-rank training therefore moves the two kinds of leaf by different amounts
unless ``scale`` restores the full update's size.

With an orthonormal basis, ``||back(N)|| = ||N||``. The rules, per matrix:

- ``'rms'``, for inner optimizers whose output entries have a size that does
  not depend on how many there are (Adam, AdamW, Adafactor, Lion; LAMB's
  direction before its trust ratio). ``N`` then has the RMS ``rho`` of a
  full-rank update but ``r`` entries along the projected side instead of ``k``
  (``k = m`` with a left basis, ``n`` with a right one), so
  ``RMS(back(N)) = rho sqrt(r / k)`` and the rule is::

    scale = sqrt(k / r)            # 'std', 'reverse_std', 'left', 'right'
    scale = sqrt(m n) / r          # 'full': r x r entries of m x n

  It depends only on shapes and the leaf's own rank (after clamping to
  ``min(m, n)``, so a full-rank leaf gets 1), and so holds for per-leaf and
  adaptive ranks alike.
- ``'norm'``, for linear inner optimizers (SGD, momentum). Their full-rank
  output is the gradient itself, of norm ``||G||``, and the back-projected one
  has ``||R||``, the part of ``||G||`` inside the subspace: anywhere between
  ``sqrt(r / k)`` of it (a gradient spread over every direction) and all of it
  (a gradient of rank at most ``r``), so no rule by shape holds. The rule is
  the ratio itself, taken each step, one number per matrix::

    scale = ||G|| / (||R|| + 1e-8)

A rule multiplies the whole update of a matrix. Under Fira's residual the
update is ``back(N) + S``, with ``S`` the true residual ``G - back(R)`` scaled
per channel by ``||N|| / ||R||`` and limited in growth; its column norms are
``rho sqrt(r) ||G_col|| / ||R_col||``, a full-rank update's when the gradient is
spread over every direction and ``sqrt(r / k)`` of it when the gradient lies in
the subspace, as real gradients nearly do (benchmarks/step_size.py measures
0.51 to 0.56 on GPT-2's, Fira at scale 1). So Fira takes the same ``'rms'``
factor, on ``back(N) + S``; only a number ``scale`` also weighs the subtracted
projection, as Fira's reference does.

APOLLO scales the raw gradient by ``||N|| / ||R||`` with a Gaussian ``R`` of
about ``G``'s norm, so its update has ``sqrt(r / k)`` of a full update's RMS,
per channel and per tensor alike; it multiplies by ``sqrt(scale)``, so its rule
is ``scale = k / r`` (128 for APOLLO-Mini on a 128-wide matrix, the paper's
value).
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import jax
import numpy as np

from galore_optax import scaling
from galore_optax import targets as targets_lib

SCALE_RULES = ("rms", "norm")

# A number (the reference's alpha) or the name of a rule.
ScaleSpec = Union[float, str]


def check_scale(scale: ScaleSpec, rules: tuple[str, ...] = SCALE_RULES):
  """Raises ValueError for a ``scale`` that is neither a finite number >= 0
  (or a traced one, injected) nor one of ``rules``."""
  if isinstance(scale, str):
    if scale not in rules:
      raise ValueError(
          f"unknown scale rule {scale!r}; expected a number or one of {rules}"
      )
    return
  if isinstance(scale, bool) or not isinstance(
      scale, (numbers.Real, jax.Array, np.ndarray)
  ):
    raise TypeError(
        f"scale must be a number or one of {rules}, got {type(scale).__name__}"
    )
  if isinstance(scale, jax.core.Tracer):  # injected: checked by its owner
    return
  if not (math.isfinite(float(scale)) and float(scale) >= 0):
    raise ValueError(f"scale must be a finite number >= 0, got {scale}")


def shortened_sides(plan: targets_lib.LeafPlan) -> tuple[int, ...]:
  """The lengths of the sides a projection shortens to ``plan.rank``: ``(m,)``
  with a left basis, ``(n,)`` with a right one, ``(m, n)`` for 'full'."""
  v = plan.view
  return tuple(
      side
      for side, used in ((v.m, plan.use_left), (v.n, plan.use_right))
      if used
  )


def rms_factor(plan: targets_lib.LeafPlan) -> float:
  """``sqrt(prod(k) / r^len(k))`` over the shortened sides ``k``: the factor by
  which ``back(N)`` falls short of a full-rank update's RMS when ``N``'s entries
  have a full-rank update's size."""
  sides = shortened_sides(plan)
  return math.sqrt(math.prod(sides)) / plan.rank ** (len(sides) / 2)


def galore_factors(
    scale: ScaleSpec,
    plan: targets_lib.LeafPlan,
    gradient: jax.Array,
    projected: jax.Array,
) -> tuple[float | jax.Array, float | jax.Array]:
  """``(alpha, factor)`` of one leaf: GaLore's update is ``factor * alpha *
  back(N)`` (Fira's ``factor * (alpha * back(N) + S)``, ``S`` from ``G - alpha *
  back(R)``). A number is the reference's alpha, with factor 1; a rule has
  alpha 1 and its factor: ``'rms'``'s :func:`rms_factor`, ``'norm'``'s
  :func:`norm_factor` of the gradient ``G`` and its projection ``R``."""
  if not isinstance(scale, str):
    return scale, 1.0
  if scale == "rms":
    return 1.0, rms_factor(plan)
  return 1.0, norm_factor(gradient, projected)


def norm_factor(gradient: jax.Array, projected: jax.Array) -> jax.Array:
  """``||G|| / (||R|| + 1e-8)`` per matrix of ``(*batch, m, n)``, with size-1
  matrix axes to broadcast; float32."""
  return scaling.norm_ratio(gradient, projected, (-2, -1))


def apollo_factor(scale: ScaleSpec, plan: targets_lib.LeafPlan) -> float:
  """APOLLO's ``scale`` on one leaf: the number, or ``k / r`` for ``'rms'``
  (its update is multiplied by the square root)."""
  return rms_factor(plan) ** 2 if isinstance(scale, str) else scale


def describe(plans, scale: ScaleSpec, *, apollo: bool = False) -> str:
  """``'128x512: 2, 128x128: 2'``: the factor of each distinct matrix shape
  (and rank) among ``plans`` (None entries skipped), for banners and summaries.
  ``'norm'`` is described as such, being taken per step."""
  if scale == "norm":
    return "||G|| / ||R|| per matrix, each step"
  seen: dict[str, str] = {}
  for p in filter(None, plans):
    factor = (
        apollo_factor(scale, p)
        if apollo
        else scale
        if not isinstance(scale, str)
        else rms_factor(p)
    )
    seen.setdefault(f"{p.view.m}x{p.view.n} r{p.rank}", f"{factor:.4g}")
  return ", ".join(f"{k}: {v}" for k, v in seen.items())
