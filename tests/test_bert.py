"""The BERT task: masked-LM windows, the offline fine-tuning tasks, GLUE's
metrics, and the CLI from pretraining to fine-tuning."""

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sk

from train import finetune
from train import loop
from train.__main__ import main
from train.__main__ import parse
from train.config import TrainConfig
from train.data import load_text

TEXT = np.frombuffer(
    b"".join(
        b"def function_%d(argument, other):\n    return argument + other\n" % i
        for i in range(200)
    ),
    np.uint8,
)


def test_mlm_windows_corrupt_about_15_percent_as_bert_does():
  rng = np.random.default_rng(0)
  tokens, segments, mask, targets, weights = finetune.mlm_batch(
      TEXT, rng, 64, 64
  )
  assert tokens.shape == targets.shape == weights.shape == (64, 64)
  assert (tokens[:, 0] == finetune.CLS).all()
  assert (tokens[:, -1] == finetune.SEP).all()
  assert mask.all() and (segments == 0).all()
  chosen = weights.astype(bool)
  assert not chosen[:, [0, -1]].any()
  assert 0.12 < chosen[:, 1:-1].mean() < 0.18
  # outside the chosen positions the input is the text itself
  np.testing.assert_array_equal(tokens[~chosen], targets[~chosen])
  masked = tokens[chosen] == finetune.MASK
  assert 0.75 < masked.mean() < 0.85
  kept = tokens[chosen] == targets[chosen]
  assert 0.05 < kept.mean() < 0.16  # 10%, plus random bytes that hit


def test_pairs_and_single_sentences_are_encoded_with_segments_and_padding():
  tokens, segments, mask = finetune.encode([b"ab", b"c"], [b"xyz", b"w"], 12)
  cls, sep, pad = finetune.CLS, finetune.SEP, finetune.PAD
  assert (
      tokens[0].tolist() == [cls, 97, 98, sep, 120, 121, 122, sep] + [pad] * 4
  )
  assert segments[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
  assert mask[1].tolist() == [True] * 5 + [False] * 7
  single, segments, _ = finetune.encode([b"abcdefghijklmn"], None, 6)
  assert single[0].tolist() == [cls, 97, 98, 99, 100, sep]
  assert (segments == 0).all()


def test_the_offline_tasks_hold_a_real_signal():
  lines = finetune.text_lines(TEXT, 1)
  rng = np.random.default_rng(0)
  picks = rng.integers(0, len(lines) - 1, 400)
  pairs = finetune.next_line_examples(lines, rng, picks)
  for i, first, second, label in zip(
      picks, pairs.first, pairs.second, pairs.labels
  ):
    assert first == lines[i]
    assert label == (second == lines[i + 1])
    if label and first.startswith(b"def"):
      assert second.startswith(b"return")  # what follows a def here
  assert 0.3 < pairs.labels.mean() < 0.7

  lines = finetune.text_lines(TEXT, 3)
  ordered = finetune.word_order_examples(lines, rng, picks[picks < len(lines)])
  for text, label in zip(ordered.first, ordered.labels):
    assert label == (text in {b" ".join(line.split()) for line in lines})
  assert 0.3 < ordered.labels.mean() < 0.7


def test_every_validation_example_counts_once():
  data = finetune.load_offline("stdlib:order", TEXT, TEXT)
  n = len(data.val.labels)
  batches = list(finetune.classification_eval_batches(data, 16, 48))
  assert len(batches) == -(-n // 16)
  weights = np.concatenate([b[4] for b in batches])
  assert weights.sum() == n and (weights[:n] == 1).all()
  labels = np.concatenate([b[3] for b in batches])[:n]
  np.testing.assert_array_equal(labels, data.val.labels)
  again = list(finetune.classification_eval_batches(data, 16, 48))
  for x, y in zip(batches, again):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)
  with pytest.raises(finetune.DataError, match="unknown fine-tuning task"):
    finetune.load_offline("nope", TEXT, TEXT)


def test_glue_metrics_equal_scikit_learn_and_scipy():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 500)
  predictions = np.where(rng.random(500) < 0.7, labels, 1 - labels)
  assert finetune.accuracy(labels, predictions) == pytest.approx(
      sk.accuracy_score(labels, predictions)
  )
  assert finetune.f1(labels, predictions) == pytest.approx(
      sk.f1_score(labels, predictions)
  )
  assert finetune.matthews(labels, predictions) == pytest.approx(
      sk.matthews_corrcoef(labels, predictions)
  )
  assert finetune.matthews(labels, np.ones_like(labels)) == 0.0
  scores = rng.normal(size=300)
  targets = np.round(scores + rng.normal(size=300), 1)  # with ties
  assert finetune.pearson(targets, scores) == pytest.approx(
      scipy.stats.pearsonr(targets, scores)[0]
  )
  assert finetune.spearman(targets, scores) == pytest.approx(
      scipy.stats.spearmanr(targets, scores)[0]
  )


def _run(tmp_path, name, **kw):
  return TrainConfig(
      model="bert",
      preset="tiny",
      steps=4,
      batch_size=8,
      seq_len=32,
      eval_every=2,
      eval_batches=2,
      checkpoint_every=2,
      max_data_bytes=2**18,
      out=str(tmp_path / name),
      **kw,
  )


def test_pretraining_then_fine_tuning_from_our_own_checkpoint(tmp_path):
  pre = loop.train(_run(tmp_path, "pre")).summary
  assert 0 < pre["val_masked_accuracy"] <= 1
  cfg = _run(tmp_path, "ft", init=str(tmp_path / "pre"), finetune="stdlib:next")
  result = loop.train(cfg)
  assert {"val_accuracy", "val_f1", "val_matthews"} <= set(result.summary)
  # the encoder started from the pretrained one: a parameter the fine-tuning
  # did not train yet at step 0 is checked through a fresh load
  from train.objectives import OBJECTIVES

  objective = OBJECTIVES[cfg.objective]
  data = objective.load_data(cfg)
  model = objective.build_model(cfg, data)
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager((tmp_path / "pre" / "checkpoints").absolute())
  saved = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(params=ocp.args.StandardRestore()),
  ).params
  np.testing.assert_array_equal(
      np.asarray(model.tok.embedding[...]),
      np.asarray(saved["tok"]["embedding"]),
  )
  assert model.config.num_labels == 2


def test_fine_tuning_resumes_exactly(tmp_path):
  full = loop.train(_run(tmp_path, "full", finetune="stdlib:order")).summary
  args = dict(finetune="stdlib:order")
  loop.train(_run(tmp_path, "half", **args), stop_after=2)
  resumed = loop.train(_run(tmp_path, "half", resume=True, **args)).summary
  assert resumed["val_loss"] == full["val_loss"]
  assert resumed["val_accuracy"] == full["val_accuracy"]


def test_bert_flags_are_checked(tmp_path, capsys):
  with pytest.raises(
      ValueError,
      match=r"--finetune \(objective sequence_classification\) needs a model"
      " that offers sequence_label, which gpt2 does not; gpt2 trains on"
      " causal_lm",
  ):
    TrainConfig(model="gpt2", finetune="stdlib:next")
  # the objective without --finetune fine-tunes on the default task
  args = parse(["bert", "--objective", "sequence_classification"])
  del args["compare"], args["stop_after"]  # the CLI's own options
  assert TrainConfig(**args).finetune == finetune.DEFAULT_TASK
  capsys.readouterr()
  assert (
      main(["bert", "--finetune", "stdlib:nope", "--out", str(tmp_path / "x")])
      == 2
  )
  assert "unknown fine-tuning task" in capsys.readouterr().err


def test_the_embedded_corpus_gives_both_tasks_enough_lines():
  text = load_text("stdlib", 2**20)
  for name in finetune.OFFLINE:
    data = finetune.load_offline(name, text.train, text.val)
    assert len(data.train.labels) > 1000 and len(data.val.labels) > 100


def test_lora_freezes_the_base_and_trains_the_adapters_and_head(tmp_path):
  import jax
  from flax import nnx

  from models import lora
  from train.objectives import OBJECTIVES

  cfg = _run(
      tmp_path, "lora", finetune="stdlib:next", lora_rank=2, optimizer="adamw"
  )
  objective = OBJECTIVES[cfg.objective]
  model = objective.build_model(cfg, objective.load_data(cfg))
  assert lora.add_adapters(model, 2, nnx.Rngs(cfg.seed + 1)) == 12
  before = nnx.to_pure_dict(nnx.state(model))
  result = loop.train(cfg)
  after = result.params
  paths = lambda tree: {
      "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }
  before, after = paths(before), paths(after)
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  adapters = {k for k in before if k.endswith(("lora_a", "lora_b"))}
  head = {k for k in before if k.startswith(("pool/", "classifier/"))}
  assert len(adapters) == 24
  assert changed == adapters | head  # the base is bit-identical
  trainable = sum(before[k].size for k in adapters | head)
  assert result.summary["trainable_params"] == trainable
  # AdamW's two moments of the trainable parameters only, and a step count
  assert result.summary["optimizer_state_bytes"] < 2 * 4 * trainable + 64


def test_lora_train_rest_trains_all_but_the_adapted_base_weights(tmp_path):
  # the LoRA pretraining baseline (ReLoRA's, GaLore's): embeddings, norms and
  # output train beside the adapters
  import jax
  from flax import nnx

  from models import lora
  from train.objectives import OBJECTIVES

  cfg = TrainConfig(
      model="llama",
      preset="tiny",
      steps=2,
      batch_size=4,
      seq_len=16,
      max_data_bytes=2**16,
      lora_rank=4,
      lora_train_rest=True,
      out=str(tmp_path / "llama"),
  )
  objective = OBJECTIVES[cfg.objective]
  model = objective.build_model(cfg, objective.load_data(cfg))
  lora.add_adapters(model, 4, nnx.Rngs(cfg.seed + 1))
  flat = lambda tree: {
      "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }
  before = flat(nnx.to_pure_dict(nnx.state(model)))
  result = loop.train(cfg, verbose=False)
  after = flat(result.params)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  base = {k for k in before if "/base_module/" in k}
  assert base and {"embed_tokens/embedding", "norm/scale"} <= changed
  assert changed == set(before) - base
  assert result.summary["trainable_params"] == sum(
      v.size for k, v in before.items() if k not in base
  )


def test_lora_defaults_to_a_full_rank_optimizer():
  cfg = TrainConfig(model="bert", finetune="stdlib:next", lora_rank=2)
  assert cfg.optimizer == "adamw"
  assert TrainConfig(model="bert").optimizer == "galore_adamw"


def test_lora_flags_are_checked(tmp_path):
  with pytest.raises(ValueError, match="full-rank optimizer"):
    _run(tmp_path, "a", lora_rank=2, optimizer="galore_adamw")
  with pytest.raises(ValueError, match="--remat block"):
    _run(tmp_path, "b", lora_rank=2, optimizer="adamw", remat="block")
  with pytest.raises(ValueError, match="must be positive"):
    _run(tmp_path, "c", lora_rank=0, optimizer="adamw")
  with pytest.raises(ValueError, match="goes with --lora-rank"):
    _run(tmp_path, "d", lora_train_rest=True)


def _glue_copy(path, name):
  datasets = pytest.importorskip("datasets")
  rng = np.random.default_rng(0)
  words = [b"good", b"great", b"bad", b"awful", b"film", b"plot", b"the"]

  def split(n, val):
    sentences = [b" ".join(rng.choice(words, 6)).decode() for _ in range(n)]
    if name == "stsb":
      others = [b" ".join(rng.choice(words, 6)).decode() for _ in range(n)]
      labels = [
          float(len(set(a.split()) & set(b.split())))
          for a, b in zip(sentences, others)
      ]
      return {"sentence1": sentences, "sentence2": others, "label": labels}
    labels = [int("good" in s or "great" in s) for s in sentences]
    return {"sentence": sentences, "label": labels, "idx": list(range(n))}

  datasets.DatasetDict({
      "train": datasets.Dataset.from_dict(split(200, False)),
      "validation": datasets.Dataset.from_dict(split(37, True)),
  }).save_to_disk(str(path))
  return str(path)


@pytest.mark.parametrize("name", ["sst2", "stsb"])
def test_glue_from_a_local_copy(tmp_path, name):
  local = _glue_copy(tmp_path / name, name)
  data = finetune.load_glue(name, local)
  assert len(data.val.labels) == 37 and data.num_labels == (
      1 if name == "stsb" else 2
  )
  result = loop.train(
      _run(tmp_path, "run", finetune=f"glue:{name}", data=local)
  ).summary
  expected = {"stsb": {"val_pearson", "val_spearman"}}.get(
      name, {"val_accuracy", "val_f1", "val_matthews"}
  )
  assert expected <= set(result)
  assert result["finetune"] == f"glue:{name}"
  with pytest.raises(finetune.DataError, match="unknown GLUE task"):
    finetune.load_glue("wnli9", local)
  with pytest.raises(finetune.DataError, match="lacks column"):
    finetune.load_glue("mrpc" if name == "sst2" else "sst2", local)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_post_and_pre_layernorm_encoders(pre_ln):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from models import bert
  from models import transformer

  config = bert.BertConfig(
      vocab_size=260,
      max_len=16,
      d_model=32,
      n_layers=2,
      n_heads=4,
      pre_ln=pre_ln,
      num_labels=3,
  )
  model = bert.Bert(config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  inputs = (tokens, jnp.zeros_like(tokens), jnp.ones((2, 16), bool))
  assert model(inputs).shape == (2, 3)
  assert (model.ln_f is not None) == pre_ln
  # a post-LN block ends in a LayerNorm (unit scale at init): each position
  # of its output has mean 0 and variance 1; a pre-LN block's residual does not
  block = model.blocks[0]
  x = jax.random.normal(jax.random.key(0), (2, 16, 32)) * 3 + 1
  y = block(x, None)
  normalised = np.allclose(y.mean(-1), 0, atol=1e-4) and np.allclose(
      y.var(-1), 1, atol=1e-2
  )
  assert normalised == (not pre_ln)
  assert isinstance(block, transformer.Block)
