"""The training CLI's optimizers: one :class:`OptimizerSpec` each, in one
registry (:data:`OPTIMIZERS`), and the keywords each family reads from a run's
config. ``train.loop.build_optimizer`` builds the chain from a spec."""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import Mapping

import jax
import optax

import galore_optax
from models import GALORE_TARGETS

# The config fields (flags) each family reads, besides the learning rate, the
# weight decay and the seed. A flag outside an optimizer's family is refused
# (train.config) and left out of its config.
FAMILY_FLAGS = {
    "full": (),
    "contrib": ("rank", "update_proj_gap", "scale"),
    "apollo": ("rank", "update_proj_gap", "scale", "proj_type", "scaling_type"),
    "galore": (
        "rank",
        "update_proj_gap",
        "scale",
        "proj_type",
        "svd",
        "moments",
        "lazy_threshold",
        "lazy_patience",
        "moment_bits",
        "projector_bits",
    ),
    "8bit": ("quantize_embeddings",),
}
OPTIMIZER_FLAGS = tuple(
    dict.fromkeys(flag for flags in FAMILY_FLAGS.values() for flag in flags)
)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One optimizer of the CLI.

  Attributes:
    factory: ``factory(learning_rate, **keywords)``, an
      ``optax.GradientTransformation``.
    lr: its default peak learning rate (an objective scales it:
      ``Objective.lr_multiplier``). Under the step-size rule (the default
      ``--scale``) a low-rank optimizer's update has its full-rank
      counterpart's size, so its rate is that counterpart's.
    family: the keywords it takes from the config (:data:`FAMILY_FLAGS`):
      ``'full'`` none, ``'galore'`` galore_optax's GaLore keywords,
      ``'apollo'`` APOLLO's, ``'contrib'`` optax.contrib.galore's, ``'8bit'``
      8-bit AdamW's.
    defaults: its own defaults for flags of its family where they differ from
      the CLI's (rank d_model // 4, ``--scale rms``).
    scale_rules: the rules it takes for ``--scale`` besides a number.
    weight_decay: whether it takes a ``weight_decay`` keyword.
    elementwise: whether it updates a leaf element by element, so that
      stacking leaves changes nothing it computes.
  """

  factory: Callable[..., optax.GradientTransformation]
  lr: float
  family: str = "full"
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  scale_rules: tuple[str, ...] = ()
  weight_decay: bool = True
  elementwise: bool = False

  @property
  def flags(self) -> tuple[str, ...]:
    return FAMILY_FLAGS[self.family]

  @property
  def unused_flags(self) -> tuple[str, ...]:
    return tuple(f for f in OPTIMIZER_FLAGS if f not in self.flags)

  @property
  def per_matrix(self) -> bool:
    """Whether it keeps a subspace per targeted matrix (a rank per matrix,
    and the step-size rule's factor per matrix shape)."""
    return self.family in ("galore", "apollo")

  def keywords(self, cfg, axis_name: Any = None) -> dict[str, Any]:
    """The factory's keywords of its family, from ``cfg`` (a TrainConfig);
    ``axis_name``: the pmap axis GaLore spreads its refreshes over."""
    if self.family == "full":
      return {}
    if self.family == "8bit":
      return (
          {} if cfg.quantize_embeddings else dict(quantize_mask=not_embeddings)
      )
    subspace = dict(
        rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale
    )
    if self.family == "contrib":  # the baseline, on the same matrices
      return dict(subspace, weight_dimension_numbers=contrib_dimension_numbers)
    subspace.update(proj_type=cfg.proj_type, targets=galore_targets())
    if self.family == "apollo":
      return dict(subspace, scaling_type=cfg.scaling_type, seed=cfg.seed)
    lazy = (
        None
        if cfg.lazy_threshold is None
        else galore_optax.LazyRefresh(cfg.lazy_threshold, cfg.lazy_patience)
    )
    return dict(
        subspace,
        svd=cfg.svd,
        moments=cfg.moments,
        lazy_refresh=lazy,
        axis_name=axis_name,
        moment_bits=cfg.moment_bits,
        projector_bits=cfg.projector_bits,
    )


def not_embeddings(params: Any) -> Any:
  """True but for the embedding tables (``.../embedding``, every
  ``nnx.Embed``): the leaves whose moments 8-bit AdamW quantizes by default,
  keeping the embeddings' in float32 as bitsandbytes' ``StableEmbedding``
  does."""
  return galore_optax.match_paths(".", exclude=r"(^|/)embedding$")(params)


def galore_targets() -> Callable[[Any], Any]:
  """The matrices every low-rank optimizer of the CLI projects: the attention
  and MLP kernels (:data:`models.GALORE_TARGETS`)."""
  return galore_optax.match_paths(GALORE_TARGETS)


def contrib_dimension_numbers(params: Any) -> Any:
  """optax.contrib.galore's ``weight_dimension_numbers`` for the matrices
  :func:`galore_targets` picks."""
  return jax.tree.map(
      lambda t: optax.contrib.GaLoreDimensionNumbers() if t else None,
      galore_targets()(params),
  )


def _with_momentum(sgd: Callable[..., Any]) -> Callable[..., Any]:
  return lambda lr, **kw: sgd(lr, momentum=0.9, **kw)


_RULES = galore_optax.step_size.SCALE_RULES
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "galore_adamw": OptimizerSpec(
        galore_optax.galore_adamw, 3e-3, "galore", scale_rules=_RULES
    ),
    # Fira's inner optimizer is Adam: the 'norm' rule is for linear ones
    "fira_adamw": OptimizerSpec(
        galore_optax.fira_adamw, 3e-3, "galore", scale_rules=("rms",)
    ),
    # the APOLLO papers' own defaults
    "apollo_adamw": OptimizerSpec(
        galore_optax.apollo_adamw,
        3e-3,
        "apollo",
        dict(scaling_type="channel"),
        scale_rules=("rms",),
    ),
    "apollo_mini": OptimizerSpec(
        galore_optax.apollo_mini,
        3e-3,
        "apollo",
        dict(rank=1, scaling_type="tensor"),
        scale_rules=("rms",),
    ),
    "galore_adam": OptimizerSpec(
        galore_optax.galore_adam,
        3e-3,
        "galore",
        scale_rules=_RULES,
        weight_decay=False,
    ),
    # SGD's update is linear in the gradient: the 'norm' rule
    "galore_sgd": OptimizerSpec(
        _with_momentum(galore_optax.galore_sgd),
        0.1,
        "galore",
        dict(scale="norm"),
        scale_rules=_RULES,
    ),
    "galore_adafactor": OptimizerSpec(
        galore_optax.galore_adafactor, 1e-2, "galore", scale_rules=_RULES
    ),
    "galore_lion": OptimizerSpec(
        galore_optax.galore_lion, 3e-4, "galore", scale_rules=_RULES
    ),
    "galore_lamb": OptimizerSpec(
        galore_optax.galore_lamb, 3e-3, "galore", scale_rules=_RULES
    ),
    # one number for every matrix, so no per-matrix rule: the paper's 0.25
    "contrib_galore": OptimizerSpec(
        optax.contrib.galore, 1e-2, "contrib", dict(scale=0.25)
    ),
    "adamw": OptimizerSpec(optax.adamw, 3e-3, elementwise=True),
    "adamw8bit": OptimizerSpec(galore_optax.adamw_8bit, 3e-3, "8bit"),
    "adam": OptimizerSpec(
        optax.adam, 3e-3, weight_decay=False, elementwise=True
    ),
    "sgd": OptimizerSpec(_with_momentum(optax.sgd), 0.1, elementwise=True),
    "adafactor": OptimizerSpec(optax.adafactor, 1e-2, weight_decay=False),
    "lion": OptimizerSpec(optax.lion, 3e-4, elementwise=True),
    "lamb": OptimizerSpec(optax.lamb, 3e-3),
}


def register(name: str, spec: OptimizerSpec) -> None:
  """Offers ``spec`` as ``--optimizer name``; a name already taken is
  refused."""
  if name in OPTIMIZERS:
    raise ValueError(f"--optimizer {name} is taken: choose another name")
  OPTIMIZERS[name] = spec
