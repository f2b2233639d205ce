"""Ready-made GaLore optimizers, named and shaped like optax's own aliases.

Each takes ``learning_rate`` (a float or an optax schedule), its optimizer's own
hyperparameters, and the GaLore keywords of
:func:`galore_optax.scale_by_galore`: ``rank``, ``update_proj_gap``, ``scale``,
``proj_type``, ``targets``, ``matrix_axes``, ``svd``, ``moments``,
``lazy_refresh``, ``precision``, ``axis_name``, ``moment_bits``,
``projector_bits``, ``residual`` and ``group_leaves``. Weight decay is always
applied to the full weights, never in the subspace; ``mask`` (a pytree of bools
or a callable on params) selects the leaves it applies to.

With ``optax.inject_hyperparams`` list ``rank``, ``update_proj_gap`` and
``proj_type`` (and ``targets`` or ``matrix_axes`` if they are callables, and
``moment_bits`` and ``projector_bits`` if set) in ``static_args``; the learning
rate, ``scale`` and the float hyperparameters can then be changed between
steps.
"""

from __future__ import annotations

import inspect
from typing import Any
from typing import Optional

import jax
import optax

from galore_optax import apollo as apollo_lib
from galore_optax import inner as inner_lib
from galore_optax import projection
from galore_optax import quantization
from galore_optax import step_size
from galore_optax import subspace
from galore_optax import targets as targets_lib
from galore_optax.transform import scale_by_galore

Mask = Optional[Any]

# Every keyword of scale_by_galore. Each alias spells them out in its own
# signature (optax.inject_hyperparams reads signatures) and passes them on here.
GALORE_KEYWORDS = tuple(inspect.signature(scale_by_galore).parameters)[1:]


def _galore_options(namespace: dict[str, Any]) -> dict[str, Any]:
  return {
      name: namespace[name] for name in GALORE_KEYWORDS if name in namespace
  }


def _galore(
    inner: optax.GradientTransformation, namespace: dict[str, Any], **fixed
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_galore(inner, ...)`` with the GaLore keywords of an alias's
  ``locals()`` (and ``fixed`` ones it does not take)."""
  return scale_by_galore(inner, **_galore_options(namespace), **fixed)


def galore_adamw(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW, step for step galore-torch's ``GaLoreAdamW``.

  ``p <- (p - lr_t * c_t * scale * back(m / (sqrt(v) + eps))) * (1 - lr_t *
  weight_decay)`` with ``c_t = sqrt(1 - b2^t) / (1 - b1^t)``, Adam's moments
  ``m, v`` kept in the subspace (:func:`galore_optax.scale_by_reference_adam`),
  and the reference defaults (eps 1e-6, no weight decay).

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.galore_adamw(1e-3, weight_decay=0.01, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> galore = galore_optax.find_states(state, galore_optax.GaLoreState)[0]
    >>> galore.projector.right["w"].shape  # V_r^T: 64 x 32 projects its 32 side
    (8, 32)
    >>> galore.inner_state.mu["w"].shape  # Adam's moments: 64 x 8, not 64 x 32
    (64, 8)
  """
  return optax.chain(
      _galore(
          inner_lib.scale_by_reference_adam(b1=b1, b2=b2, eps=eps), locals()
      ),
      optax.scale_by_learning_rate(learning_rate),
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def fira_adamw(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Fira-AdamW, step for step Fira's ``FiraAdamW``: :func:`galore_adamw` plus
  the scaled, norm-limited gradient residual (``residual='fira'`` of
  :func:`galore_optax.scale_by_galore`).

  As in the reference, the residual is scaled by the norms of the uncorrected
  ``m / (sqrt(v) + eps)`` and Adam's bias correction ``c_t`` multiplies the
  whole update afterwards; under ``moments='reset'``, where each leaf restarts
  its own correction at a refresh, the correction stays inside the subspace
  step. The default scale 0.25 is the one of Fira's pretraining scripts.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.fira_adamw(1e-3, rank=8, scale="rms")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> fira = galore_optax.find_states(state, galore_optax.GaLoreState)[0]
    >>> fira.residual_norm["w"].shape  # one float32 per matrix: the limiter
    ()
  """
  per_leaf_count = moments == "reset"
  correction = (
      () if per_leaf_count else (inner_lib.scale_by_bias_correction(b1, b2),)
  )
  adam = inner_lib.scale_by_reference_adam(
      b1=b1, b2=b2, eps=eps, bias_correction=per_leaf_count
  )
  return optax.chain(
      _galore(adam, locals(), residual="fira"),
      *correction,
      optax.scale_by_learning_rate(learning_rate),
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def apollo_adamw(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 256,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 1.0,
    scaling_type: str = "channel",
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    seed: int = 0,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO-AdamW, step for step APOLLO's ``APOLLOAdamW`` (``proj='random'``)
  given the same projections (:func:`galore_optax.scale_by_apollo`).

  Adam's moments live in a random ``rank``-dimensional projection of each
  targeted matrix; the update is the raw gradient scaled per channel (or per
  tensor) by the norms of the uncorrected ``m / (sqrt(v) + eps)``, limited in
  growth, times ``sqrt(scale)``; then Adam's bias correction, the learning
  rate and decoupled weight decay act on the whole update, as in the
  reference. The state holds no projection, only low-rank moments and one
  scalar per matrix. Other leaves get that AdamW at full size.

  With ``optax.inject_hyperparams`` list ``rank``, ``update_proj_gap``,
  ``scaling_type``, ``proj_type`` and ``seed`` in ``static_args``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.apollo_adamw(1e-3, rank=8, scale="rms")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> apollo = galore_optax.find_states(state, galore_optax.ApolloState)[0]
    >>> apollo.inner_state.mu["w"].shape  # low-rank moments, and no basis
    (64, 8)
  """
  return optax.chain(
      apollo_lib.scale_by_apollo(
          inner_lib.scale_by_reference_adam(
              b1=b1, b2=b2, eps=eps, bias_correction=False
          ),
          rank=rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          scaling_type=scaling_type,
          proj_type=proj_type,
          targets=targets,
          matrix_axes=matrix_axes,
          seed=seed,
          precision=precision,
      ),
      inner_lib.scale_by_bias_correction(b1, b2),
      optax.scale_by_learning_rate(learning_rate),
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def apollo_mini(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 1,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 128.0,
    scaling_type: str = "tensor",
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    seed: int = 0,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO-Mini: :func:`apollo_adamw` at rank 1 with one scaling factor per
  matrix and the paper's scale 128, for about SGD's memory.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.apollo_mini(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> apollo = galore_optax.find_states(state, galore_optax.ApolloState)[0]
    >>> apollo.inner_state.mu["w"].shape  # rank 1: 64 numbers per moment
    (64, 1)
  """
  return apollo_adamw(**locals())


def galore_adam(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-Adam: :func:`galore_adamw` without weight decay.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     galore_optax.galore_adam(1e-3, rank=8, update_proj_gap=50),
    ... )
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> int(galore_optax.bases_computed(state))  # the refresh at step 0
    1
  """
  return galore_adamw(
      learning_rate, b1, b2, eps, 0.0, **_galore_options(locals())
  )


def galore_sgd(
    learning_rate: inner_lib.ScalarOrSchedule,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-SGD: the momentum buffer (``optax.trace``) lives in the subspace.

  Without ``momentum`` the subspace holds no state and the update is
  ``-lr * scale * back(project(G))``, a projected gradient step.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.galore_sgd(0.1, momentum=0.9, rank=8, scale="norm")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> # the 'norm' rule: the step has the gradient's norm (no momentum yet)
    >>> bool(jnp.isclose(optax.global_norm(updates["w"]),
    ...                  0.1 * optax.global_norm(grads["w"]), rtol=1e-4))
    True
  """
  inner = (
      optax.identity()
      if momentum is None
      else optax.trace(decay=momentum, nesterov=nesterov)
  )
  return optax.chain(
      _galore(inner, locals()),
      optax.scale_by_learning_rate(learning_rate),
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def galore_lion(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-Lion: ``optax.scale_by_lion`` (sign of interpolated momentum) in the
  subspace.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.galore_lion(1e-4, rank=8, scale="rms")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> print(f'{float(jnp.abs(updates["b"]).max()):.0e}')  # Lion's sign step
    1e-04
  """
  return optax.chain(
      _galore(optax.scale_by_lion(b1=b1, b2=b2), locals()),
      optax.scale_by_learning_rate(learning_rate),
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def _params_from_updates(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Gives ``tx`` the updates as params: for ``scale_by_factored_rms``, which
  reads only their shapes and dtypes, in a subspace where the real params do not
  fit."""
  return optax.GradientTransformation(
      tx.init, lambda u, s, params=None: tx.update(u, s, u)
  )


def galore_adafactor(
    learning_rate: inner_lib.ScalarOrSchedule,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None,
    eps: float = 1e-30,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-Adafactor: factored second moments of the low-rank gradient.

  The factored statistics, the update clipping and the optional momentum act on
  the projected gradient, and the finished update is projected back. The
  parameter-scale factor ``max(1e-3, RMS(p))`` reads the full weights, so it is
  applied after the back-projection. Defaults and order follow
  ``optax.adafactor``.

  This is not step for step galore-torch's ``GaLoreAdafactor``, which follows
  Hugging Face's Adafactor: there the second-moment decay is ``1 - t^-0.8``
  with ``t`` counted from 1 (here optax's ``decay_offset`` rule), the momentum
  averages updates already multiplied by the learning rate (here it averages
  them before), and weight decay acts on the weights before the update (here
  after it, as in every alias of this package).

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.galore_adafactor(1e-2, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (64, 32)
  """
  inner = [
      _params_from_updates(
          optax.scale_by_factored_rms(
              factored=True,
              decay_rate=decay_rate,
              step_offset=decay_offset,
              min_dim_size_to_factor=min_dim_size_to_factor,
              epsilon=eps,
          )
      )
  ]
  if clipping_threshold is not None:
    inner.append(optax.clip_by_block_rms(clipping_threshold))
  if momentum is not None:
    inner.append(optax.ema(momentum, debias=False))
  outer = [optax.scale_by_learning_rate(learning_rate)]
  if multiply_by_parameter_scale:
    outer.insert(0, optax.scale_by_param_block_rms())
  return optax.chain(
      _galore(optax.chain(*inner), locals()),
      *outer,
      inner_lib.add_decoupled_weight_decay(learning_rate, weight_decay, mask),
  )


def galore_lamb(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    *,
    rank: targets_lib.RankSpec = 128,
    update_proj_gap: int = 200,
    scale: step_size.ScaleSpec = 0.25,
    proj_type: str = "std",
    targets: targets_lib.TargetsSpec = None,
    matrix_axes: targets_lib.AxesSpec = None,
    svd: subspace.SvdSpec = "exact",
    moments: str = "keep",
    lazy_refresh: Optional[subspace.LazyRefresh] = None,
    precision: jax.lax.PrecisionLike = projection.DEFAULT_PRECISION,
    axis_name: Any = None,
    moment_bits: Optional[int] = None,
    projector_bits: Optional[int] = None,
    residual: Optional[str] = None,
    group_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-LAMB: Adam in the subspace; decay and trust ratio in the full space.

  The back-projected Adam direction ``d`` becomes ``d + weight_decay * p`` and
  is rescaled layer by layer by ``||p|| / ||d + weight_decay * p||`` (LAMB's
  trust ratio, computed on full weights, as ``optax.lamb`` does).

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}  # ||p|| > 0
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
    ...          "b": jnp.ones(32)}
    >>> tx = galore_optax.galore_lamb(1e-3, weight_decay=0.01, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (64, 32)
  """
  return optax.chain(
      _galore(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), locals()),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw_8bit(
    learning_rate: inner_lib.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Mask = None,
    *,
    block_size: int = quantization.DEFAULT_BLOCK_SIZE,
    min_size: int = quantization.DEFAULT_MIN_SIZE,
    quantize_mask: Mask = None,
) -> optax.GradientTransformation:
  """``optax.adamw`` with its moments in 8 bits, the baseline of 8-bit GaLore.

  Adam's ``mu`` and ``nu`` of every leaf with at least ``min_size`` elements
  (and, with ``quantize_mask``, where it is True) are kept block-wise
  quantized (:func:`galore_optax.quantize_state`: the signed dynamic map for
  ``mu``, the unsigned one for ``nu``, one float32 scale per ``block_size``
  elements), as bitsandbytes' ``AdamW8bit`` keeps them; everything else,
  defaults included, is ``optax.adamw``'s.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros(64)}
    >>> tx = galore_optax.adamw_8bit(1e-3)
    >>> state = tx.init(params)
    >>> mu = galore_optax.find_states(state, optax.ScaleByAdamState)[0].mu
    >>> type(mu["w"]).__name__, mu["w"].codes.dtype  # 16384 elements: 8 bits
    ('QuantizedArray', dtype('uint8'))
    >>> type(mu["b"]).__name__  # under min_size: float32
    'ArrayImpl'
  """
  return optax.chain(
      quantization.quantize_state(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
          block_size=block_size,
          min_size=min_size,
          mask=quantize_mask,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
