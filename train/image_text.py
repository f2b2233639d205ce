"""Image-caption data and CLIP's objective and metrics.

Data (``--data`` of ``python -m train clip``):

- ``digits`` (the offline default): scikit-learn's 8x8 digits, each training
  image captioned in every phrasing of :data:`DIGIT_PHRASES` ("a handwritten
  7", "a photo of the digit seven", ...); 20% of the images held out;
- a caption folder: ``ROOT/captions.jsonl``, one JSON object per line,
  ``{"image": "images/x.png", "caption": "...", "label": "cat", "split":
  "val"}`` (``image`` relative to ROOT; ``label`` optional, for zero-shot
  classification; ``split`` optional: ``train`` or ``val``, else 20% of the
  images held out);
- ``hf:NAME``: a Hugging Face dataset (from the Hub, or a local copy saved
  with ``DatasetDict.save_to_disk``) with an image column and a caption column
  (a string or a list of strings), and optionally a class label.

Evaluation: image-to-text and text-to-image recall@1/5 over the held-out
pairs, where captions with the same text are one caption (an image with
several captions is found by any of them), and zero-shot accuracy: each class
is the mean embedding of its prompts, each held-out image takes the nearest.
"""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple
from typing import Optional

import numpy as np

from train import data as data_lib

DIGIT_NAMES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
# {name}: the digit's word; {digit}: its numeral
DIGIT_PHRASES = (
    "a photo of the digit {name}",
    "a handwritten {digit}",
    "the number {name}",
    "an image of a {digit}",
    "a blurry picture of a {name}",
    "a small drawing of the numeral {digit}",
    "{name}",
    "a scanned {name}, written by hand",
)
# zero-shot prompts for labelled folders and Hugging Face datasets
PROMPTS = ("a photo of a {}.", "a picture of a {}.", "{}")


class Pairs(NamedTuple):
  """Images, captions and which caption goes with which image."""

  images: np.ndarray  # (n_images, H, W, C) float32 in [0, 1]
  captions: list[str]  # unique
  pairs: np.ndarray  # (n_pairs, 2) int: image index, caption index
  labels: Optional[np.ndarray] = None  # (n_images,) class ids, or None


class ImageText(NamedTuple):
  train: Pairs
  val: Pairs
  # class names and each class's prompts, for zero-shot accuracy (or None)
  classes: Optional[list[str]]
  prompts: Optional[list[list[str]]]
  description: str


def _pairs(images, captions_per_image, labels=None) -> Pairs:
  """``captions_per_image[i]``: image i's captions."""
  unique, pairs = {}, []
  for i, captions in enumerate(captions_per_image):
    for caption in captions:
      pairs.append((i, unique.setdefault(caption, len(unique))))
  return Pairs(
      np.asarray(images, np.float32),
      list(unique),
      np.asarray(pairs, np.int64).reshape(-1, 2),
      None if labels is None else np.asarray(labels, np.int32),
  )


def digit_captions(label: int) -> list[str]:
  return [p.format(name=DIGIT_NAMES[label], digit=label) for p in DIGIT_PHRASES]


def load_digits() -> ImageText:
  images = data_lib.load_images("digits", 8, 1)
  split = lambda x, y: _pairs(x, [digit_captions(int(c)) for c in y], y)
  return ImageText(
      split(images.train_x, images.train_y),
      split(images.val_x, images.val_y),
      list(DIGIT_NAMES),
      [digit_captions(c) for c in range(10)],
      f"scikit-learn digits ({len(images.train_x)} + {len(images.val_x)}"
      f" images) captioned in {len(DIGIT_PHRASES)} phrasings",
  )


def _labelled(labels: list[Optional[str]]):
  """Class ids and names when every record has a label, else (None, None)."""
  if not labels or any(label is None for label in labels):
    return None, None
  names = sorted(set(labels))
  return [names.index(label) for label in labels], names


def _split(records: list[dict], where: str, seed: int = 0):
  """``records`` (dicts with image, captions, label, split) -> train and val
  lists; without splits, 20% of them held out."""
  if any(r["split"] for r in records):
    train = [r for r in records if r["split"] != "val"]
    val = [r for r in records if r["split"] == "val"]
  else:
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(int(len(records) * 0.2), 1)
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
  if not train or not val:
    raise data_lib.DataError(
        f"{where}: needs images for training and for validation, has"
        f" {len(train)} and {len(val)}"
    )
  return train, val


def _image_text(records, image_size, channels, where, description):
  train, val = _split(records, where)
  labels, classes = _labelled([r["label"] for r in records])

  def pairs(part):
    ids = None
    if labels is not None:
      ids = [classes.index(r["label"]) for r in part]
    images = [
        data_lib.fit_image(r["image"], image_size, channels) for r in part
    ]
    return _pairs(images, [r["captions"] for r in part], ids)

  return ImageText(
      pairs(train),
      pairs(val),
      classes,
      None
      if classes is None
      else [[p.format(c) for p in PROMPTS] for c in classes],
      description,
  )


def load_folder(root: str, image_size: int, channels: int) -> ImageText:
  """A caption folder (see the module's docstring). Errors name the file and
  line."""
  from PIL import Image

  base = pathlib.Path(root)
  index = base / "captions.jsonl"
  if not index.is_file():
    raise data_lib.DataError(
        f"{root}: no captions.jsonl (one JSON object per line: image,"
        " caption[, label, split])"
    )
  by_image: dict[str, dict] = {}
  for number, line in enumerate(index.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"{index}, line {number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise data_lib.DataError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), str) for k in ("image", "caption")
    ):
      raise data_lib.DataError(
          f"{where}: expected an object with string fields 'image' and"
          " 'caption'"
      )
    if record.get("split") not in (None, "train", "val"):
      raise data_lib.DataError(
          f"{where}: split {record['split']!r} is neither 'train' nor 'val'"
      )
    path = base / record["image"]
    if not path.is_file():
      raise data_lib.DataError(f"{where}: image {path} does not exist")
    entry = by_image.setdefault(
        record["image"],
        dict(path=path, captions=[], label=None, split=None, where=where),
    )
    entry["captions"].append(record["caption"])
    for key in ("label", "split"):
      if record.get(key) is not None:
        if entry[key] not in (None, record[key]):
          raise data_lib.DataError(
              f"{where}: {key} {record[key]!r} differs from"
              f" {entry[key]!r} given for {record['image']} earlier"
          )
        entry[key] = str(record[key])
  if not by_image:
    raise data_lib.DataError(f"{index}: no captions")
  records = []
  for entry in by_image.values():
    try:
      with Image.open(entry["path"]) as image:
        image.load()
        records.append(dict(entry, image=image.copy()))
    except OSError as e:
      raise data_lib.DataError(
          f"{entry['where']}: cannot read image {entry['path']} ({e})"
      ) from None
  return _image_text(
      records,
      image_size,
      channels,
      str(index),
      f"{root} ({len(records)} images)",
  )


def load_hf(name: str, image_size: int, channels: int) -> ImageText:
  import datasets

  # a copy saved with DatasetDict.save_to_disk, or a Hub name
  if pathlib.Path(name).is_dir():
    ds = datasets.load_from_disk(name)
  else:
    ds = data_lib.hf_dataset(name)
  split_names = list(ds)
  features = ds[split_names[0]].features
  image_col = next(
      (c for c, f in features.items() if isinstance(f, datasets.Image)), None
  )
  text_col = next(
      (
          c
          for c in ("caption", "captions", "text", "sentences", "sentence")
          if c in features
      ),
      None,
  )
  label_col = next(
      (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)),
      None,
  )
  if image_col is None or text_col is None:
    raise data_lib.DataError(
        f"hf:{name} needs an image column and a caption column (caption,"
        f" captions, text, sentences); it has {dict(features)}"
    )
  val_name = data_lib.held_out_split(ds)
  records = []
  for split in split_names:
    if split not in ("train", val_name):
      continue
    part = ds[split]
    labels = part[label_col] if label_col else [None] * len(part)
    for image, text, label in zip(part[image_col], part[text_col], labels):
      records.append(
          dict(
              image=image,
              captions=[text] if isinstance(text, str) else list(text),
              label=(
                  None if label is None else features[label_col].int2str(label)
              ),
              split=None
              if val_name is None
              else ("val" if split == val_name else "train"),
          )
      )
  return _image_text(records, image_size, channels, f"hf:{name}", f"hf:{name}")


def load(spec: str, image_size: int, channels: int) -> ImageText:
  if spec == "digits":
    if (image_size, channels) != (8, 1):
      raise data_lib.DataError(
          "digits are 8x8 grayscale; the model expects"
          f" {image_size}x{image_size}x{channels}"
      )
    return load_digits()
  if spec.startswith("hf:"):
    return load_hf(spec[3:], image_size, channels)
  if not pathlib.Path(spec).is_dir():
    raise data_lib.DataError(f"caption folder {spec!r} is not a directory")
  return load_folder(spec, image_size, channels)


# ---------------------------------------------------------------------------
# the objective and the metrics (NumPy or jax.numpy alike where marked)


def contrastive_loss(logits, weights=None):
  """Symmetric InfoNCE: the mean of the image->text and text->image
  cross-entropies of ``logits`` (n, n), pair i on the diagonal; rows and
  columns of weight 0 take no part. Works on jax arrays.

  A caption drawn twice in a batch (or an image) is no false negative of
  itself: its two columns are equal, and the loss and its gradients are those
  of multi-positive targets (each row's target spread over the pairs sharing
  its text), as tests/test_clip.py checks. What a batch of random pairs does
  hold is pairs of one class under other captions, each a negative of the
  others; ``--contrastive-batches distinct`` draws fewer of them.
  """
  import jax
  import jax.numpy as jnp

  n = logits.shape[0]
  weights = jnp.ones(n) if weights is None else weights
  real = weights > 0
  masked = jnp.where(real[None, :] & real[:, None], logits, -jnp.inf)
  masked = jnp.where(jnp.eye(n, dtype=bool), logits, masked)

  def cross_entropy(x):  # row i's loss at column i
    return jax.nn.logsumexp(x, axis=1) - jnp.diagonal(x)

  per_pair = 0.5 * (cross_entropy(masked) + cross_entropy(masked.T))
  return (per_pair * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def distinct_pairs(
    pairs: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
  """``n`` indices of ``pairs`` ((image, caption) rows) in random order, no two
  of which share an image or a caption while such pairs remain; past that
  (data with fewer than ``n`` distinct captions) the rest are drawn freely."""
  order = rng.permutation(len(pairs))
  images, captions, picked = set(), set(), []
  for i in order:
    image, caption = pairs[i]
    if image not in images and caption not in captions:
      images.add(image)
      captions.add(caption)
      picked.append(i)
      if len(picked) == n:
        return np.asarray(picked)
  rest = rng.integers(0, len(pairs), n - len(picked))
  return np.concatenate([np.asarray(picked, np.int64), rest])


def recall_at(similarity: np.ndarray, positive: np.ndarray, k: int) -> float:
  """The share of queries (rows with a positive) whose ``k`` most similar
  candidates hold a positive: ``similarity`` and ``positive`` (queries,
  candidates)."""
  has = positive.any(axis=1)
  top = np.argsort(-similarity[has], axis=1, kind="stable")[:, :k]
  return float(np.take_along_axis(positive[has], top, axis=1).any(1).mean())


def zero_shot_accuracy(
    image_embeddings: np.ndarray,
    labels: np.ndarray,
    prompt_embeddings: np.ndarray,
    prompt_classes: np.ndarray,
) -> float:
  """Each class is the normalised mean of its prompts' unit embeddings; each
  image takes the class nearest in cosine."""
  n_classes = int(prompt_classes.max()) + 1
  centres = np.stack(
      [prompt_embeddings[prompt_classes == c].mean(0) for c in range(n_classes)]
  )
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  return float(((image_embeddings @ centres.T).argmax(1) == labels).mean())
