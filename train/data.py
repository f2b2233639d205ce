"""Data for the training CLI: embedded offline defaults and loaders for what
users bring.

Text is read as bytes and then tokenized (:mod:`train.tokenizer`; bytes, a
vocabulary of 256, by default). The default corpus is the Python standard
library's own source, read from the interpreter's installation: real text, no
download. Images default to scikit-learn's bundled 8x8 digits. Batches are a
pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
from typing import Iterator
from typing import NamedTuple
from typing import Optional

import numpy as np

VAL_FRACTION = 0.05
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Short names for the Hugging Face datasets the README mentions: (path, config).
HF_ALIASES = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "cifar10": ("uoft-cs/cifar10", None),
}


class DataError(ValueError):
  """The data named on the command line cannot be used; the message says why."""


class TextData(NamedTuple):
  train: np.ndarray  # token ids (uint8 bytes before tokenize())
  val: np.ndarray
  description: str
  vocab_size: int = 256
  # each validation token's end as a byte offset into the validation text
  # (None: one byte per token)
  val_ends: Optional[np.ndarray] = None
  tokenizer: str = "bytes"  # its identity (tokenizer.Tokenizer.identity)
  memmapped: bool = False  # token files read through train.corpus


def tokenize(text: TextData, tok) -> TextData:
  """``text`` (bytes) as the tokens of ``tok`` (a :class:`train.tokenizer.
  Tokenizer`), each split tokenized on its own."""
  if tok.backend is None:
    return text
  from train import tokenizer as tokenizer_lib

  dtype = tokenizer_lib.token_dtype(tok.vocab_size)
  train, _ = tokenizer_lib.encode(tok, text.train.tobytes(), dtype)
  val, val_ends = tokenizer_lib.encode(tok, text.val.tobytes(), dtype)
  return TextData(
      train,
      val,
      f"{text.description}, {tok.spec} tokens",
      tok.vocab_size,
      val_ends,
      tok.identity,
  )


class ImageData(NamedTuple):
  train_x: np.ndarray  # (N, H, W, C) float32 in [0, 1]
  train_y: np.ndarray  # (N,) int32
  val_x: np.ndarray
  val_y: np.ndarray
  num_classes: int
  description: str


# ---------------------------------------------------------------------------
# text


def stdlib_files() -> list[pathlib.Path]:
  """The ``.py`` files of the standard library, sorted, without tests or
  installed packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = {
      "site-packages",
      "dist-packages",
      "test",
      "tests",
      "idle_test",
      "__pycache__",
  }
  files = []
  # the skipped folders are pruned, not walked: site-packages alone can hold
  # tens of thousands of files
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = [d for d in subfolders if d not in skip]
    files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
  return sorted(files)


def _read_files(paths: list[pathlib.Path], max_bytes: int) -> bytes:
  chunks, total = [], 0
  for path in paths:
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  return b"\n".join(chunks)[:max_bytes]


def _split_text(data: bytes, description: str) -> TextData:
  tokens = np.frombuffer(data, dtype=np.uint8)
  n_val = max(int(len(tokens) * VAL_FRACTION), 1)
  return TextData(tokens[:-n_val], tokens[-n_val:], description)


def load_text(spec: str, max_bytes: int = 8 * 2**20) -> TextData:
  """``stdlib``, a local file or directory of text, or ``hf:NAME[:CONFIG]``.

  Local text and the standard library are held out deterministically: the last
  5% of the concatenated bytes (files in sorted order) is the validation split.
  """
  if spec == "stdlib":
    files = stdlib_files()
    if not files:
      raise DataError(
          "found no standard-library source to train on; pass --data PATH"
      )
    return _split_text(
        _read_files(files, max_bytes),
        f"Python {sysconfig.get_python_version()} "
        f"standard library source ({len(files)} files)",
    )
  if spec.startswith("hf:"):
    return _load_hf_text(spec[3:], max_bytes)
  path = pathlib.Path(spec)
  if not path.exists():
    raise DataError(f"data path {spec!r} does not exist")
  files = (
      sorted(p for p in path.rglob("*") if p.is_file())
      if path.is_dir()
      else [path]
  )
  data = _read_files(files, max_bytes)
  if len(data) < 2 * 1024:
    raise DataError(
        f"data path {spec!r} holds {len(data)} bytes of text; at least 2 KiB"
        " are needed"
    )
  return _split_text(data, f"{spec} ({len(files)} files)")


def text_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rows: slice = slice(None),
):
  """Random windows of ``seq_len + 1`` tokens: (inputs, targets), each (batch,
  seq_len) int32.

  ``rows`` picks some rows of that batch (a process's share) without building
  the others.
  """
  if len(tokens) <= seq_len + 1:
    raise DataError(
        f"{len(tokens)} tokens cannot fill a window of {seq_len + 1}"
    )
  starts = np.random.default_rng([seed, step]).integers(
      0, len(tokens) - seq_len - 1, batch_size
  )[rows]
  windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(
      np.int32
  )
  return windows[:, :-1], windows[:, 1:]


def eval_text_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    ends: Optional[np.ndarray] = None,
) -> Iterator:
  """Consecutive non-overlapping windows from the start of ``tokens``; the same
  every time: ``(inputs, targets, target_bytes)``, the last (batch,) the bytes
  of text each window's targets stand for (``ends``: each token's end as a
  byte offset; None: one byte per token)."""
  n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
  for first in range(0, n_windows - batch_size + 1, batch_size):
    starts = np.arange(first, first + batch_size) * seq_len
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    target_bytes = (
        np.full(batch_size, seq_len)
        if ends is None
        else ends[starts + seq_len] - ends[starts]
    )
    yield (
        windows[:, :-1].astype(np.int32),
        windows[:, 1:].astype(np.int32),
        target_bytes.astype(np.float32),
    )


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the token frequencies: the loss of the best context-free
  model."""
  counts = np.bincount(tokens).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------
# images


def _split_images(x, y, num_classes, description, seed=0) -> ImageData:
  order = np.random.default_rng(seed).permutation(len(x))
  n_val = max(int(len(x) * 0.2), 1)
  val, train = order[:n_val], order[n_val:]
  return ImageData(x[train], y[train], x[val], y[val], num_classes, description)


def fit_image(image, image_size: int, channels: int) -> np.ndarray:
  """A PIL image -> (image_size, image_size, channels) float32 in [0, 1]."""
  image = image.convert("L" if channels == 1 else "RGB").resize(
      (image_size, image_size)
  )
  return (
      np.asarray(image, np.float32).reshape(image_size, image_size, channels)
      / 255.0
  )


def _image_folder(root: pathlib.Path, image_size: int, channels: int):
  from PIL import Image  # pillow comes with matplotlib

  classes = sorted(d.name for d in root.iterdir() if d.is_dir())
  xs, ys = [], []
  for label, name in enumerate(classes):
    for path in sorted((root / name).rglob("*")):
      if path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as image:
          xs.append(fit_image(image, image_size, channels))
        ys.append(label)
  return xs, ys, classes


def load_images(spec: str, image_size: int, channels: int) -> ImageData:
  """``digits``, an image folder (``ROOT/CLASS/*.png``, or ``ROOT/train`` and
  ``ROOT/val`` or ``ROOT/test`` laid out so), or ``hf:NAME``."""
  if spec == "digits":
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    if (image_size, channels) != (8, 1):
      raise DataError(
          "digits are 8x8 grayscale; the model expects"
          f" {image_size}x{image_size}x{channels}"
      )
    return _split_images(
        x,
        digits.target.astype(np.int32),
        10,
        "scikit-learn digits (1797 8x8 images)",
    )
  if spec.startswith("hf:"):
    return _load_hf_images(spec[3:], image_size, channels)
  root = pathlib.Path(spec)
  if not root.is_dir():
    raise DataError(
        f"image folder {spec!r} does not exist or is not a directory"
    )
  val_dir = next(
      (root / d for d in ("val", "test") if (root / d).is_dir()), None
  )
  if (root / "train").is_dir() and val_dir is not None:
    tx, ty, classes = _image_folder(root / "train", image_size, channels)
    vx, vy, val_classes = _image_folder(val_dir, image_size, channels)
    if val_classes != classes:
      raise DataError(
          f"{val_dir} has classes {val_classes}, {root / 'train'} has {classes}"
      )
    if not tx or not vx:
      raise DataError(
          f"image folder {spec!r} has no images under train/ or {val_dir.name}/"
      )
    return ImageData(
        np.stack(tx),
        np.asarray(ty, np.int32),
        np.stack(vx),
        np.asarray(vy, np.int32),
        len(classes),
        f"{spec} ({len(tx)} + {len(vx)} images)",
    )
  xs, ys, classes = _image_folder(root, image_size, channels)
  if len(xs) < 2 or len(classes) < 2:
    raise DataError(
        f"image folder {spec!r} needs at least two class folders with images, "
        f"found {len(classes)} classes and {len(xs)} images"
    )
  return _split_images(
      np.stack(xs),
      np.asarray(ys, np.int32),
      len(classes),
      f"{spec} ({len(xs)} images)",
  )


def image_batch(
    x: np.ndarray,
    y: np.ndarray,
    step: int,
    batch_size: int,
    seed: int,
    rows: slice = slice(None),
):
  """A random batch of (images, labels); ``rows`` as in :func:`text_batch`."""
  idx = np.random.default_rng([seed, step]).choice(
      len(x), size=batch_size, replace=len(x) < batch_size
  )[rows]
  return x[idx], y[idx]


def eval_image_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator:
  for first in range(0, len(x) - batch_size + 1, batch_size):
    yield x[first : first + batch_size], y[first : first + batch_size]
  if len(x) < batch_size:
    yield x, y


# ---------------------------------------------------------------------------
# Hugging Face


def hf_dataset(name: str, streaming: bool = False):
  """Dataset ``name`` (an alias of :data:`HF_ALIASES`, ``NAME[:CONFIG]`` or a
  local directory) through ``datasets``; ``streaming`` reads rows as they are
  asked for, so that taking the first megabytes of a corpus (C4's 300 GB)
  downloads only those."""
  try:
    import datasets
  except ImportError:
    raise DataError(
        f"hf:{name} needs the 'datasets' package: pip install datasets"
    ) from None
  path, config = HF_ALIASES.get(name, (name, None))
  if ":" in name and name not in HF_ALIASES:
    path, config = name.split(":", 1)
  try:
    return datasets.load_dataset(path, config, streaming=streaming)
  except (
      Exception
  ) as e:  # unreachable hub, unknown name, ...: say which and why, then stop
    raise DataError(
        f"could not load Hugging Face dataset {path!r}"
        f"{f' ({config})' if config else ''}: {type(e).__name__}: {e}"
    ) from None


def held_out_split(ds) -> Optional[str]:
  return next((s for s in ("validation", "valid", "test") if s in ds), None)


def _load_hf_text(name: str, max_bytes: int) -> TextData:
  ds = hf_dataset(name, streaming=True)  # the first max_bytes are read
  if "train" not in ds:
    raise DataError(f"hf:{name} has no train split (splits: {list(ds)})")
  first = next(iter(ds["train"]), None)
  if not first:
    raise DataError(f"hf:{name}: its train split is empty")
  column = "text" if "text" in first else next(iter(first))

  def join(split, limit):
    out, total = [], 0
    for row in split:
      data = row[column].encode("utf-8")
      out.append(data)
      total += len(data) + 1
      if total >= limit:
        break
    return b"\n".join(out)[:limit]

  val_name = held_out_split(ds)
  if val_name is None:
    return _split_text(join(ds["train"], max_bytes), f"hf:{name}")
  train = np.frombuffer(join(ds["train"], max_bytes), np.uint8)
  val = np.frombuffer(
      join(ds[val_name], max(int(max_bytes * VAL_FRACTION), 2**16)), np.uint8
  )
  return TextData(train, val, f"hf:{name} (train / {val_name})")


def _load_hf_images(name: str, image_size: int, channels: int) -> ImageData:
  import datasets

  ds = hf_dataset(name)
  if "train" not in ds:
    raise DataError(f"hf:{name} has no train split (splits: {list(ds)})")
  features = ds["train"].features
  image_col = next(
      (c for c, f in features.items() if isinstance(f, datasets.Image)), None
  )
  label_col = next(
      (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)),
      None,
  )
  if image_col is None or label_col is None:
    raise DataError(
        f"hf:{name} needs an image column and a class-label column; it has"
        f" {dict(features)}"
    )
  num_classes = features[label_col].num_classes

  def arrays(split):
    x = np.stack(
        [fit_image(im, image_size, channels) for im in split[image_col]]
    )
    return x, np.asarray(split[label_col], np.int32)

  val_name = held_out_split(ds)
  if val_name is None:
    x, y = arrays(ds["train"])
    return _split_images(x, y, num_classes, f"hf:{name}")
  (tx, ty), (vx, vy) = arrays(ds["train"]), arrays(ds[val_name])
  return ImageData(
      tx, ty, vx, vy, num_classes, f"hf:{name} (train / {val_name})"
  )
