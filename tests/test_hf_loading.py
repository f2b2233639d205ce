"""Hugging Face checkpoints load into our NNX models: small randomly initialised
transformers models, saved with save_pretrained, give the same logits here as
in torch; checkpoints that do not fit fail naming what does not fit."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from models import hf  # noqa: E402

warnings.filterwarnings("ignore", module="transformers")
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(2, 256, (2, 12))
SEGMENTS = np.repeat([[0] * 6 + [1] * 6], 2, axis=0)
MASK = np.ones((2, 12), bool)
MASK[1, 9:] = False  # the second row is padded
IMAGES = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)

BERT = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)

CLIP_TOWER = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)
# captions ending in the end-of-text token (255) at different places, padded
CAPTIONS = np.concatenate([TOKENS[:, :10] % 250, np.full((2, 2), 255)], 1)
CAPTIONS[0, 6] = 255


# small LLaMA-family decoders: grouped-query attention, tied and untied
# outputs, Llama 3's rope scaling, Mistral's sliding window (shorter than the
# 12 tokens), Qwen2's query/key/value biases
DECODER = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)


def _text_inputs(roberta):
  tokens = np.where(MASK, TOKENS, 1 if roberta else 0)  # padding ids
  segments = np.zeros_like(SEGMENTS) if roberta else SEGMENTS
  return tokens, segments


CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4
        )
    ),
    "vit": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=2,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
        )
    ),
    "bert-mlm": lambda: transformers.BertForMaskedLM(
        transformers.BertConfig(max_position_embeddings=64, **BERT)
    ),
    "bert-classifier": lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(
            max_position_embeddings=64, num_labels=3, **BERT
        )
    ),
    "roberta-mlm": lambda: transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(
            max_position_embeddings=66, type_vocab_size=1, **BERT
        )
    ),
    "roberta-classifier": lambda: transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(
            max_position_embeddings=66, type_vocab_size=1, num_labels=1, **BERT
        )
    ),
    "clip": lambda: transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=dict(
                vocab_size=256,
                max_position_embeddings=16,
                eos_token_id=255,
                **CLIP_TOWER,
            ),
            vision_config=dict(image_size=8, patch_size=2, **CLIP_TOWER),
            projection_dim=24,
        )
    ),
    "llama-gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_key_value_heads=2, **DECODER)
    ),
    "llama3-tied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            **DECODER,
        )
    ),
    "mistral-window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            num_key_value_heads=2, sliding_window=5, **DECODER
        )
    ),
    "qwen2-tied": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            num_key_value_heads=2, tie_word_embeddings=True, **DECODER
        )
    ),
}
# the family (models.registry.MODELS) that loads each case
FAMILY = {
    "gpt2": "gpt2",
    "vit": "vit",
    "bert-mlm": "bert",
    "bert-classifier": "bert",
    "roberta-mlm": "bert",
    "roberta-classifier": "bert",
    "clip": "clip",
    "llama-gqa": "llama",
    "llama3-tied": "llama",
    "mistral-window": "llama",
    "qwen2-tied": "llama",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each case's torch model, saved once."""
  out = {}
  for name, build in CASES.items():
    torch.manual_seed(len(out))
    model = build().eval()
    with torch.no_grad():  # norms and biases away from their 1 and 0
      for p in model.parameters():
        if p.ndim == 1:
          p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


def _logits(name, theirs, ours, processed=lambda pixels: pixels):
  """Both models' logits on the same inputs; MLM logits at real tokens only.
  Torch's image models see ``processed(pixels)`` where ours see the pixels
  (as a checkpoint's image processor would prepare them)."""
  with torch.no_grad():
    if FAMILY[name] in ("gpt2", "llama"):
      return (
          theirs(torch.tensor(TOKENS)).logits.numpy(),
          np.asarray(ours(jnp.asarray(TOKENS))),
      )
    if name == "clip":
      images = np.concatenate([IMAGES, IMAGES[::-1] * 0.5])  # 4 images
      want = theirs(
          input_ids=torch.tensor(CAPTIONS),
          pixel_values=torch.tensor(processed(images), dtype=torch.float32),
      ).logits_per_image.numpy()
      got = ours(jnp.asarray(images.transpose(0, 2, 3, 1)), CAPTIONS)
      return want, np.asarray(got)
    if name == "vit":
      return (
          theirs(
              torch.tensor(processed(IMAGES), dtype=torch.float32)
          ).logits.numpy(),
          np.asarray(ours(jnp.asarray(IMAGES.transpose(0, 2, 3, 1)))),
      )
    tokens, segments = _text_inputs(name.startswith("roberta"))
    want = theirs(
        input_ids=torch.tensor(tokens),
        token_type_ids=torch.tensor(segments),
        attention_mask=torch.tensor(MASK.astype(np.int64)),
    ).logits.numpy()
  got = np.asarray(
      ours((jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(MASK)))
  )
  if want.ndim == 3:
    want, got = want[MASK], got[MASK]
  return want, got


@pytest.mark.parametrize("name", list(CASES))
def test_loaded_model_gives_the_torch_models_logits(saved, name):
  theirs, path = saved[name]
  ours, report = hf.load(str(path), expect_model=FAMILY[name])
  assert report.fresh == []  # every parameter came from the checkpoint
  want, got = _logits(name, theirs, ours)
  assert want.shape == got.shape
  assert np.std(want) > 1e-3  # not a degenerate comparison
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max() + 1e-6)


def test_the_decoders_options_are_the_checkpoints(saved, tmp_path):
  # Mistral's window, shorter than the sequence, changes what it attends to
  _, path = saved["mistral-window"]
  windowed, report = hf.load(str(path))
  assert report.config.sliding_window == 5
  full, _ = hf.load(str(path), sliding_window=None)
  assert not np.allclose(windowed(TOKENS), full(TOKENS), atol=1e-3)
  # as Llama 3's rope scaling does; a variant not built here is refused
  _, path = saved["llama3-tied"]
  scaled, report = hf.load(str(path))
  assert report.config.rope_type == "llama3" and report.config.tie_embeddings
  plain, _ = hf.load(str(path), rope_type="default")
  assert not np.allclose(scaled(TOKENS), plain(TOKENS), atol=1e-3)

  def yarn(config):
    config["rope_parameters"] = dict(
        config["rope_parameters"], rope_type="yarn"
    )

  bad = _copy(path, tmp_path / "yarn", edit_config=yarn)
  with pytest.raises(hf.CheckpointMismatch, match="rope scaling 'yarn'"):
    hf.load(str(bad))


def test_stacked_layers_load_the_same_weights(saved):
  theirs, path = saved["bert-mlm"]
  ours, _ = hf.load(str(path), stacked=True)
  assert ours.blocks.attn.query.kernel[...].shape == (2, 32, 32)
  want, got = _logits("bert-mlm", theirs, ours)
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_classifier_on_a_pretrained_encoder_gets_a_fresh_head(saved):
  theirs, path = saved["bert-mlm"]
  ours, report = hf.load(str(path), num_labels=2)
  assert set(report.fresh) == {
      "pool/kernel",
      "pool/bias",
      "classifier/kernel",
      "classifier/bias",
  }
  assert any(t.startswith("cls.predictions") for t in report.ignored)
  # the encoder is the checkpoint's
  np.testing.assert_array_equal(
      ours.tok.embedding[...],
      theirs.bert.embeddings.word_embeddings.weight.detach().numpy(),
  )
  assert ours((jnp.asarray(TOKENS), jnp.asarray(SEGMENTS), MASK)).shape == (
      2,
      2,
  )


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_pixels_are_normalised_as_the_checkpoints_image_processor_does(
    saved, tmp_path, name
):
  theirs, path = saved[name]
  mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
  processor = transformers.CLIPImageProcessor(image_mean=mean, image_std=std)
  local = tmp_path / name
  _copy(path, local)
  processor.save_pretrained(local)
  ours, report = hf.load(str(local))
  assert report.config.pixel_mean == tuple(mean)
  shape = (3, 1, 1)  # channels first, as torch takes images
  want, got = _logits(
      name,
      theirs,
      ours,
      lambda x: (x - np.reshape(mean, shape)) / np.reshape(std, shape),
  )
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max() + 1e-6)
  # saved, the normalisation goes to the image processor's config again
  params = {k: np.asarray(v[...]) for k, v in hf.flat_params(ours).items()}
  hf.save(params, name, report.config, str(tmp_path / "saved"))
  processed = transformers.AutoImageProcessor.from_pretrained(
      tmp_path / "saved"
  )
  assert (list(processed.image_mean), list(processed.image_std)) == (mean, std)
  assert hf.load(str(tmp_path / "saved"))[1].config == report.config
  # a processor for other channels than the model's is refused
  grey = transformers.CLIPImageProcessor(image_mean=[0.5], image_std=[0.5])
  grey.save_pretrained(local)
  with pytest.raises(hf.CheckpointMismatch, match="1 channel.*takes 3"):
    hf.load(str(local))


def test_a_checkpoint_of_another_architecture_is_refused(saved):
  with pytest.raises(hf.CheckpointMismatch, match="'bert'.*'gpt2' model"):
    hf.load(str(saved["bert-mlm"][1]), expect_model="gpt2")


def _copy(src, dst, edit_tensors=None, edit_config=None):
  dst.mkdir()
  config = json.loads((src / "config.json").read_text())
  if edit_config:
    edit_config(config)
  (dst / "config.json").write_text(json.dumps(config))
  tensors = load_file(src / "model.safetensors")
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, dst / "model.safetensors")
  return str(dst)


def test_mismatched_tensors_are_named(saved, tmp_path):
  src = saved["gpt2"][1]
  key = "transformer.h.1.mlp.c_fc.weight"

  def wrong_shape(t):
    t[key] = t[key][:, :100]

  with pytest.raises(
      hf.CheckpointMismatch,
      match=r"h\.1\.mlp\.c_fc\.weight.*" r"\(32, 100\).*\(32, 128\)",
  ):
    hf.load(_copy(src, tmp_path / "shape", wrong_shape))

  with pytest.raises(hf.CheckpointMismatch, match=r"missing tensor h\.0\.ln_2"):
    hf.load(
        _copy(
            src,
            tmp_path / "missing",
            lambda t: t.pop("transformer.h.0.ln_2.bias"),
        )
    )

  def extra(t):
    t["transformer.h.0.adapter.weight"] = np.zeros((2, 2), np.float32)

  with pytest.raises(hf.CheckpointMismatch, match=r"h\.0\.adapter\.weight"):
    hf.load(_copy(src, tmp_path / "extra", extra))

  with pytest.raises(hf.CheckpointMismatch, match="model_type 't5'"):
    hf.load(
        _copy(
            src,
            tmp_path / "t5",
            edit_config=lambda c: c.update(model_type="t5"),
        )
    )


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(hf.CheckpointMismatch, match="no config.json"):
    hf.load(str(tmp_path))


def test_the_cli_trains_from_a_checkpoint(saved, tmp_path, capsys):
  from train import config as config_lib
  from train import loop
  from train.__main__ import main
  from train.objectives import base

  theirs, path = saved["gpt2"]
  out = tmp_path / "run"
  cfg = config_lib.TrainConfig(
      model="gpt2",
      init=str(path),
      steps=1,
      batch_size=2,
      seq_len=16,
      eval_every=1,
      eval_batches=1,
      out=str(out),
      optimizer="adamw",
  )
  assert (
      base.base_model_config(cfg).n_layers == 2
  )  # the checkpoint's, not the preset's
  before = loop.train(cfg).summary
  assert before["steps"] == 1
  # what trained was the checkpoint: its first loss is the torch model's
  from train.objectives import OBJECTIVES

  objective = OBJECTIVES["causal_lm"]
  data = objective.load_data(cfg)
  tokens, targets = objective.batch(cfg, data, 0, np.arange(2))
  with torch.no_grad():
    logits = theirs(torch.tensor(np.asarray(tokens)).long()).logits
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 256),
        torch.tensor(np.asarray(targets)).long().reshape(-1),
    ).item()
  model = objective.build_model(cfg, data)
  got = float(
      objective.loss(model, (jnp.asarray(tokens), jnp.asarray(targets)))[0]
  )
  assert abs(got - want) < 1e-4

  # a checkpoint of another architecture: exit 2, the reason on stderr
  capsys.readouterr()
  code = main([
      "gpt2",
      "--init",
      str(saved["bert-mlm"][1]),
      "--out",
      str(tmp_path / "bad"),
  ])
  assert code == 2
  assert "'bert' checkpoint cannot initialise a 'gpt2' model" in (
      capsys.readouterr().err
  )


@pytest.mark.parametrize("name", list(CASES))
def test_saved_checkpoints_load_in_transformers_with_our_logits(
    saved, tmp_path, name
):
  theirs, path = saved[name]
  ours, report = hf.load(str(path))
  params = {k: np.asarray(v[...]) for k, v in hf.flat_params(ours).items()}
  kind = hf.save(params, FAMILY[name], report.config, str(tmp_path / "out"))
  assert kind == report.model_type
  back = type(theirs).from_pretrained(tmp_path / "out").eval()
  want, got = _logits(name, back, ours)
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_run_exports_and_samples(tmp_path, capsys):
  from train.__main__ import main
  from train.sample import pick

  run, out = tmp_path / "run", tmp_path / "hf"
  assert (
      main([
          "llama",
          "--preset",
          "tiny",
          "--steps",
          "8",
          "--batch-size",
          "4",
          "--seq-len",
          "32",
          "--tokenizer",
          "bpe:300",
          "--max-data-bytes",
          "200000",
          "--out",
          str(run),
      ])
      == 0
  )
  assert main(["export", str(run), "--out", str(out)]) == 0
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  prompt = "def main(args):"
  ids = tokenizer(prompt)["input_ids"]
  assert len(ids) < len(prompt)  # the run's BPE, not bytes
  # greedy decoding here is transformers' on the exported checkpoint
  with torch.no_grad():
    theirs = model.generate(
        torch.tensor([ids]),
        max_new_tokens=12,
        do_sample=False,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pad_token_id=0,
    )[0, len(ids) :]
  capsys.readouterr()
  assert (
      main(["sample", str(run), "--prompt", prompt, "--max-new-tokens", "12"])
      == 0
  )
  written = capsys.readouterr().out.rstrip("\n")
  assert written == prompt + tokenizer.decode(theirs.tolist())
  # top-p keeps the fewest likeliest tokens reaching p; temperature 0 the best
  logits = np.log(np.array([0.1, 0.6, 0.3]))
  rng = np.random.default_rng(0)
  assert {pick(logits, 1.0, 0.5, rng) for _ in range(50)} == {1}
  assert {pick(logits, 1.0, 0.8, rng) for _ in range(200)} == {1, 2}
  assert pick(logits, 0.0, 1.0, rng) == 1
  # the export starts a run again, with its own tokenizer
  again = tmp_path / "again"
  common = ["--steps", "1", "--batch-size", "2", "--seq-len", "32"]
  assert (
      main([
          "llama",
          "--init",
          str(out),
          "--tokenizer",
          f"hf:{out}",
          *common,
          "--max-data-bytes",
          "200000",
          "--out",
          str(again),
      ])
      == 0
  )
  assert f"loaded weights from {out}" in capsys.readouterr().out
  # what sample and export cannot do is said, exit 2
  assert main(["sample", str(run), "--prompt", "x", "--top-p", "0"]) == 2
  assert "--top-p must be in (0, 1]" in capsys.readouterr().err
