"""The tasks the CLI trains: each says what its data, model, loss, batches and
metrics are.

The loop (:mod:`train.loop`) asks the task chosen by ``cfg.task`` once and never
branches on its name, so a new task (BERT, CLIP) is a new class here and an
entry in :data:`TASKS`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import ClassVar
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import gpt2
from models import vit
from train import data as data_lib

Batch = tuple[np.ndarray, ...]


class TaskError(ValueError):
  """A task cannot be set up as configured; the message says why."""


class Task:
  """What the loop needs to know about a task. Subclasses fill in each part."""

  presets: ClassVar[dict[str, Any]]
  defaults: ClassVar[dict[str, Any]]  # steps, batch_size, data
  unit: ClassVar[str]  # what the throughput counts: "tok" or "img"

  def load_data(self, cfg) -> Any:
    raise NotImplementedError

  def build_model(self, cfg, data) -> nnx.Module:
    raise NotImplementedError

  def loss(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict]:
    """``(mean loss, aux metrics)`` of one batch."""
    raise NotImplementedError

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


class LanguageModeling(Task):
  """GPT-2 on byte-level text: next-token cross-entropy, perplexity."""

  presets = gpt2.PRESETS
  defaults = dict(steps=800, batch_size=16, data="stdlib")
  unit = "tok"

  def load_data(self, cfg):
    return data_lib.load_text(cfg.data, cfg.max_data_bytes)

  def build_model(self, cfg, data):
    mc = dataclasses.replace(cfg.model_config, vocab_size=data.vocab_size)
    if cfg.seq_len > mc.max_len:
      raise TaskError(
          f"--seq-len {cfg.seq_len} exceeds the max_len of preset"
          f" {cfg.preset!r}, {mc.max_len}"
      )
    return gpt2.GPT2(mc, rngs=nnx.Rngs(cfg.seed))

  def loss(self, model, batch):
    inputs, targets = batch
    logits = model(inputs).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return loss.mean(), {}

  def batch(self, cfg, data, step, rows):
    return data_lib.text_batch(
        data.train, step, cfg.batch_size, cfg.seq_len, cfg.seed, rows
    )

  def eval_batches(self, cfg, data):
    return data_lib.eval_text_batches(
        data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches
    )

  def eval_metrics(self, losses, aux):
    out = super().eval_metrics(losses, aux)
    out["val_ppl"] = math.exp(out["val_loss"])
    return out

  def items_per_step(self, cfg):
    return cfg.batch_size * cfg.seq_len

  def summary_extras(self, data):
    return {"unigram_entropy": data_lib.unigram_entropy(data.train)}


class ImageClassification(Task):
  """ViT on labelled images: cross-entropy, accuracy."""

  presets = vit.PRESETS
  defaults = dict(steps=400, batch_size=64, data="digits")
  unit = "img"

  def load_data(self, cfg):
    mc = cfg.model_config
    return data_lib.load_images(cfg.data, mc.image_size, mc.channels)

  def build_model(self, cfg, data):
    mc = dataclasses.replace(cfg.model_config, num_classes=data.num_classes)
    return vit.ViT(mc, rngs=nnx.Rngs(cfg.seed))

  def loss(self, model, batch):
    images, labels = batch
    logits = model(images).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), {"accuracy": (logits.argmax(-1) == labels).mean()}

  def batch(self, cfg, data, step, rows):
    return data_lib.image_batch(
        data.train_x, data.train_y, step, cfg.batch_size, cfg.seed, rows
    )

  def eval_batches(self, cfg, data):
    return data_lib.eval_image_batches(data.val_x, data.val_y, cfg.batch_size)

  def eval_metrics(self, losses, aux):
    out = super().eval_metrics(losses, aux)
    out["val_accuracy"] = float(np.mean([float(a["accuracy"]) for a in aux]))
    return out


TASKS: dict[str, Task] = {
    "gpt2": LanguageModeling(),
    "vit": ImageClassification(),
}
