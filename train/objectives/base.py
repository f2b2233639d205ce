"""What every objective shares: the :class:`Objective` interface and the
model-building helpers."""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import ClassVar
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import hf
from models.registry import MODELS
from train import init as init_lib

Batch = tuple[np.ndarray, ...]


class ObjectiveError(ValueError):
  """An objective cannot be set up as configured; the message says why."""


class Objective:
  """What the loop needs to know about what it trains: data, model, loss,
  batches and metrics. The loop (:mod:`train.loop`) asks the objective of
  ``cfg.objective`` and never branches on its name.

  A module of :mod:`train.objectives` defines ``OBJECTIVE``, an instance of a
  subclass; it trains any model of :data:`models.registry.MODELS` whose
  ``capabilities`` include its :attr:`needs`.
  """

  name: ClassVar[str]
  # the capability (models.registry.ModelSpec.capabilities) it needs
  needs: ClassVar[str]
  defaults: ClassVar[dict[str, Any]]  # steps, batch_size, data
  unit: ClassVar[str]  # what the throughput counts: "tok", "img", ...
  # TrainConfig fields only this objective reads
  flags: ClassVar[tuple[str, ...]] = ()
  text: ClassVar[bool] = True  # whether it reads text (takes --tokenizer)
  # times each optimizer's default learning rate (train.optimizers), whose
  # Adam-like ones are at 3e-3: the tuned AdamW rate over 3e-3 (BENCHMARKS.md,
  # issue 27), which the low-rank ones share under the rule
  lr_multiplier: ClassVar[float] = 1.0

  def load_data(self, cfg) -> Any:
    raise NotImplementedError

  def build_model(self, cfg, data) -> nnx.Module:
    """The model: ``embed``, ``blocks``, ``features`` (through the blocks) and
    ``output`` (to predictions), the parts the layer-wise step uses."""
    raise NotImplementedError

  def logits_loss(
      self, logits: jax.Array, batch: Batch
  ) -> tuple[jax.Array, dict]:
    """``(mean loss, aux metrics)`` of the model's predictions on ``batch``."""
    raise NotImplementedError

  def head_loss(
      self, output: Callable, features: jax.Array, batch: Batch
  ) -> tuple[jax.Array, dict]:
    """The loss of ``output(features)``, the model's last part applied to its
    blocks' output."""
    return self.logits_loss(output(features), batch)

  def loss(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict]:
    """``(mean loss, aux metrics)`` of one batch, whose inputs are batch[0]."""
    return self.head_loss(model.output, model.features(batch[0]), batch)

  def batch(self, cfg, data, step: int, rows: np.ndarray) -> Batch:
    """Rows ``rows`` of the training batch of ``step`` (a pure function of seed
    and step)."""
    raise NotImplementedError

  def eval_batches(self, cfg, data) -> Iterator[Batch]:
    raise NotImplementedError

  def eval_metrics(self, losses: list[float], aux: list[dict]) -> dict:
    return {"val_loss": float(np.mean(losses))}

  def items_per_step(self, cfg) -> int:
    return cfg.batch_size

  def summary_extras(self, data) -> dict:
    return {}


def base_model_config(cfg) -> Any:
  """The model config of ``cfg``'s preset, or of its ``--init`` checkpoint
  (read from disk, or from the network for ``hf:`` names)."""
  presets = MODELS[cfg.model].presets
  if not cfg.init:
    return presets[cfg.preset]
  checkpoint, preset = init_lib.model_origin(cfg.init, cfg.model)
  return checkpoint or presets[preset]


def model_config(cfg, **fields):
  """The model config with the run's precision, remat and layout."""
  return dataclasses.replace(
      base_model_config(cfg),
      dtype=cfg.compute_dtype,
      param_dtype=cfg.param_dtype,
      remat=cfg.remat == "block",
      stacked=cfg.stacked,
      **fields,
  )


def build(cfg, mc) -> nnx.Module:
  """The model ``cfg.model`` of config ``mc``: initialised from ``cfg.seed``,
  or with ``--init`` loaded from one of our runs or a Hugging Face checkpoint
  (what it does not hold, a new head, from ``cfg.seed``)."""
  spec = MODELS[cfg.model]
  if not cfg.init:
    return spec.model(mc, rngs=nnx.Rngs(cfg.seed))
  if init_lib.is_run(cfg.init):
    model = spec.model(mc, rngs=nnx.Rngs(cfg.seed))
    fresh = init_lib.load_run(cfg.init, model, spec.heads)
  else:
    model, loaded = hf.load(
        cfg.init, expect_model=cfg.model, seed=cfg.seed, config=mc
    )
    fresh = loaded.fresh
  if jax.process_index() == 0:
    print(
        f"loaded weights from {cfg.init}"
        + (f"; initialised afresh: {', '.join(fresh)}" if fresh else "")
    )
  return model


def check_max_len(cfg, mc) -> None:
  if cfg.seq_len > mc.max_len:
    origin = f"--init {cfg.init}" if cfg.init else f"preset {cfg.preset!r}"
    raise ObjectiveError(
        f"--seq-len {cfg.seq_len} exceeds the max_len of {origin}, {mc.max_len}"
    )


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position cross-entropy, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets
  )


def mean_of(aux: list[dict], key: str) -> float:
  return float(np.mean([float(a[key]) for a in aux]))
