"""Image classification: cross-entropy on labelled images, with accuracy.

Data: ``--data`` (scikit-learn's bundled digits by default, an image folder,
``hf:NAME``) resized to the model's image size (:mod:`train.data`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from train import data as data_lib
from train.objectives import base


class ImageClassification(base.Objective):
  """Predicts each image's class.

  Needs ``image_label``: a model whose config has ``image_size``, ``channels``
  and ``num_classes`` and whose ``output(features(images))`` gives logits
  (batch, num_classes) of images (batch, size, size, channels).
  """

  name = "image_classification"
  needs = "image_label"
  defaults = dict(steps=400, batch_size=64, data="digits")
  unit = "img"
  text = False
  # AdamW's tuned rate: 2e-3
  lr_multiplier = 2 / 3

  def load_data(self, cfg):
    mc = base.base_model_config(cfg)
    return data_lib.load_images(cfg.data, mc.image_size, mc.channels)

  def build_model(self, cfg, data):
    mc = base.model_config(cfg, num_classes=data.num_classes)
    return base.build(cfg, mc)

  def logits_loss(self, logits, batch):
    labels = batch[1]
    logits = logits.astype(jnp.float32)
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
    out["val_accuracy"] = base.mean_of(aux, "accuracy")
    return out


OBJECTIVE = ImageClassification()
