"""CLIP: the contrastive objective and retrieval metrics against NumPy
statements, the caption-folder loader and its errors, and training from the
CLI on the offline default (digits with generated captions)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from models import clip
from train import data as data_lib
from train import image_text
from train import loop
from train import tokenizer as tokenizer_lib
from train.config import TrainConfig
from train.objectives import OBJECTIVES


def _numpy_infonce(logits, weights):
  """float64: the mean over real pairs of the image->text and text->image
  cross-entropies, other real pairs as the negatives."""
  logits = np.asarray(logits, np.float64)
  real = np.flatnonzero(weights)
  sub = logits[np.ix_(real, real)]

  def ce(x):
    return np.log(np.exp(x).sum(1)) - np.diag(x)

  return float(np.mean(0.5 * (ce(sub) + ce(sub.T))))


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 6)) * 3
  got = image_text.contrastive_loss(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(got, _numpy_infonce(logits, np.ones(6)), rtol=1e-5)
  weights = np.array([1, 1, 0, 1, 0, 1], np.float32)
  got = image_text.contrastive_loss(jnp.asarray(logits, jnp.float32), weights)
  np.testing.assert_allclose(got, _numpy_infonce(logits, weights), rtol=1e-5)
  # matched pairs on the diagonal lower it
  assert image_text.contrastive_loss(jnp.eye(6) * 10) < 0.01


def test_a_repeated_caption_is_no_false_negative_of_itself():
  """With a caption (or an image) drawn twice, the diagonal InfoNCE has the
  loss and the gradients of multi-positive targets (NumPy's statement: each
  row's target spread over the pairs sharing its image or caption)."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  captions = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  # (image, caption) of each pair: caption 0 twice, image 2 twice
  groups = np.array([[0, 0], [1, 0], [2, 1], [2, 2], [3, 3], [4, 4]])
  same = (groups[:, None, :] == groups[None, :, :]).any(-1)
  targets = jnp.asarray(same / same.sum(1, keepdims=True), jnp.float32)

  def multi_positive(x):
    ce = lambda x, t: -(t * jax.nn.log_softmax(x, axis=1)).sum(1)
    return jnp.mean(0.5 * (ce(x, targets) + ce(x.T, targets.T)))

  def loss(fn, images, captions):
    logits = images[groups[:, 0]] @ captions[groups[:, 1]].T
    return fn(logits)

  for argnums in (1, 2):
    diagonal = jax.value_and_grad(loss, argnums)(
        image_text.contrastive_loss, images, captions
    )
    multi = jax.value_and_grad(loss, argnums)(multi_positive, images, captions)
    np.testing.assert_allclose(diagonal[0], multi[0], rtol=1e-5)
    np.testing.assert_allclose(diagonal[1], multi[1], rtol=1e-4, atol=1e-6)


def test_distinct_batches_repeat_no_image_and_no_caption():
  data = image_text.load_digits()
  pairs = data.train.pairs
  rng = np.random.default_rng(0)
  pick = image_text.distinct_pairs(pairs, 64, rng)
  images, captions = pairs[pick].T
  assert len(set(images)) == len(set(captions)) == 64
  # what the CLI trains on: distinct by default
  assert TrainConfig(model="clip").contrastive_batches == "distinct"
  for batches, unique in (("distinct", 64), ("random", None)):
    cfg = TrainConfig(model="clip", contrastive_batches=batches)
    objective = OBJECTIVES[cfg.objective]
    _, tokens = objective.batch(cfg, objective.load_data(cfg), 3, slice(None))
    n = len(np.unique(tokens, axis=0))
    assert n == unique if unique else n < 64  # 80 captions: repeats
  # fewer distinct captions than the batch: the rest is drawn freely
  few = np.array([[0, 0], [1, 0], [2, 1]])
  pick = image_text.distinct_pairs(few, 5, rng)
  assert len(pick) == 5 and len(set(few[pick[:2]][:, 1])) == 2


def test_recall_and_zero_shot_on_hand_made_embeddings():
  # three images; texts 0 and 1 belong to image 0, text 2 to image 1, text 3
  # to image 2
  images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  texts = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
  positive = np.zeros((3, 4), bool)
  positive[0, [0, 1]] = positive[1, 2] = positive[2, 3] = True
  sim = images @ texts.T
  # image 0's nearest is text 1 (a hit); image 1's is text 0 (a miss, text 2
  # second); image 2's is text 2 (a miss, text 3 second)
  assert image_text.recall_at(sim, positive, 1) == pytest.approx(1 / 3)
  assert image_text.recall_at(sim, positive, 2) == pytest.approx(1.0)
  # text -> image: text 0 -> image 1 (miss), 1 -> 0 (hit), 2 -> 2 (miss),
  # 3 -> 2 (hit)
  assert image_text.recall_at(sim.T, positive.T, 1) == pytest.approx(0.5)
  # zero-shot: class 0 prompts point along x, class 1 along y
  prompts = np.array([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
  prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
  accuracy = image_text.zero_shot_accuracy(
      images, np.array([0, 1, 0]), prompts, np.array([0, 0, 1])
  )
  assert accuracy == pytest.approx(2 / 3)  # image 2 is nearer class 1


def test_digit_captions_and_held_out_pairs():
  data = image_text.load_digits()
  assert len(data.train.captions) == len(data.val.captions) == 80
  assert "a handwritten 7" in data.train.captions
  assert "the number seven" in data.train.captions
  # every held-out image has each phrasing of its own digit
  assert len(data.val.pairs) == len(data.val.images) * 8
  image, caption = data.val.pairs[0]
  label = data.val.labels[image]
  assert data.val.captions[caption] in image_text.digit_captions(label)


def _folder(tmp_path, lines):
  (tmp_path / "images").mkdir()
  for i in range(6):
    Image.fromarray(np.full((4, 4), i * 40, np.uint8)).save(
        tmp_path / "images" / f"{i}.png"
    )
  (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return str(tmp_path)


def _record(i, **extra):
  return json.dumps(
      dict(image=f"images/{i}.png", caption=f"shade {i}", **extra)
  )


def test_caption_folder(tmp_path):
  lines = [
      _record(
          i,
          label="dark" if i < 3 else "light",
          split="val" if i in (2, 5) else "train",
      )
      for i in range(6)
  ]
  lines.append(
      _record(0, label="dark", split="train").replace("shade 0", "black")
  )
  data = image_text.load_folder(_folder(tmp_path, lines), 8, 1)
  assert data.train.images.shape == (4, 8, 8, 1)
  assert data.val.images.shape == (2, 8, 8, 1)
  assert data.classes == ["dark", "light"]
  assert list(data.val.labels) == [0, 1]
  # image 0 has two captions
  assert sorted(
      data.train.captions[c] for i, c in data.train.pairs if i == 0
  ) == [
      "black",
      "shade 0",
  ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"captions.jsonl, line 2: not JSON"),
        (
            json.dumps(dict(image="images/9.png", caption="x")),
            r"line 2: image .*9\.png does not exist",
        ),
        (json.dumps(dict(image="images/1.png")), r"line 2: expected an object"),
        (_record(1, split="test"), r"line 2: split 'test'"),
    ],
)
def test_caption_folder_errors_name_the_file_and_line(tmp_path, line, message):
  root = _folder(tmp_path, [_record(0), line])
  with pytest.raises(data_lib.DataError, match=message):
    image_text.load_folder(root, 8, 1)


def test_hugging_face_image_caption_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  image = lambda v: Image.fromarray(np.full((4, 4, 3), v, np.uint8))
  features = datasets.Features({
      "image": datasets.Image(),
      "captions": datasets.Sequence(datasets.Value("string")),
      "label": datasets.ClassLabel(names=["dark", "light"]),
  })
  split = lambda values: datasets.Dataset.from_dict(
      {
          "image": [image(v) for v in values],
          "captions": [[f"shade {v}", f"tone {v}"] for v in values],
          "label": [int(v > 100) for v in values],
      },
      features=features,
  )
  datasets.DatasetDict(
      train=split([0, 50, 150, 200]), validation=split([20, 220])
  ).save_to_disk(str(tmp_path / "ds"))
  data = image_text.load(f"hf:{tmp_path / 'ds'}", 8, 1)
  assert data.train.images.shape == (4, 8, 8, 1)
  assert len(data.train.pairs) == 8  # two captions per image
  assert data.classes == ["dark", "light"]
  assert list(data.val.labels) == [0, 1]
  assert data.prompts[1][0] == "a photo of a light."


def test_captions_end_in_the_end_of_text_token():
  tok = tokenizer_lib.load("bytes")
  tokens, eot = tokenizer_lib.caption_tokens(tok, ["ab", "x" * 20], 8)
  assert eot == 256
  np.testing.assert_array_equal(tokens[0], [97, 98] + [256] * 6)
  assert tokens[1, -1] == 256 and (tokens[1, :-1] == ord("x")).all()


def test_text_tower_pools_the_first_end_of_text():
  model = clip.CLIP(clip.PRESETS["tiny"], rngs=nnx.Rngs(0))
  a = jnp.array([[5, 6, 256, 256, 256, 256]])
  b = jnp.array([[5, 6, 256, 9, 9, 9]])  # what follows the end cannot matter
  c = jnp.array([[5, 7, 256, 256, 256, 256]])
  ea, eb, ec = (model.embed_texts(x) for x in (a, b, c))
  np.testing.assert_allclose(ea, eb, atol=1e-6)
  assert np.abs(ea - ec).max() > 1e-4


def test_clip_trains_from_the_cli(tmp_path):
  cfg = TrainConfig(
      model="clip",
      preset="tiny",
      optimizer="galore_adamw",  # at clip's default learning rate
      # 160 steps: val loss 3.89, zero-shot 23% at seed 0, clear of the bounds
      steps=160,
      eval_every=160,
      out=str(tmp_path / "run"),
  )
  summary = loop.train(cfg, verbose=False).summary
  for key in (
      "val_image_to_text_r1",
      "val_image_to_text_r5",
      "val_text_to_image_r1",
      "val_text_to_image_r5",
      "val_zero_shot_accuracy",
  ):
    assert 0.0 <= summary[key] <= 1.0
  # below chance: the loss of a batch of 64 unrelated pairs is ln 64
  assert summary["val_loss"] < math.log(64) - 0.1
  assert summary["val_zero_shot_accuracy"] > 0.15  # chance is 0.1
  assert summary["tokenizer"] == "bytes"
  assert summary["optimizer_state_bytes"] < summary["adamw_state_bytes"]


def test_clip_fine_tunes_a_hugging_face_checkpoint_with_its_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  text = "\n".join(c for d in range(10) for c in image_text.digit_captions(d))
  bpe = tokenizer_lib.train_bpe(text.encode() * 20, 300)
  tokenizer_dir = tmp_path / "tokenizer"
  tokenizer_dir.mkdir()
  bpe.save(str(tokenizer_dir / "tokenizer.json"))
  tower = dict(
      hidden_size=32,
      intermediate_size=128,
      num_hidden_layers=1,
      num_attention_heads=4,
  )
  checkpoint = tmp_path / "clip"
  transformers.CLIPModel(
      transformers.CLIPConfig(
          text_config=dict(
              vocab_size=300,
              max_position_embeddings=24,
              eos_token_id=bpe.token_to_id(tokenizer_lib.EOT),
              **tower,
          ),
          vision_config=dict(
              image_size=8, patch_size=2, num_channels=1, **tower
          ),
          projection_dim=16,
      )
  ).save_pretrained(checkpoint)
  run = lambda name, **kw: loop.train(
      TrainConfig(
          model="clip",
          init=str(checkpoint),
          optimizer="adamw",
          steps=2,
          eval_every=2,
          batch_size=16,
          out=str(tmp_path / name),
          **kw,
      ),
      verbose=False,
  )
  with pytest.raises(
      ValueError, match="embeds 300 token ids; --tokenizer bytes"
  ):
    run("bytes")
  summary = run("bpe", tokenizer=f"hf:{tokenizer_dir}").summary
  assert summary["tokenizer"].startswith("hf:")
  assert 0.0 <= summary["val_zero_shot_accuracy"] <= 1.0
