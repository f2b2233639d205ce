"""Contrastive image-text learning (CLIP): symmetric InfoNCE on
image-caption pairs, with recall@1/5 both ways and zero-shot accuracy on
held-out pairs.

Data: ``--data`` (captioned digits by default, a folder of images with
captions, ``hf:NAME``; :mod:`train.image_text`), captions as the tokens of
``--tokenizer``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from models import transformer
from train import image_text
from train import tokenizer as tokenizer_lib
from train.objectives import base


class CaptionData(NamedTuple):
  source: image_text.ImageText
  train_tokens: np.ndarray  # (train captions, max_len) int32
  # the validation captions, then prompts that are not among them
  val_tokens: np.ndarray
  text_classes: np.ndarray  # (val texts,) the class a prompt names, else -1
  # (rows, 3) int: image (-1: none), text, weight (1: a held-out pair; 0: a
  # prompt evaluated for zero-shot classification only)
  eval_rows: np.ndarray
  vocab_size: int
  eot: int
  tokenizer: str

  @property
  def description(self) -> str:
    return self.source.description


def _eval_rows(val: image_text.Pairs, n_texts: int) -> np.ndarray:
  """Every held-out pair, each image's first captions first (so that a batch
  holds many images), then a row for each text no pair holds."""
  first = np.r_[True, val.pairs[1:, 0] != val.pairs[:-1, 0]]
  rank = np.arange(len(val.pairs)) - np.maximum.accumulate(
      np.where(first, np.arange(len(val.pairs)), 0)
  )
  pairs = val.pairs[np.lexsort((val.pairs[:, 0], rank))]
  rows = [np.c_[pairs, np.ones(len(pairs), np.int64)]]
  extra = np.setdiff1d(np.arange(n_texts), pairs[:, 1])
  rows.append(np.c_[np.full(len(extra), -1), extra, np.zeros(len(extra))])
  return np.concatenate(rows).astype(np.int64)


class Contrastive(base.Objective):
  """Pulls each image's embedding towards its captions' and away from the
  batch's other captions, and the captions' likewise.

  Needs ``image_text``: a model whose config has ``image_size``,
  ``channels``, ``vocab_size``, ``max_len`` and ``eot_token`` and which offers
  ``embed_images`` (batch, size, size, channels) -> (batch, dim),
  ``embed_texts`` (batch, max_len) -> (batch, dim) and ``similarity`` of the
  two -> (images, texts) logits.
  """

  name = "contrastive"
  needs = "image_text"
  defaults = dict(steps=400, batch_size=64, data="digits")
  unit = "pair"
  flags = ("contrastive_batches",)
  # AdamW's tuned rate, 5e-4 (at 1e-3 it reached 80% zero-shot accuracy, at
  # 3e-3 21%; galore_adamw at the paper's 1e-2 collapsed to chance)
  lr_multiplier = 1 / 6

  def load_data(self, cfg):
    mc = base.base_model_config(cfg)
    source = image_text.load(cfg.data, mc.image_size, mc.channels)
    text = "\n".join(source.train.captions).encode()
    tok = tokenizer_lib.load(cfg.tokenizer, text, cfg.out)
    prompts = [p for group in source.prompts or () for p in group]
    val_texts = list(source.val.captions)
    val_texts += [p for p in dict.fromkeys(prompts) if p not in val_texts]
    classes = np.full(len(val_texts), -1)
    for c, group in enumerate(source.prompts or ()):
      for p in group:
        classes[val_texts.index(p)] = c
    train_tokens, eot = tokenizer_lib.caption_tokens(
        tok, source.train.captions, mc.max_len
    )
    val_tokens, _ = tokenizer_lib.caption_tokens(tok, val_texts, mc.max_len)
    return CaptionData(
        source,
        train_tokens,
        val_tokens,
        classes,
        _eval_rows(source.val, len(val_texts)),
        max(tok.vocab_size, eot + 1),
        eot,
        tok.identity,
    )

  def build_model(self, cfg, data):
    if cfg.init:
      mc = base.model_config(cfg)
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer, data.vocab_size, mc.vocab_size, cfg.init
      )
      if mc.eot_token not in (None, data.eot):
        raise base.ObjectiveError(
            f"--init {cfg.init} pools text at token {mc.eot_token}; --tokenizer"
            f" {cfg.tokenizer} ends captions with {data.eot}"
        )
    else:
      mc = base.model_config(
          cfg, vocab_size=data.vocab_size, eot_token=data.eot
      )
    return base.build(cfg, mc)

  def loss(self, model, batch):
    images, tokens = batch[:2]
    weights = transformer.replicated(batch[2]) if len(batch) > 2 else None
    image_embeddings = model.embed_images(images)
    text_embeddings = model.embed_texts(tokens)
    logits = model.similarity(image_embeddings, text_embeddings)
    aux = {}
    if weights is not None:  # evaluation: the embeddings and what they are
      aux = dict(
          images=image_embeddings,
          texts=text_embeddings,
          rows=batch[3],
      )
    return image_text.contrastive_loss(logits, weights), aux

  def batch(self, cfg, data, step, rows):
    train = data.source.train
    rng = np.random.default_rng([cfg.seed, step])
    if cfg.contrastive_batches == "distinct":
      pick = image_text.distinct_pairs(train.pairs, cfg.batch_size, rng)
    else:
      pick = rng.integers(0, len(train.pairs), cfg.batch_size)
    image, text = train.pairs[pick[rows]].T
    return train.images[image], data.train_tokens[text]

  def eval_batches(self, cfg, data):
    val, b = data.source.val, cfg.batch_size
    rows = data.eval_rows
    for start in range(0, len(rows), b):
      chunk = rows[np.arange(start, start + b) % len(rows)]
      weights = chunk[:, 2].astype(np.float32)
      weights[len(rows) - start :] = 0  # the last batch's fill-up
      image = np.maximum(chunk[:, 0], 0)
      labels = (
          np.full(b, -1)
          if val.labels is None
          else np.where(chunk[:, 0] >= 0, val.labels[image], -1)
      )
      # (batch, 5): image, text, weight, the image's class, the prompt's class
      described = np.c_[chunk, labels, data.text_classes[chunk[:, 1]]]
      yield val.images[image], data.val_tokens[chunk[:, 1]], weights, described

  def eval_metrics(self, losses, aux):
    out = super().eval_metrics(losses, aux)
    gather = lambda k: np.concatenate([np.asarray(a[k]) for a in aux])
    rows, images, texts = gather("rows"), gather("images"), gather("texts")
    image_ids, text_ids, _, labels, classes = rows.T
    image_of, text_of = {}, {}
    for i, (image, text) in enumerate(zip(image_ids, text_ids)):
      if image >= 0:
        image_of.setdefault(image, i)
      text_of.setdefault(text, i)
    image_keys, text_keys = sorted(image_of), sorted(text_of)
    image_emb = images[[image_of[k] for k in image_keys]]
    text_emb = texts[[text_of[k] for k in text_keys]]
    image_index = {k: i for i, k in enumerate(image_keys)}
    text_index = {k: i for i, k in enumerate(text_keys)}
    positive = np.zeros((len(image_keys), len(text_keys)), bool)
    for image, text, weight, _, _ in rows:
      if weight > 0:
        positive[image_index[image], text_index[text]] = True
    similarity = image_emb @ text_emb.T
    for k in (1, 5):
      out[f"val_image_to_text_r{k}"] = image_text.recall_at(
          similarity, positive, k
      )
      out[f"val_text_to_image_r{k}"] = image_text.recall_at(
          similarity.T, positive.T, k
      )
    image_labels = labels[[image_of[k] for k in image_keys]]
    prompt_classes = classes[[text_of[k] for k in text_keys]]
    if (image_labels >= 0).all() and (prompt_classes >= 0).any():
      prompts = prompt_classes >= 0
      out["val_zero_shot_accuracy"] = image_text.zero_shot_accuracy(
          image_emb, image_labels, text_emb[prompts], prompt_classes[prompts]
      )
    return out

  def items_per_step(self, cfg):
    return cfg.batch_size

  def summary_extras(self, data):
    return {"tokenizer": data.tokenizer}


OBJECTIVE = Contrastive()
