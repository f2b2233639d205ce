"""Data for the BERT task: masked-LM windows, sentence classification examples,
and their metrics.

Text is spelled in a :class:`Vocabulary`: by default bytes (ids 0-255) with
four special ids after them, :data:`PAD`, :data:`CLS`, :data:`SEP`,
:data:`MASK` (:data:`BYTES`); with ``--tokenizer``, the tokenizer's ids and
its own special tokens (:func:`vocabulary`). A sequence is ``[CLS] a [SEP]``
or ``[CLS] a [SEP] b [SEP]`` (segment ids 0, then 1 for ``b``), padded with
``PAD`` (mask False).

Fine-tuning tasks (``--finetune NAME``):

- ``stdlib:next`` (sentence pair, the default): is ``b`` the line that follows
  ``a`` in the source, or a line drawn at random? Metrics: accuracy and F1 (as
  MRPC and QQP report).
- ``stdlib:order`` (single sentence): is the line as written, or with two
  adjacent words swapped? An acceptability judgement, measured as CoLA is: by
  Matthews correlation.

Both come from the embedded data (the standard library's source), so
fine-tuning runs offline: one example per line of each split, drawn once with
a fixed seed; training batches sample them by ``(seed, step)``, and the first
:data:`OFFLINE_VAL_EXAMPLES` held-out lines are the validation examples. GLUE
(``glue:NAME``, :func:`load_glue`) comes through Hugging Face ``datasets``.
"""

from __future__ import annotations

from typing import Callable
from typing import Iterator
from typing import NamedTuple

import numpy as np

from train.data import DataError

PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260  # bytes and the four special ids
MASK_RATE = 0.15  # BERT's: of those, 80% [MASK], 10% a random token, 10% kept


class Vocabulary(NamedTuple):
  """How the encoder's inputs are spelled."""

  size: int
  pad: int
  cls: int
  sep: int
  mask: int
  # texts -> their ids, without special tokens
  encode: Callable[[list[bytes]], list[list[int]]]
  # a corrupted position's random token is drawn below this
  random_below: int


BYTES = Vocabulary(
    VOCAB_SIZE, PAD, CLS, SEP, MASK, lambda texts: [list(t) for t in texts], 256
)
# the special tokens' spellings: BERT's, then RoBERTa's
SPECIALS = {
    "pad": ("[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}


def vocabulary(tok) -> Vocabulary:
  """The vocabulary of a :class:`train.tokenizer.Tokenizer`: :data:`BYTES` for
  ``bytes``, else its ids and special tokens (BERT's or RoBERTa's)."""
  if tok.backend is None:
    return BYTES
  ids = {}
  for name, spellings in SPECIALS.items():
    found = [tok.token_id(t) for t in spellings if tok.token_id(t) is not None]
    if not found:
      raise DataError(
          f"--tokenizer {tok.spec} has no {' or '.join(spellings)} token, which"
          " the encoder's inputs need"
      )
    ids[name] = found[0]
  encode = lambda texts: [
      e.ids
      for e in tok.backend.encode_batch(
          [t.decode("utf-8", "replace") for t in texts],
          add_special_tokens=False,
      )
  ]
  return Vocabulary(
      tok.vocab_size, encode=encode, random_below=tok.vocab_size, **ids
  )


# ---------------------------------------------------------------------------
# masked-LM windows


def mlm_batch(
    tokens: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    starts: np.ndarray | None = None,
    vocab: Vocabulary = BYTES,
) -> tuple[np.ndarray, ...]:
  """``(tokens, segments, mask, targets, weights)``, each (batch, seq_len):
  windows ``[CLS] tokens [SEP]`` with BERT's corruption; ``weights`` is 1 at
  the corrupted positions, where the loss is taken."""
  body = seq_len - 2
  if len(tokens) <= body:
    raise DataError(f"{len(tokens)} tokens cannot fill a window of {body}")
  if starts is None:
    starts = rng.integers(0, len(tokens) - body, batch_size)
  windows = np.stack([tokens[s : s + body] for s in starts]).astype(np.int32)
  chosen = rng.random(windows.shape) < MASK_RATE
  roll = rng.random(windows.shape)
  corrupted = np.where(chosen & (roll < 0.8), vocab.mask, windows)
  random_tokens = rng.integers(0, vocab.random_below, windows.shape)
  corrupted = np.where(chosen & (roll >= 0.9), random_tokens, corrupted)
  n = len(starts)
  column = lambda v: np.full((n, 1), v, np.int32)
  ends = column(vocab.cls), column(vocab.sep)
  ids = np.concatenate([ends[0], corrupted, ends[1]], axis=1)
  targets = np.concatenate([ends[0], windows, ends[1]], axis=1)
  weights = np.pad(chosen, ((0, 0), (1, 1))).astype(np.float32)
  return (
      ids.astype(np.int32),
      np.zeros_like(ids, np.int32),
      np.ones(ids.shape, bool),
      targets.astype(np.int32),
      weights,
  )


# ---------------------------------------------------------------------------
# sentence classification


def encode(
    first: list[bytes],
    second: list[bytes] | None,
    seq_len: int,
    vocab: Vocabulary = BYTES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(tokens, segments, mask)`` of single sentences or pairs, each
  truncated to its share of ``seq_len``."""
  n = len(first)
  tokens = np.full((n, seq_len), vocab.pad, np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), bool)
  firsts = vocab.encode(first)
  seconds = None if second is None else vocab.encode(second)
  for i in range(n):
    if seconds is None:
      parts = [firsts[i][: seq_len - 2]]
    else:
      share = (seq_len - 3) // 2
      parts = [firsts[i][:share], seconds[i][:share]]
    ids = [vocab.cls]
    for k, part in enumerate(parts):
      start = len(ids)
      ids += list(part) + [vocab.sep]
      segments[i, start : len(ids)] = k
    tokens[i, : len(ids)] = ids
    mask[i, : len(ids)] = True
  return tokens, segments, mask


def text_lines(tokens: np.ndarray, min_words: int = 1) -> list[bytes]:
  """The stripped non-empty lines of byte text with at least ``min_words``
  words."""
  return [
      line.strip()
      for line in bytes(tokens).split(b"\n")
      if len(line.split()) >= max(min_words, 1)
  ]


class Examples(NamedTuple):
  first: list[bytes]
  second: list[bytes] | None
  labels: np.ndarray  # int32 classes, or float32 scores for regression


def next_line_examples(
    lines: list[bytes], rng: np.random.Generator, picks: np.ndarray
) -> Examples:
  """Line ``i`` with its successor (label 1) or a random line (label 0)."""
  labels = rng.integers(0, 2, len(picks)).astype(np.int32)
  others = rng.integers(0, len(lines), len(picks))
  second = [
      lines[i + 1] if label else lines[j]
      for i, j, label in zip(picks, others, labels)
  ]
  # a random line that happens to be the successor is a positive
  labels = np.array(
      [int(s == lines[i + 1]) for i, s in zip(picks, second)], np.int32
  )
  return Examples([lines[i] for i in picks], second, labels)


def word_order_examples(
    lines: list[bytes], rng: np.random.Generator, picks: np.ndarray
) -> Examples:
  """Line ``i`` as written (label 1), or with two adjacent different words
  swapped (label 0)."""
  labels = rng.integers(0, 2, len(picks)).astype(np.int32)
  where = rng.random(len(picks))
  out = []
  for i, label, u in zip(picks, labels, where):
    words = lines[i].split()
    if not label:
      pairs = [k for k in range(len(words) - 1) if words[k] != words[k + 1]]
      if pairs:
        k = pairs[int(u * len(pairs))]
        words[k], words[k + 1] = words[k + 1], words[k]
    out.append(b" ".join(words))
  # a line with nothing to swap stays as written: labelled by what came out
  labels = np.array(
      [int(b" ".join(lines[i].split()) == o) for i, o in zip(picks, out)],
      np.int32,
  )
  return Examples(out, None, labels)


class OfflineTask(NamedTuple):
  make: Callable[[list[bytes], np.random.Generator, np.ndarray], Examples]
  min_words: int
  num_labels: int
  description: str


OFFLINE = {
    "stdlib:next": OfflineTask(
        next_line_examples,
        1,
        2,
        "is the second line the one that follows the first?",
    ),
    "stdlib:order": OfflineTask(
        word_order_examples,
        3,
        2,
        "is the line as written, or two adjacent words swapped?",
    ),
}
DEFAULT_TASK = "stdlib:next"
OFFLINE_VAL_EXAMPLES = 1024


class Classification(NamedTuple):
  """A fine-tuning task's examples."""

  name: str
  train: Examples
  val: Examples
  num_labels: int  # 1: regression
  description: str
  vocab: Vocabulary = BYTES


def load_offline(name: str, train: np.ndarray, val: np.ndarray):
  """The offline task ``name`` on byte text ``train`` and ``val``: one example
  per line (but the last), drawn once with a fixed seed; the first
  :data:`OFFLINE_VAL_EXAMPLES` validation lines are evaluated."""
  if name not in OFFLINE:
    raise DataError(
        f"unknown fine-tuning task {name!r}; choose one of {sorted(OFFLINE)}"
        f" or glue:{{{','.join(GLUE)}}}"
    )
  task = OFFLINE[name]
  examples = []
  for split, tokens in (("train", train), ("val", val)):
    lines = text_lines(tokens, task.min_words)
    if split == "val":
      lines = lines[: OFFLINE_VAL_EXAMPLES + 1]
    if len(lines) < 16:
      raise DataError(f"{name}: the {split} split has too few lines")
    rng = np.random.default_rng(0)
    examples.append(task.make(lines, rng, np.arange(len(lines) - 1)))
  return Classification(name, *examples, task.num_labels, task.description)


# GLUE: (text columns, number of labels (1: regression), validation split)
GLUE = {
    "cola": (("sentence",), 2, "validation"),
    "sst2": (("sentence",), 2, "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, "validation"),
    "qqp": (("question1", "question2"), 2, "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": (("question", "sentence"), 2, "validation"),
    "rte": (("sentence1", "sentence2"), 2, "validation"),
}
GLUE_REPOSITORY = "nyu-mll/glue"


def load_glue(name: str, local: str | None = None) -> Classification:
  """GLUE task ``name`` through Hugging Face ``datasets``: from ``local``, a
  copy saved with ``DatasetDict.save_to_disk``, or else downloaded (and
  cached) from the Hub. Text is read as UTF-8 bytes."""
  if name not in GLUE:
    raise DataError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE)}")
  try:
    import datasets
  except ImportError:
    raise DataError(
        "GLUE needs Hugging Face datasets: pip install 'galore-optax[hf]'"
    ) from None
  columns, num_labels, val_split = GLUE[name]
  if local is not None:
    splits = datasets.load_from_disk(local)
  else:
    splits = datasets.load_dataset(GLUE_REPOSITORY, name)
  out = []
  for split in ("train", val_split):
    if split not in splits:
      raise DataError(f"glue:{name}: no {split!r} split in {local or 'it'}")
    table = splits[split]
    missing = [c for c in (*columns, "label") if c not in table.column_names]
    if missing:
      raise DataError(
          f"glue:{name}: the {split} split lacks column(s) {missing}"
      )
    texts = [[t.encode() for t in table[c]] for c in columns]
    dtype = np.float32 if num_labels == 1 else np.int32
    out.append(
        Examples(
            texts[0],
            texts[1] if len(texts) > 1 else None,
            np.asarray(table["label"], dtype),
        )
    )
  return Classification(f"glue:{name}", *out, num_labels, f"GLUE {name}")


def _take(examples: Examples, index: np.ndarray):
  second = (
      None if examples.second is None else [examples.second[i] for i in index]
  )
  return [examples.first[i] for i in index], second, examples.labels[index]


def classification_batch(
    data: Classification, seed: int, step: int, batch_size: int, seq_len: int
) -> tuple[np.ndarray, ...]:
  """``(tokens, segments, mask, labels, weights)`` of step ``step``'s
  examples, drawn from the training examples by ``(seed, step)``; the weights
  are ones."""
  rng = np.random.default_rng([seed, step, 1])
  first, second, labels = _take(
      data.train, rng.integers(0, len(data.train.labels), batch_size)
  )
  return (
      *encode(first, second, seq_len, data.vocab),
      labels,
      np.ones(batch_size, np.float32),
  )


def classification_eval_batches(
    data: Classification, batch_size: int, seq_len: int
) -> Iterator[tuple[np.ndarray, ...]]:
  """Every validation example once, in order, in batches of ``batch_size``:
  the last batch is filled up with copies of the first examples at weight 0."""
  n = len(data.val.labels)
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    weights = (index < n).astype(np.float32)
    first, second, labels = _take(data.val, index % n)
    yield (*encode(first, second, seq_len, data.vocab), labels, weights)


# ---------------------------------------------------------------------------
# metrics (GLUE's)


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  return float(np.mean(labels == predictions))


def f1(labels: np.ndarray, predictions: np.ndarray) -> float:
  """F1 of the positive class (1)."""
  tp = np.sum((predictions == 1) & (labels == 1))
  fp = np.sum((predictions == 1) & (labels == 0))
  fn = np.sum((predictions == 0) & (labels == 1))
  return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Matthews correlation of binary labels; 0 when a margin is empty."""
  tp = np.sum((predictions == 1) & (labels == 1))
  tn = np.sum((predictions == 0) & (labels == 0))
  fp = np.sum((predictions == 1) & (labels == 0))
  fn = np.sum((predictions == 0) & (labels == 1))
  denominator = np.sqrt(
      float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
  )
  return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(labels: np.ndarray, scores: np.ndarray) -> float:
  return float(np.corrcoef(labels, scores)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks from 1, ties sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  for value in np.unique(x):
    tied = x == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def spearman(labels: np.ndarray, scores: np.ndarray) -> float:
  return pearson(_ranks(labels), _ranks(scores))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
