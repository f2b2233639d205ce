"""Sequence (pair) classification or regression: an encoder fine-tuned on
labelled sentences, cross-entropy (squared error for one label), with the
task's metrics over its whole validation split.

Data: ``--finetune TASK``, an offline task built from ``--data``
(``stdlib:next``, ``stdlib:order``) or a GLUE task (``glue:NAME``, through
``datasets``, or saved to disk and given as ``--data DIR``); see
:mod:`train.finetune`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from train import data as data_lib
from train import finetune as finetune_lib
from train.objectives import masked_lm


class SequenceClassification(masked_lm.EncoderObjective):
  """Predicts a label (or a score) per sentence or sentence pair.

  Needs ``sequence_label``: an encoder as masked_lm's whose config's
  ``num_labels`` sets a head of that many outputs on its pooled features.
  """

  name = "sequence_classification"
  needs = "sequence_label"
  defaults = dict(
      steps=800,
      batch_size=16,
      data="stdlib",
      finetune=finetune_lib.DEFAULT_TASK,
  )
  unit = "seq"
  flags = ("finetune",)

  def load_data(self, cfg):
    if cfg.finetune.startswith("glue:"):
      local = None if cfg.data == "stdlib" else cfg.data
      examples = finetune_lib.load_glue(cfg.finetune[5:], local)
      text = b"\n".join(examples.train.first + (examples.train.second or []))
    else:
      loaded = data_lib.load_text(cfg.data, cfg.max_data_bytes)
      examples = finetune_lib.load_offline(
          cfg.finetune, loaded.train, loaded.val
      )
      text = loaded.train.tobytes()
    tok = self.tokenizer(cfg, text)
    return examples._replace(vocab=finetune_lib.vocabulary(tok))

  def build_model(self, cfg, data):
    return self.model(cfg, data.vocab, num_labels=data.num_labels)

  def logits_loss(self, logits, batch):
    labels, weights = batch[3], batch[4]
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:  # regression (STS-B)
      outputs = logits[:, 0]
      losses = (outputs - labels) ** 2
    else:
      outputs = logits.argmax(-1)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_sum = (losses * weights).sum()
    return loss_sum / jnp.maximum(weights.sum(), 1.0), {
        "outputs": outputs,
        "labels": labels,
        "weights": weights,
        "loss_sum": loss_sum,
    }

  def batch(self, cfg, data, step, rows):
    return tuple(
        x[rows]
        for x in finetune_lib.classification_batch(
            data, cfg.seed, step, cfg.batch_size, cfg.seq_len
        )
    )

  def eval_batches(self, cfg, data):
    return finetune_lib.classification_eval_batches(
        data, cfg.batch_size, cfg.seq_len
    )

  def eval_metrics(self, losses, aux):
    gather = lambda k: np.concatenate(
        [np.asarray(a[k]).reshape(-1) for a in aux]
    )
    real = gather("weights") > 0
    labels, outputs = gather("labels")[real], gather("outputs")[real]
    out = {
        "val_loss": float(sum(float(a["loss_sum"]) for a in aux) / real.sum())
    }
    if outputs.dtype.kind == "f":
      names = ("pearson", "spearman")
    elif max(labels.max(), outputs.max()) <= 1:
      names = ("accuracy", "f1", "matthews")
    else:
      names = ("accuracy",)
    for name in names:
      out[f"val_{name}"] = finetune_lib.METRICS[name](labels, outputs)
    return out

  def items_per_step(self, cfg):
    return cfg.batch_size

  def summary_extras(self, data):
    return {"finetune": data.name}


OBJECTIVE = SequenceClassification()
