"""Tokenizers (--tokenizer bytes | bpe:N | hf:NAME), bits per byte, and token
files for corpora larger than memory (--memmap)."""

import json
import math
import os

import numpy as np
import pytest

from train import corpus
from train import data as data_lib
from train import loop
from train import tokenizer as tokenizer_lib
from train.config import TrainConfig
from train.objectives import causal_lm

TEXT = (
    "def héllo(world):\n    return world + 'ünïcode ✓'\n\n" * 40
    + "class Thing:\n    pass\n" * 40
).encode()


def test_bpe_training_is_deterministic_and_resumes(tmp_path):
  a = tokenizer_lib.train_bpe(TEXT, 300)
  b = tokenizer_lib.train_bpe(TEXT, 300)
  assert a.to_str() == b.to_str()
  assert a.get_vocab_size() == 300
  first = tokenizer_lib.load("bpe:300", TEXT, str(tmp_path))
  assert (tmp_path / "tokenizer.json").is_file()
  # a resumed run reads its own tokenizer back, whatever text it is given,
  # and text given as a callable is not even read
  again = tokenizer_lib.load("bpe:300", b"other text " * 100, str(tmp_path))
  assert again.identity == first.identity
  unread = lambda: pytest.fail("read the text of a saved tokenizer")
  assert tokenizer_lib.load("bpe:300", unread, str(tmp_path)).identity == (
      first.identity
  )
  assert tokenizer_lib.load("bpe:300", lambda: TEXT).identity == first.identity
  assert first.eot == first.backend.token_to_id(tokenizer_lib.EOT)
  # another size is trained anew
  assert tokenizer_lib.load("bpe:280", TEXT, str(tmp_path)).vocab_size == 280


def test_token_ends_are_byte_offsets():
  tok = tokenizer_lib.load("bpe:300", TEXT)
  ids, ends = tokenizer_lib.encode(tok, TEXT)
  assert len(ids) < len(TEXT) / 2  # merges were learnt
  assert ends[-1] == len(TEXT) and (np.diff(ends) >= 0).all()
  for k in (1, 7, 50, 333):  # the first k tokens decode to the first bytes
    decoded = tok.backend.decode(ids[:k].tolist()).encode()
    if ends[k - 1] == ends[k]:  # a character split over two tokens
      continue
    assert decoded == TEXT[: ends[k - 1]]
  ids, ends = tokenizer_lib.encode(tokenizer_lib.load("bytes"), TEXT)
  np.testing.assert_array_equal(ids, np.frombuffer(TEXT, np.uint8))
  np.testing.assert_array_equal(ends, np.arange(1, len(TEXT) + 1))


def test_eval_batches_count_the_bytes_of_their_targets():
  tokens = np.arange(100)
  ends = np.cumsum(np.arange(1, 101))  # token i stands for i + 1 bytes
  batches = list(data_lib.eval_text_batches(tokens, 2, 5, 3, ends))
  assert len(batches) == 3
  _, targets, target_bytes = batches[0]
  np.testing.assert_array_equal(targets[0], [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(
      target_bytes, [2 + 3 + 4 + 5 + 6, 7 + 8 + 9 + 10 + 11]
  )


def test_unknown_tokenizers_are_refused():
  with pytest.raises(
      tokenizer_lib.TokenizerError, match="bytes, bpe:N or hf:NAME"
  ):
    tokenizer_lib.load("sentencepiece")
  with pytest.raises(tokenizer_lib.TokenizerError, match="expected bpe:N"):
    tokenizer_lib.load("bpe:big")
  with pytest.raises(
      ValueError,
      match=(
          "--tokenizer is an option of --objective causal_lm, contrastive,"
          " masked_lm, sequence_classification, not of image_classification"
      ),
  ):
    TrainConfig(model="vit", tokenizer="bpe:300")


def _run(tmp_path, name, **fields):
  cfg = TrainConfig(
      model="gpt2",
      preset="tiny",
      steps=4,
      eval_every=4,
      batch_size=4,
      seq_len=32,
      eval_batches=2,
      out=str(tmp_path / name),
      **{"max_data_bytes": 2**20, **fields},
  )
  return loop.train(cfg, verbose=False).summary


def test_gpt2_reports_bits_per_byte_with_any_tokenizer(tmp_path):
  data = tmp_path / "text.txt"
  data.write_bytes(TEXT * 4)
  plain = _run(tmp_path, "bytes", data=str(data))
  # one byte per token: bits per byte is the loss in bits
  assert plain["val_bpb"] == pytest.approx(plain["val_loss"] / math.log(2))
  bpe = _run(tmp_path, "bpe", data=str(data), tokenizer="bpe:300")
  assert bpe["tokenizer"].startswith("bpe:300@")
  assert (tmp_path / "bpe" / "tokenizer.json").is_file()
  # a token stands for more than one byte
  assert bpe["val_bpb"] < bpe["val_loss"] / math.log(2)


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
  transformers = pytest.importorskip("transformers")
  ckpt = tmp_path / "gpt2"
  transformers.GPT2LMHeadModel(
      transformers.GPT2Config(
          vocab_size=290, n_positions=64, n_embd=32, n_layer=1, n_head=4
      )
  ).save_pretrained(ckpt)
  tokenizer_dir = tmp_path / "tok"
  tokenizer_dir.mkdir()
  tokenizer_lib.train_bpe(TEXT, 300).save(str(tokenizer_dir / "tokenizer.json"))
  with pytest.raises(
      ValueError, match=r"embeds 290 token ids; --tokenizer bytes gives 256"
  ):
    _run(tmp_path, "a", init=str(ckpt))
  with pytest.raises(
      ValueError, match=rf"embeds 290 .* hf:{tokenizer_dir} gives 300"
  ):
    _run(tmp_path, "b", init=str(ckpt), tokenizer=f"hf:{tokenizer_dir}")
  # the checkpoint's own tokenizer (290 tokens) fits
  tokenizer_lib.train_bpe(TEXT, 290).save(str(tokenizer_dir / "tokenizer.json"))
  summary = _run(tmp_path, "c", init=str(ckpt), tokenizer=f"hf:{tokenizer_dir}")
  assert summary["tokenizer"].startswith(f"hf:{tokenizer_dir}@")


def _corpus(root, files=5):
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(files):
    words = rng.choice(["alpha", "beta", "gamma", "δelta", "\n"], 3000)
    (root / f"part{i:02d}.txt").write_text(" ".join(words))
  return str(root)


def test_token_files_equal_the_in_memory_tokens(tmp_path):
  root = _corpus(tmp_path / "corpus")
  tok = tokenizer_lib.load("bytes")
  mapped = corpus.open_tokens(root, tok)
  in_memory = data_lib.load_text(root, 2**30)
  assert isinstance(mapped.train, np.memmap)
  np.testing.assert_array_equal(mapped.train, in_memory.train)
  np.testing.assert_array_equal(mapped.val, in_memory.val)
  meta = json.loads((corpus.cache_dir(root, tok) / corpus.META).read_text())
  assert meta["tokenizer"] == "bytes" and len(meta["sources"]) == 5


def test_token_files_cut_into_pieces_give_the_whole_texts_tokens(
    tmp_path, monkeypatch
):
  root = _corpus(tmp_path / "corpus")
  tok = tokenizer_lib.load("bytes")
  monkeypatch.setattr(corpus, "CHUNK_BYTES", 1000)  # many pieces per file
  mapped = corpus.open_tokens(root, tok)
  in_memory = data_lib.load_text(root, 2**30)
  np.testing.assert_array_equal(mapped.train, in_memory.train)
  np.testing.assert_array_equal(
      mapped.val_ends, np.arange(1, len(in_memory.val) + 1)
  )


def test_token_files_are_rebuilt_when_the_data_or_tokenizer_changes(tmp_path):
  root = _corpus(tmp_path / "corpus")
  tok = tokenizer_lib.load("bytes")
  first = corpus.open_tokens(root, tok)
  built = os.path.getmtime(corpus.cache_dir(root, tok) / corpus.META)
  corpus.open_tokens(root, tok)  # reused
  assert os.path.getmtime(corpus.cache_dir(root, tok) / corpus.META) == built
  with open(os.path.join(root, "part00.txt"), "a") as f:
    f.write(" more words")
  second = corpus.open_tokens(root, tok)
  total = lambda d: len(d.train) + len(d.val)
  assert total(second) == total(first) + len(" more words")
  bpe = tokenizer_lib.load("bpe:300", TEXT)
  other = corpus.open_tokens(root, bpe)
  assert corpus.cache_dir(root, bpe) != corpus.cache_dir(root, tok)
  assert total(other) < total(second)


def test_window_batches_are_a_function_of_seed_and_step(tmp_path):
  tokens = np.arange(10_000)  # each token is its position
  x, y = corpus.window_batch(tokens, 3, 8, 16, seed=0)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  again, _ = corpus.window_batch(tokens, 3, 8, 16, seed=0)
  np.testing.assert_array_equal(x, again)
  # a process's rows are those rows of the whole batch
  part, _ = corpus.window_batch(tokens, 3, 8, 16, seed=0, rows=slice(4, 8))
  np.testing.assert_array_equal(part, x[4:])
  other, _ = corpus.window_batch(tokens, 4, 8, 16, seed=0)
  assert not np.array_equal(x, other)
  # every window starts at a multiple of seq_len, and an epoch visits each once
  n = (len(tokens) - 1) // 16
  starts = np.concatenate(
      [corpus.window_batch(tokens, s, 8, 16, 0)[0][:, 0] for s in range(n // 8)]
  )
  assert len(set(starts.tolist())) == len(starts) and (starts % 16 == 0).all()


def test_gpt2_trains_and_resumes_on_token_files(tmp_path):
  root = _corpus(tmp_path / "corpus")
  whole = _run(tmp_path, "whole", data=root, memmap=True)
  cfg = TrainConfig(
      model="gpt2",
      preset="tiny",
      steps=4,
      eval_every=4,
      batch_size=4,
      seq_len=32,
      eval_batches=2,
      data=root,
      memmap=True,
      checkpoint_every=2,
      out=str(tmp_path / "split"),
  )
  loop.train(cfg, stop_after=2, verbose=False)
  resumed = loop.train(
      TrainConfig(**{**cfg.__dict__, "resume": True}), verbose=False
  ).summary
  assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
  assert (tmp_path / "corpus.tokens" / "bytes" / "train.bin").is_file()


def test_memmap_is_refused_for_data_read_in_memory(tmp_path):
  with pytest.raises(data_lib.DataError, match="--memmap reads local files"):
    corpus.open_tokens("stdlib", tokenizer_lib.load("bytes"))
  # from the CLI's loader, before a bpe tokenizer is trained on anything
  cfg = TrainConfig(
      model="gpt2", memmap=True, tokenizer="bpe:300", out=str(tmp_path / "run")
  )
  with pytest.raises(data_lib.DataError, match="--memmap reads local files"):
    causal_lm.load_tokens(cfg)
  assert not (tmp_path / "run" / tokenizer_lib.FILE).exists()


def test_bert_reads_any_tokenizer_with_its_special_tokens(tmp_path):
  transformers = pytest.importorskip("transformers")
  from train import finetune

  specials = [t[0] for t in finetune.SPECIALS.values()]
  bpe = tokenizer_lib.train_bpe(TEXT, 300, specials)
  tokenizer_dir = tmp_path / "tok"
  tokenizer_dir.mkdir()
  bpe.save(str(tokenizer_dir / "tokenizer.json"))
  vocab = finetune.vocabulary(tokenizer_lib.load(f"hf:{tokenizer_dir}"))
  assert vocab.cls == bpe.token_to_id("[CLS]") and vocab.size == 300
  tokens, segments, mask = finetune.encode([b"def f"], [b"pass"], 16, vocab)
  n = mask.sum()
  assert tokens[0, 0] == vocab.cls and tokens[0, n - 1] == vocab.sep
  assert (tokens[0, n:] == vocab.pad).all() and segments[0, n - 1] == 1
  # a GPT-2-style tokenizer has no [PAD]: named
  with pytest.raises(data_lib.DataError, match=r"no \[PAD\] or <pad> token"):
    finetune.vocabulary(tokenizer_lib.load("bpe:300", TEXT))
  checkpoint = tmp_path / "bert"
  transformers.BertForMaskedLM(
      transformers.BertConfig(
          vocab_size=300,
          hidden_size=32,
          num_hidden_layers=1,
          num_attention_heads=4,
          intermediate_size=64,
          max_position_embeddings=64,
      )
  ).save_pretrained(checkpoint)
  run = lambda name, **kw: loop.train(
      TrainConfig(
          model="bert",
          init=str(checkpoint),
          finetune="stdlib:next",
          optimizer="adamw",
          steps=2,
          eval_every=2,
          batch_size=8,
          seq_len=32,
          out=str(tmp_path / name),
          **kw,
      ),
      verbose=False,
  )
  with pytest.raises(
      ValueError, match="embeds 300 token ids; --tokenizer bytes gives 260"
  ):
    run("bytes")
  summary = run("tokenized", tokenizer=f"hf:{tokenizer_dir}").summary
  assert 0.0 <= summary["val_accuracy"] <= 1.0
  # masked-LM pretraining with a BPE trained on the run's text
  pretrain = loop.train(
      TrainConfig(
          model="bert",
          preset="tiny",
          tokenizer="bpe:400",
          steps=2,
          eval_every=2,
          batch_size=8,
          seq_len=32,
          eval_batches=1,
          max_data_bytes=2**20,
          out=str(tmp_path / "mlm"),
      ),
      verbose=False,
  ).summary
  assert "val_masked_accuracy" in pretrain
  saved = tokenizer_lib.load("bpe:400", b"", str(tmp_path / "mlm"))
  assert saved.token_id("[MASK]") is not None
