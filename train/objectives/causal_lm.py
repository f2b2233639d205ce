"""Causal language modelling: next-token cross-entropy on text, with
perplexity and bits per byte.

Data: ``--data`` (the embedded standard-library source by default, local
files, ``hf:NAME``) as the tokens of ``--tokenizer`` (:mod:`train.data`), or
with ``--memmap`` memory-mapped token files (:mod:`train.corpus`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models import transformer
from train import corpus
from train import data as data_lib
from train import tokenizer as tokenizer_lib
from train.objectives import base

# logits (of the whole batch) the loss holds at once: 32 MiB
LOGITS_CHUNK = 2**23


def loss_chunks(batch: int, length: int, vocab: int, width: int) -> int:
  """How many pieces of the sequence the loss is computed in: the fewest,
  dividing ``length``, whose logits fit :data:`LOGITS_CHUNK` (or one per
  position); one when the logits are at most twice the (vocab, width) output
  table, since the pieces' backward pass holds one more gradient of it."""
  if batch * length * vocab <= 2 * vocab * width:
    return 1
  return next(
      n
      for n in range(1, length + 1)
      if length % n == 0
      and (batch * length * vocab <= n * LOGITS_CHUNK or n == length)
  )


def load_tokens(cfg) -> data_lib.TextData:
  """``--data`` as the tokens of ``--tokenizer`` (a ``bpe:N`` trained on the
  training split, at most ``--max-data-bytes`` of it, kept in the run
  directory); with ``--memmap``, all of it as memory-mapped token files."""
  if cfg.memmap:
    corpus.sources(cfg.data)  # what --memmap cannot read fails first
    # the text is read only to train a bpe:N (on its first bytes)
    train_text = lambda: (
        data_lib.load_text(cfg.data, cfg.max_data_bytes).train.tobytes()
    )
    tok = tokenizer_lib.load(cfg.tokenizer, train_text, cfg.out)
    return corpus.open_tokens(cfg.data, tok)
  text = data_lib.load_text(cfg.data, cfg.max_data_bytes)
  tok = tokenizer_lib.load(cfg.tokenizer, text.train.tobytes(), cfg.out)
  return data_lib.tokenize(text, tok)


class CausalLM(base.Objective):
  """Predicts each token from those before it.

  Needs ``next_token``: a model whose config has ``vocab_size`` and
  ``max_len`` and whose ``output(features(tokens))`` gives, at position t of
  ``tokens`` (batch, length), the logits (batch, length, vocab) of token t + 1
  from tokens 0..t.
  """

  name = "causal_lm"
  needs = "next_token"
  defaults = dict(steps=800, batch_size=16, data="stdlib")
  unit = "tok"
  flags = ("memmap", "vocab_size")
  # AdamW's tuned rate is 5e-3 on the embedded corpus and on Vim's help files
  lr_multiplier = 5 / 3

  def load_data(self, cfg):
    return load_tokens(cfg)

  def build_model(self, cfg, data):
    if cfg.init:
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer,
          data.vocab_size,
          base.base_model_config(cfg).vocab_size,
          cfg.init,
      )
    vocab = cfg.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
      raise base.ObjectiveError(
          f"--vocab-size {vocab} is smaller than the data's vocabulary,"
          f" {data.vocab_size}"
      )
    mc = base.model_config(cfg, vocab_size=vocab)
    base.check_max_len(cfg, mc)
    return base.build(cfg, mc)

  def logits_loss(self, logits, batch):
    return base.token_losses(logits, batch[1]).mean(), {}

  def loss(self, model, batch):
    loss, aux = super().loss(model, batch)
    if len(batch) > 2:  # an evaluation batch: the bytes its targets stand for
      aux = dict(aux, target_bytes=batch[2].sum(), targets=batch[1].size)
    return loss, aux

  def head_loss(self, output, features, batch):
    """The mean next-token loss, computed over pieces of the sequence
    (:func:`loss_chunks`) under remat, so that a large vocabulary's logits
    never exist for the whole batch at once."""
    targets = batch[1]
    b, t = targets.shape
    vocab = jax.eval_shape(output, features[:, :1]).shape[-1]
    chunks = loss_chunks(b, t, vocab, features.shape[-1])
    if chunks == 1:
      return self.logits_loss(output(features), batch)
    split = lambda x: jnp.reshape(
        x,
        (b, chunks, t // chunks) + x.shape[2:],
        out_sharding=transformer.batch_spec(x, x.ndim + 1),
    ).swapaxes(0, 1)

    @jax.checkpoint
    def add_chunk(total, chunk):
      features, targets = chunk
      return total + base.token_losses(output(features), targets).sum(), None

    total, _ = jax.lax.scan(
        add_chunk,
        jnp.zeros([], jnp.float32),
        (split(features), split(targets)),
    )
    return total / (b * t), {}

  def batch(self, cfg, data, step, rows):
    sample = corpus.window_batch if data.memmapped else data_lib.text_batch
    return sample(data.train, step, cfg.batch_size, cfg.seq_len, cfg.seed, rows)

  def eval_batches(self, cfg, data):
    return data_lib.eval_text_batches(
        data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, data.val_ends
    )

  def eval_metrics(self, losses, aux):
    out = super().eval_metrics(losses, aux)
    out["val_ppl"] = math.exp(out["val_loss"])
    # nats per token -> bits per byte of the text the targets stand for (every
    # batch holds as many targets, so the mean loss weighs them alike)
    out["val_bpb"] = (
        out["val_loss"]
        * base.mean_of(aux, "targets")
        / base.mean_of(aux, "target_bytes")
        / math.log(2)
    )
    return out

  def items_per_step(self, cfg):
    return cfg.batch_size * cfg.seq_len

  def summary_extras(self, data):
    return {
        # of the first 16M tokens: a memory-mapped corpus is not read whole
        "unigram_entropy": data_lib.unigram_entropy(data.train[: 2**24]),
        "tokenizer": data.tokenizer,
    }


OBJECTIVE = CausalLM()
