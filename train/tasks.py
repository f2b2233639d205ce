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
from typing import Callable
from typing import ClassVar
from typing import Iterator
from typing import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import hf
from models import transformer
from models.registry import MODELS
from train import corpus
from train import data as data_lib
from train import finetune as finetune_lib
from train import image_text
from train import init as init_lib
from train import tokenizer as tokenizer_lib

Batch = tuple[np.ndarray, ...]


class TaskError(ValueError):
  """A task cannot be set up as configured; the message says why."""


class Task:
  """What the loop needs to know about a task. Subclasses fill in each part."""

  # the model it trains: a family of models.registry.MODELS
  family: ClassVar[str]
  defaults: ClassVar[dict[str, Any]]  # steps, batch_size, data
  unit: ClassVar[str]  # what the throughput counts: "tok" or "img"
  # times each optimizer's default learning rate (train.optimizers), whose
  # Adam-like ones are at 3e-3: the task's tuned AdamW rate over 3e-3
  # (BENCHMARKS.md, issue 27), which the low-rank ones share under the rule
  lr_multiplier: ClassVar[float] = 1.0

  @property
  def presets(self) -> Mapping[str, Any]:
    return MODELS[self.family].presets

  @property
  def heads(self) -> tuple[str, ...]:
    """Parameter paths of the output heads: initialised afresh when --init
    lacks them, trained under --lora-rank."""
    return MODELS[self.family].heads

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

  def for_config(self, cfg) -> "Task":
    """The task that trains ``cfg``: itself, or a variant (BERT fine-tunes)."""
    return self


def base_model_config(cfg) -> Any:
  """The model config of ``cfg``'s preset, or of its ``--init`` checkpoint
  (read from disk, or from the network for ``hf:`` names)."""
  if not cfg.init:
    return TASKS[cfg.task].presets[cfg.preset]
  checkpoint, preset = init_lib.model_origin(cfg.init, cfg.task)
  return checkpoint or TASKS[cfg.task].presets[preset]


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


def build(cfg, family: str, mc) -> nnx.Module:
  """The model of ``family`` (models.registry.MODELS) and config ``mc``:
  initialised from ``cfg.seed``, or with ``--init`` loaded from one of our
  runs or a Hugging Face checkpoint (what it does not hold, a new head, from
  ``cfg.seed``)."""
  spec = MODELS[family]
  if not cfg.init:
    return spec.model(mc, rngs=nnx.Rngs(cfg.seed))
  if init_lib.is_run(cfg.init):
    model = spec.model(mc, rngs=nnx.Rngs(cfg.seed))
    fresh = init_lib.load_run(cfg.init, model, spec.heads)
  else:
    model, loaded = hf.load(
        cfg.init, expect_model=family, seed=cfg.seed, config=mc
    )
    fresh = loaded.fresh
  if jax.process_index() == 0:
    print(
        f"loaded weights from {cfg.init}"
        + (f"; initialised afresh: {', '.join(fresh)}" if fresh else "")
    )
  return model


# logits (of the whole batch) the language model's loss holds at once: 32 MiB
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


def _token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets
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


class LanguageModeling(Task):
  """GPT-2 on text: next-token cross-entropy, perplexity, bits per byte."""

  family = "gpt2"
  defaults = dict(steps=800, batch_size=16, data="stdlib")
  unit = "tok"
  # AdamW's tuned rate is 5e-3 on the embedded corpus and on Vim's help files
  lr_multiplier = 5 / 3

  def load_data(self, cfg):
    return load_tokens(cfg)

  def build_model(self, cfg, data):
    if cfg.init:
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer,
          data.vocab_size,
          base_model_config(cfg).vocab_size,
          cfg.init,
      )
    vocab = cfg.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
      raise TaskError(
          f"--vocab-size {vocab} is smaller than the data's vocabulary,"
          f" {data.vocab_size}"
      )
    mc = model_config(cfg, vocab_size=vocab)
    if cfg.seq_len > mc.max_len:
      raise TaskError(
          f"--seq-len {cfg.seq_len} exceeds the max_len of preset"
          f" {cfg.preset!r}, {mc.max_len}"
      )
    return build(cfg, self.family, mc)

  def logits_loss(self, logits, batch):
    return _token_losses(logits, batch[1]).mean(), {}

  def loss(self, model, batch):
    loss, aux = super().loss(model, batch)
    if len(batch) > 2:  # an evaluation batch: the bytes its targets stand for
      aux = dict(aux, target_bytes=batch[2].sum(), targets=batch[1].size)
    return loss, aux

  def head_loss(self, output, features, batch):
    """The mean next-token loss, computed over pieces of the sequence
    (:func:`loss_chunks`) under remat, so that GPT-2's 50257-way logits never
    exist for the whole batch at once."""
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
      return total + _token_losses(output(features), targets).sum(), None

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
    mean = lambda k: float(np.mean([float(a[k]) for a in aux]))
    out["val_bpb"] = (
        out["val_loss"] * mean("targets") / mean("target_bytes") / math.log(2)
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


class ImageClassification(Task):
  """ViT on labelled images: cross-entropy, accuracy."""

  family = "vit"
  defaults = dict(steps=400, batch_size=64, data="digits")
  unit = "img"
  # AdamW's tuned rate: 2e-3
  lr_multiplier = 2 / 3

  def load_data(self, cfg):
    mc = base_model_config(cfg)
    return data_lib.load_images(cfg.data, mc.image_size, mc.channels)

  def build_model(self, cfg, data):
    mc = model_config(cfg, num_classes=data.num_classes)
    return build(cfg, self.family, mc)

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
    out["val_accuracy"] = float(np.mean([float(a["accuracy"]) for a in aux]))
    return out


class MaskedText(NamedTuple):
  text: data_lib.TextData  # token ids
  vocab: finetune_lib.Vocabulary

  @property
  def description(self) -> str:
    return self.text.description


class MaskedLanguageModeling(Task):
  """A BERT-style encoder on byte text: masked-LM pretraining (BERT's 15%
  corruption, loss at the corrupted positions); with ``--finetune``,
  :class:`SentenceClassification`."""

  family = "bert"
  defaults = dict(steps=800, batch_size=16, data="stdlib")
  unit = "tok"
  # Post-LayerNorm blocks: at AdamW's 3e-3 the 'cpu' preset stayed at the
  # unigram prediction for 400 steps; at 1e-3 it left it.
  lr_multiplier = 1 / 3

  def for_config(self, cfg):
    return SentenceClassification() if cfg.finetune else self

  def tokenizer(self, cfg, text: bytes) -> tokenizer_lib.Tokenizer:
    """``--tokenizer``; a ``bpe:N`` learns BERT's special tokens too."""
    specials = [t[0] for t in finetune_lib.SPECIALS.values()]
    return tokenizer_lib.load(cfg.tokenizer, text, cfg.out, specials)

  def load_data(self, cfg):
    text = data_lib.load_text(cfg.data, cfg.max_data_bytes)
    tok = self.tokenizer(cfg, text.train.tobytes())
    return MaskedText(
        data_lib.tokenize(text, tok), finetune_lib.vocabulary(tok)
    )

  def model(self, cfg, vocab: finetune_lib.Vocabulary, **fields):
    if cfg.init:
      mc = model_config(cfg, **fields)
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer, vocab.size, mc.vocab_size, cfg.init
      )
    else:
      mc = model_config(cfg, vocab_size=vocab.size, **fields)
    if cfg.seq_len > mc.max_len:
      raise TaskError(
          f"--seq-len {cfg.seq_len} exceeds the model's max_len {mc.max_len}"
      )
    return build(cfg, self.family, mc)

  def build_model(self, cfg, data):
    return self.model(cfg, data.vocab, num_labels=0)

  def loss(self, model, batch):
    return self.head_loss(model.output, model.features(batch[:3]), batch)

  def logits_loss(self, logits, batch):
    targets, weights = batch[3], batch[4]
    losses = _token_losses(logits, targets)
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
    out["val_masked_accuracy"] = float(
        np.mean([float(a["masked_accuracy"]) for a in aux])
    )
    return out

  def items_per_step(self, cfg):
    return cfg.batch_size * cfg.seq_len


class SentenceClassification(MaskedLanguageModeling):
  """The encoder fine-tuned on sentence (pair) classification or regression
  (:mod:`train.finetune`): cross-entropy (squared error for one label), and
  the task's metrics over its whole validation split."""

  unit = "seq"

  def for_config(self, cfg):
    return self

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


class ContrastiveLearning(Task):
  """CLIP on image-caption pairs (:mod:`train.image_text`): symmetric
  InfoNCE; recall@1/5 both ways and zero-shot accuracy on held-out pairs."""

  family = "clip"
  defaults = dict(steps=400, batch_size=64, data="digits")
  unit = "pair"
  # AdamW's tuned rate, 5e-4 (at 1e-3 it reached 80% zero-shot accuracy, at
  # 3e-3 21%; galore_adamw at the paper's 1e-2 collapsed to chance)
  lr_multiplier = 1 / 6

  def load_data(self, cfg):
    mc = base_model_config(cfg)
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
      mc = model_config(cfg)
      tokenizer_lib.check_vocabulary(
          cfg.tokenizer, data.vocab_size, mc.vocab_size, cfg.init
      )
      if mc.eot_token not in (None, data.eot):
        raise TaskError(
            f"--init {cfg.init} pools text at token {mc.eot_token}; --tokenizer"
            f" {cfg.tokenizer} ends captions with {data.eot}"
        )
    else:
      mc = model_config(cfg, vocab_size=data.vocab_size, eot_token=data.eot)
    return build(cfg, self.family, mc)

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


TASKS: dict[str, Task] = {
    "gpt2": LanguageModeling(),
    "vit": ImageClassification(),
    "bert": MaskedLanguageModeling(),
    "clip": ContrastiveLearning(),
}


def task_for(cfg) -> Task:
  """The task that trains ``cfg``."""
  return TASKS[cfg.task].for_config(cfg)
