"""The steps a low-rank transform is made of, shared by
:func:`galore_optax.scale_by_galore` and :func:`galore_optax.scale_by_apollo`,
and :func:`find_states`, which finds a transform's states in any chain.

Each step works on a flattened tree: ``leaves`` (a list), ``plans`` and
``matrices`` keyed by the indices of the targeted leaves (a leaf seen as
``(*batch, m, n)`` matrices).
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax import scaling
from galore_optax import sharding
from galore_optax import targets as targets_lib

Bases = tuple[Optional[jax.Array], Optional[jax.Array]]
State = TypeVar("State")


def project(
    leaves: Sequence[jax.Array],
    plans: dict[int, targets_lib.LeafPlan],
    matrices: dict[int, jax.Array],
    bases: Callable[[int], Bases],
    precision: jax.lax.PrecisionLike,
) -> list[jax.Array]:
  """``leaves`` with each targeted one replaced by ``R = project(G, P)``.

  Args:
    bases: ``bases(i)``, leaf ``i``'s ``(left, right)`` bases (``(*batch, m,
      r)`` and ``(*batch, r, n)``; None for an unused side).

  Returns:
    The inner transform's input: ``R`` (``m x r``, ``r x n`` or ``r x r`` per
    batch index) for targeted leaves, untargeted leaves as they are.
  """
  low = list(leaves)
  for i in plans:
    low[i] = projection.project(
        matrices[i],
        *bases(i),
        spec=sharding.spec_of(matrices[i]),
        precision=precision,
    )
  return low


def inner_update(
    inner: optax.GradientTransformationExtraArgs,
    low: Sequence[jax.Array],
    inner_state: optax.OptState,
    treedef: Any,
    extra_args: dict[str, Any],
) -> tuple[list[jax.Array], optax.OptState]:
  """One step of ``inner`` on the projected and untargeted leaves alike; its
  output ``N`` as a list of leaves, and its new state."""
  updates, inner_state = inner.update(
      treedef.unflatten(list(low)), inner_state, None, **extra_args
  )
  return treedef.flatten_up_to(updates), inner_state


def rescale(
    full: jax.Array,
    out: jax.Array,
    low: jax.Array,
    axes: tuple[int, ...],
    previous_norm: jax.Array,
    first: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """A full-size matrix scaled as the inner transform scaled its projection,
  and kept from growing faster than 1.01 per step::

    S = full * ||N|| / (||R|| + 1e-8)           # norms along ``axes``
    S = S / max(1, ||S|| / (1.01 ||S_prev||))   # unless ``first``

  APOLLO's update (``full`` the gradient) and Fira's residual (``full`` the
  part of the gradient the low-rank step left out).

  Returns:
    ``(S, ||S||)``; the norm is the next step's ``previous_norm``.
  """
  ratio = scaling.norm_ratio(out, low, axes)
  return scaling.limit_growth(
      full * ratio.astype(full.dtype), previous_norm, first
  )


def fira_update(
    full: jax.Array,
    out: jax.Array,
    low: jax.Array,
    left: Optional[jax.Array],
    right: Optional[jax.Array],
    alpha: Any,
    previous_norm: jax.Array,
    first: jax.Array,
    precision: jax.lax.PrecisionLike,
) -> tuple[jax.Array, jax.Array]:
  """``alpha back(N) + S``, with ``S`` Fira's residual ``G - alpha back(R)``
  as :func:`rescale` scales and limits it, for a basis on one side that is
  orthonormal (``left^T left = I`` or ``right right^T = I``), with one
  full-size product instead of two::

    c = ||N|| / ||R|| per channel, divided by the limiter's factor
    update = c G + alpha back(N - c R)

  The limiter needs ``||c' (G - alpha back(R))||`` (``c'`` the ratio alone);
  each channel's residual norm comes from the basis's orthonormality,
  ``||g||^2 - (2 alpha - alpha^2) ||r||^2``, so the residual itself is never
  formed. ``(update, ||S||)``, the second the next ``previous_norm``.
  """
  axes = scaling.projected_axes(left is not None, right is not None)
  ratio = scaling.norm_ratio(out, low, axes)
  square = lambda x, axes: jnp.sum(
      jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True
  )
  alpha32 = jnp.asarray(alpha, jnp.float32)
  residual = jnp.maximum(
      square(full, axes) - (2 * alpha32 - alpha32**2) * square(low, axes), 0.0
  )
  norm = jnp.sqrt(jnp.sum(ratio**2 * residual, axis=(-2, -1)))
  factor = (
      jnp.maximum(
          norm / (previous_norm + scaling.RATIO_EPS), scaling.GROWTH_LIMIT
      )
      / scaling.GROWTH_LIMIT
  )
  factor = jnp.where(first, 1.0, factor)
  c = (ratio / factor[..., None, None]).astype(full.dtype)
  back = projection.project_back(
      alpha * (out - c * low), left, right, precision=precision
  )
  return c * full + back, norm / factor


def find_states(opt_state: Any, state_type: type[State]) -> list[State]:
  """The states of type ``state_type`` inside ``opt_state``, in tree order.

  Works through any chain or wrapper (``optax.chain``, ``optax.masked``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, stacked layer-wise
  states), e.g. ``find_states(opt_state, galore_optax.GaLoreState)``.
  """
  is_state = lambda x: isinstance(x, state_type)
  leaves = jax.tree.leaves(opt_state, is_leaf=is_state)
  return [x for x in leaves if is_state(x)]
