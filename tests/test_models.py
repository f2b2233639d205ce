"""GPT-2, ViT and LLaMA: shapes, a forward/backward pass, causality, and
GaLore-ready parameter paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import galore_optax
import models
from models import llama


def _params(model):
  return nnx.to_pure_dict(nnx.split(model)[1])


def test_gpt2_forward_backward_and_causality():
  cfg = models.GPT2_PRESETS["tiny"]
  model = models.GPT2(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(
      np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  )
  logits = model(tokens)
  assert logits.shape == (2, 16, cfg.vocab_size)
  changed = model(tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size))
  # the past ignores the future
  np.testing.assert_allclose(changed[:, :10], logits[:, :10], atol=1e-6)
  assert not np.allclose(changed[:, 10:], logits[:, 10:])

  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
  grads = jax.grad(loss)(state)
  assert all(
      np.isfinite(g).all() and np.any(g != 0) for g in jax.tree.leaves(grads)
  )


def test_gpt2_ties_embeddings_and_names_matrices_for_galore():
  cfg = models.GPT2_PRESETS["tiny"]
  params = _params(models.GPT2(cfg, rngs=nnx.Rngs(0)))
  paths = galore_optax.targets.leaf_paths(params)
  assert not any("head" in p for p in paths)  # the output layer is wte, tied
  targeted = [p for p in paths if re.search(models.GALORE_TARGETS, p)]
  assert targeted == [
      f"blocks/{i}/{m}/kernel"
      for i in range(cfg.n_layers)
      for m in ("attn/proj", "attn/qkv", "mlp/fc", "mlp/proj")
  ]
  # the library's default rule agrees with the paper's rule on this model
  default = [
      p.path
      for p in galore_optax.plan_leaves(params, rank=4, proj_type="std")
      if p
  ]
  assert default == targeted
  d = cfg.d_model
  shapes = {p: x.shape for p, x in zip(paths, jax.tree.leaves(params))}
  assert shapes["blocks/0/attn/qkv/kernel"] == (d, 3 * d) and shapes[
      "blocks/0/mlp/fc/kernel"
  ] == (d, 4 * d)


@pytest.mark.parametrize(
    "preset, n_params", [("124m", 124_439_808), ("350m", 354_823_168)]
)
def test_gpt2_presets_have_gpt2s_sizes(preset, n_params):
  model = nnx.eval_shape(
      lambda: models.GPT2(models.GPT2_PRESETS[preset], rngs=nnx.Rngs(0))
  )
  assert sum(x.size for x in jax.tree.leaves(nnx.split(model)[1])) == n_params


def test_vit_forward_backward_and_presets():
  cfg = models.VIT_PRESETS["tiny"]
  model = models.ViT(cfg, rngs=nnx.Rngs(0))
  images = jnp.asarray(
      np.random.default_rng(0).random((3, 8, 8, 1)), jnp.float32
  )
  assert model(images).shape == (3, cfg.num_classes)
  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(images) ** 2) + jnp.mean(
      nnx.merge(graphdef, s).head(jnp.ones((1, cfg.d_model)))
  )
  grads = jax.grad(loss)(state)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  paths = galore_optax.targets.leaf_paths(_params(model))
  assert [
      p.path
      for p in galore_optax.plan_leaves(_params(model), rank=4, proj_type="std")
      if p
  ] == [p for p in paths if re.search(models.GALORE_TARGETS, p)]
  with pytest.raises(ValueError, match="do not fit"):
    model(jnp.zeros((1, 16, 16, 1)))
  b16 = nnx.eval_shape(
      lambda: models.ViT(models.VIT_PRESETS["b16"], rngs=nnx.Rngs(0))
  )
  # ViT-B/16, 1000 classes
  assert sum(x.size for x in jax.tree.leaves(nnx.split(b16)[1])) == 86_567_656


def test_each_hugging_face_model_type_loads_into_one_registered_family():
  from models import hf
  from models import registry

  claimed = [
      t for spec in registry.MODELS.values() for t in spec.hf_model_types
  ]
  assert sorted(claimed) == sorted(
      hf.ARCHITECTURES
  )  # each once, none unconverted
  assert registry.family_of("roberta") == "bert"
  assert registry.family_of("mistral") == "llama"
  assert registry.family_of("t5") is None
  for name, spec in registry.MODELS.items():
    assert spec.presets and all(
        isinstance(h, str) and h.endswith(("/", "_")) for h in spec.heads
    ), name


def test_llama_forward_backward_causality_and_galore_targets():
  cfg = llama.PRESETS["tiny"]  # 2 key/value heads for 4 query heads
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(
      np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  )
  logits = model(tokens)
  assert logits.shape == (2, 16, cfg.vocab_size)
  changed = model(tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size))
  np.testing.assert_allclose(changed[:, :10], logits[:, :10], atol=1e-6)
  assert not np.allclose(changed[:, 10:], logits[:, 10:])
  graphdef, state = nnx.split(model)
  grads = jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2))(
      state
  )
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  params = _params(model)
  paths = galore_optax.targets.leaf_paths(params)
  targeted = [p for p in paths if re.search(models.GALORE_TARGETS, p)]
  # the paper's seven matrices per block, nothing else
  assert targeted == [
      f"blocks/{i}/{m}/kernel"
      for i in range(cfg.n_layers)
      for m in (
          "attn/k",
          "attn/o",
          "attn/q",
          "attn/v",
          "mlp/down",
          "mlp/gate",
          "mlp/up",
      )
  ]
  shapes = {p: x.shape for p, x in zip(paths, jax.tree.leaves(params))}
  assert shapes["blocks/0/attn/k/kernel"] == (64, 2 * 16)
  assert shapes["lm_head/kernel"] == (64, cfg.vocab_size)  # untied


@pytest.mark.parametrize("preset", ["9m", "20m", "60m", "130m"])
def test_llama_presets_are_the_galore_repositorys_configs(preset):
  # counted against transformers' LlamaForCausalLM of the same config.json
  # (configs/llama_*.json of the GaLore repository: SwiGLU, untied, 32000)
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = llama.PRESETS[preset]
  hf_config = transformers.LlamaConfig(
      vocab_size=32000,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.hidden,
      num_attention_heads=cfg.n_heads,
      num_hidden_layers=cfg.n_layers,
      max_position_embeddings=1024,
      rms_norm_eps=1e-6,
  )
  with torch.device("meta"):
    theirs = sum(
        p.numel() for p in transformers.LlamaForCausalLM(hf_config).parameters()
    )
  ours = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.split(ours)[1])) == theirs


def test_lora_adapters_merge_into_a_plain_model():
  from models import hf
  from models import lora

  cfg = llama.PRESETS["tiny"]
  adapted = llama.Llama(cfg, rngs=nnx.Rngs(0))
  assert lora.add_adapters(adapted, 4, nnx.Rngs(1)) == 7 * cfg.n_layers
  params = {k: np.asarray(v[...]) for k, v in hf.flat_params(adapted).items()}
  rng = np.random.default_rng(0)
  for k in params:  # B starts at zero: give the adapters something to add
    if k.endswith("lora_b"):
      params[k] = rng.standard_normal(params[k].shape).astype(np.float32)
  hf.set_params(adapted, params)
  plain = llama.Llama(cfg, rngs=nnx.Rngs(2))
  merged = lora.merge(params)
  assert set(merged) == set(hf.flat_params(plain))
  hf.set_params(plain, merged)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))
  np.testing.assert_allclose(plain(tokens), adapted(tokens), atol=1e-4)
