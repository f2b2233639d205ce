"""Every data loader, on small local files; none needs the network."""

import numpy as np
import pytest
from PIL import Image

from train import data


def _write_images(root, classes=("cat", "dog"), per_class=3, size=10):
  rng = np.random.default_rng(0)
  for c in classes:
    (root / c).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(
          (rng.random((size, size, 3)) * 255).astype(np.uint8)
      ).save(root / c / f"{i}.png")


def test_stdlib_corpus_is_real_python_with_a_held_out_tail():
  text = data.load_text("stdlib", max_bytes=200_000)
  assert len(text.train) + len(text.val) == 200_000
  assert len(text.val) == int(200_000 * data.VAL_FRACTION)
  sample = bytes(text.train[:20_000]).decode("utf-8", errors="replace")
  assert "def " in sample and "import " in sample
  # bytes of English-like code
  assert 2.5 < data.unigram_entropy(text.train) < 5.0


def test_local_text_file_and_directory(tmp_path):
  (tmp_path / "a.txt").write_text("alpha " * 500)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("beta " * 500)
  one = data.load_text(str(tmp_path / "a.txt"))
  assert (
      bytes(one.train[:6]) == b"alpha "
      and len(one.train) + len(one.val) == 3000
  )
  both = data.load_text(str(tmp_path))
  assert len(both.train) + len(both.val) == 3000 + 1 + 2500
  # the held-out tail comes from the last file
  assert bytes(both.val).endswith(b"beta ")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.txt"), "does not exist"),
        (
            lambda p: (p / "empty.txt").write_text("")
            and None
            or str(p / "empty.txt"),
            "at least 2 KiB",
        ),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "holds 0 bytes"),
    ],
)
def test_bad_text_paths(tmp_path, make, message):
  with pytest.raises(data.DataError, match=message):
    data.load_text(make(tmp_path))


def test_text_batches_are_a_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.int64) % 256
  x, y = data.text_batch(tokens, step=5, batch_size=4, seq_len=16, seed=0)
  assert x.shape == y.shape == (4, 16)
  # targets are the inputs shifted by one
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  again, _ = data.text_batch(tokens, step=5, batch_size=4, seq_len=16, seed=0)
  other, _ = data.text_batch(tokens, step=6, batch_size=4, seq_len=16, seed=0)
  np.testing.assert_array_equal(x, again)
  assert not np.array_equal(x, other)
  evals = list(
      data.eval_text_batches(tokens, batch_size=4, seq_len=16, max_batches=3)
  )
  assert len(evals) == 3 and evals[0][0][0, 0] == 0 and evals[0][0][1, 0] == 16


def test_digits():
  images = data.load_images("digits", image_size=8, channels=1)
  assert images.train_x.shape[1:] == (8, 8, 1) and images.num_classes == 10
  assert len(images.train_x) + len(images.val_x) == 1797
  assert 0.0 <= images.train_x.min() and images.train_x.max() <= 1.0
  with pytest.raises(data.DataError, match="8x8 grayscale"):
    data.load_images("digits", image_size=32, channels=3)


def test_image_folder_flat_and_split(tmp_path):
  _write_images(tmp_path / "flat", per_class=5)
  flat = data.load_images(str(tmp_path / "flat"), image_size=4, channels=3)
  assert flat.num_classes == 2 and flat.train_x.shape[1:] == (4, 4, 3)
  assert len(flat.train_x) + len(flat.val_x) == 10
  _write_images(tmp_path / "split" / "train")
  _write_images(tmp_path / "split" / "val", per_class=2)
  split = data.load_images(str(tmp_path / "split"), image_size=8, channels=1)
  assert (len(split.train_x), len(split.val_x)) == (
      6,
      4,
  ) and split.train_x.shape[1:] == (8, 8, 1)
  assert sorted(split.val_y.tolist()) == [0, 0, 1, 1]
  with pytest.raises(data.DataError, match="at least two class folders"):
    (tmp_path / "none").mkdir()
    data.load_images(str(tmp_path / "none"), image_size=8, channels=1)


def test_hugging_face_loaders_on_local_dataset_dirs(tmp_path):
  text_dir = tmp_path / "text"
  text_dir.mkdir()
  (text_dir / "train.txt").write_text(
      "\n".join(f"training line {i}" for i in range(300))
  )
  (text_dir / "test.txt").write_text(
      "\n".join(f"held-out line {i}" for i in range(50))
  )
  text = data.load_text(f"hf:{text_dir}")
  assert (
      bytes(text.train[:15]) == b"training line 0"
      and bytes(text.val[:15]) == b"held-out line 0"
  )
  _write_images(tmp_path / "images" / "train")
  _write_images(tmp_path / "images" / "test", per_class=1)
  images = data.load_images(
      f"hf:{tmp_path / 'images'}", image_size=8, channels=3
  )
  assert (
      images.num_classes == 2
      and images.train_x.shape == (6, 8, 8, 3)
      and len(images.val_x) == 2
  )
  with pytest.raises(
      data.DataError, match="could not load Hugging Face dataset"
  ):
    data.load_text(f"hf:{tmp_path / 'missing'}")
