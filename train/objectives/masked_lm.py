"""Masked language modelling: BERT's pretraining on text (15% of the tokens
corrupted, cross-entropy at the corrupted positions), with masked accuracy.

Data: ``--data`` as the tokens of ``--tokenizer`` (a ``bpe:N`` learns the
encoder's special tokens too); windows and corruption from
:mod:`train.finetune`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import finetune as finetune_lib
from train import tokenizer as tokenizer_lib
from train.objectives import base


class MaskedText(NamedTuple):
  text: data_lib.TextData  # token ids
  vocab: finetune_lib.Vocabulary

  @property
  def description(self) -> str:
    return self.text.description


class EncoderObjective(base.Objective):
  """What the encoder's objectives share: BERT's inputs (token ids, segment
  ids, padding mask) and its special tokens."""

  # Post-LayerNorm blocks: at AdamW's 3e-3 the 'cpu' preset stayed at the
  # unigram prediction for 400 steps; at 1e-3 it left it.
  lr_multiplier = 1 / 3

  def tokenizer(self, cfg, text: bytes) -> tokenizer_lib.Tokenizer:
    """``--tokenizer``; a ``bpe:N`` learns BERT's special tokens too."""
    specials = [t[0] for t in finetune_lib.SPECIALS.values()]
    return tokenizer_lib.load(cfg.tokenizer, text, cfg.out, specials)

  def model(self, cfg, vocab: finetune_lib.Vocabulary, **fields):
    if cfg.init:
      mc = base.model_config(cfg, **fields)
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer, vocab.size, mc.vocab_size, cfg.init
      )
    else:
      mc = base.model_config(cfg, vocab_size=vocab.size, **fields)
    base.check_max_len(cfg, mc)
    return base.build(cfg, mc)

  def loss(self, model, batch):
    return self.head_loss(model.output, model.features(batch[:3]), batch)

  def items_per_step(self, cfg):
    return cfg.batch_size * cfg.seq_len


class MaskedLM(EncoderObjective):
  """Predicts the corrupted tokens from both sides.

  Needs ``masked_token``: a model whose config has ``vocab_size``,
  ``max_len`` and ``num_labels`` (0: the masked-LM head) and whose
  ``features`` take (token ids, segment ids, padding mask), each (batch,
  length), and attend both ways.
  """

  name = "masked_lm"
  needs = "masked_token"
  defaults = dict(steps=800, batch_size=16, data="stdlib")
  unit = "tok"

  def load_data(self, cfg):
    text = data_lib.load_text(cfg.data, cfg.max_data_bytes)
    tok = self.tokenizer(cfg, text.train.tobytes())
    return MaskedText(
        data_lib.tokenize(text, tok), finetune_lib.vocabulary(tok)
    )

  def build_model(self, cfg, data):
    return self.model(cfg, data.vocab, num_labels=0)

  def logits_loss(self, logits, batch):
    targets, weights = batch[3], batch[4]
    losses = base.token_losses(logits, targets)
    total = jnp.maximum(weights.sum(), 1.0)
    hits = (logits.argmax(-1) == targets) * weights
    return (losses * weights).sum() / total, {
        "masked_accuracy": hits.sum() / total
    }

  def batch(self, cfg, data, step, rows):
    rng = np.random.default_rng([cfg.seed, step])
    return tuple(
        x[rows]
        for x in finetune_lib.mlm_batch(
            data.text.train, rng, cfg.batch_size, cfg.seq_len, vocab=data.vocab
        )
    )

  def eval_batches(self, cfg, data):
    rng = np.random.default_rng(12345)
    body = cfg.seq_len - 2
    val = data.text.val
    n_windows = min(len(val) // body, cfg.batch_size * cfg.eval_batches)
    for first in range(0, n_windows - cfg.batch_size + 1, cfg.batch_size):
      starts = np.arange(first, first + cfg.batch_size) * body
      yield finetune_lib.mlm_batch(
          val, rng, cfg.batch_size, cfg.seq_len, starts, data.vocab
      )

  def eval_metrics(self, losses, aux):
    out = super().eval_metrics(losses, aux)
    out["val_masked_accuracy"] = base.mean_of(aux, "masked_accuracy")
    return out


OBJECTIVE = MaskedLM()
