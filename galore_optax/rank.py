"""Layer-wise adaptive rank: per-leaf ranks from the singular-value energy of
sample gradients."""

from __future__ import annotations

import math
from typing import Any
from typing import Optional

import jax
import numpy as np

from galore_optax import targets as targets_lib


def adaptive_ranks(
    *grads: Any,
    energy: float = 0.9,
    min_rank: int = 8,
    max_rank: Optional[int] = None,
    multiple: int = 8,
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
) -> Any:
  """Per-leaf ranks for ``scale_by_galore(rank=...)`` from one or more sample
  gradients.

  For each targeted leaf (the same ``targets`` / ``matrix_axes`` rules as
  :func:`galore_optax.scale_by_galore`), the normalised cumulative energy
  ``sum(s[:k]^2) / sum(s^2)`` of each sample gradient's singular values (each
  batch matrix of a stacked leaf counted separately) is averaged, and the
  smallest ``k`` that reaches ``energy`` is rounded up to a multiple of
  ``multiple`` and clamped to ``[min_rank, max_rank]`` and to ``min(m, n)``.

  Args:
    *grads: gradient pytrees with the structure of params (one batch's, or a
      few).
    energy: the fraction of gradient energy the subspace should hold, in (0, 1].

  Returns:
    A pytree with the structure of the gradients: an int for each targeted leaf,
      None elsewhere.
  """
  if not grads:
    raise ValueError("adaptive_ranks needs at least one gradient pytree")
  if not 0 < energy <= 1:
    raise ValueError(f"energy must be in (0, 1], got {energy}")
  if (
      min_rank <= 0
      or multiple <= 0
      or (max_rank is not None and max_rank < min_rank)
  ):
    raise ValueError(
        "need 0 < min_rank <= max_rank and multiple > 0, got"
        f" min_rank={min_rank}, max_rank={max_rank}, multiple={multiple}"
    )
  structure = jax.tree.structure(grads[0])
  for i, g in enumerate(grads[1:], 1):
    if jax.tree.structure(g) != structure:
      raise ValueError(
          f"gradient sample {i} does not have the structure of sample 0"
      )
  plans = targets_lib.plan_leaves(
      grads[0],
      rank=1,
      proj_type="std",
      targets=targets,
      matrix_axes=matrix_axes,
  )
  per_sample = [jax.tree.leaves(g) for g in grads]
  ranks = []
  for i, plan in enumerate(plans):
    if plan is None:
      ranks.append(None)
      continue
    curves = []
    for leaves in per_sample:
      mats = np.asarray(plan.view.to_matrix(leaves[i]), np.float32).reshape(
          -1, plan.view.m, plan.view.n
      )
      for s in np.linalg.svd(mats, compute_uv=False):
        power = s.astype(np.float64) ** 2
        curves.append(
            np.cumsum(power) / power.sum()
            if power.sum() > 0
            else np.ones_like(power)
        )
    mean_curve = np.mean(curves, axis=0)
    k = int(np.searchsorted(mean_curve, energy - 1e-12) + 1)
    k = multiple * math.ceil(k / multiple)
    k = max(min_rank, k if max_rank is None else min(k, max_rank))
    ranks.append(min(k, plan.view.m, plan.view.n))
  return jax.tree.unflatten(structure, ranks)
