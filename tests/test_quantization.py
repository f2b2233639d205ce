"""Quantized state: codebooks and codes against bitsandbytes, round trips, 8-bit
Adam against float32 Adam, and GaLore with 8-bit moments and INT8 / INT4
bases inside jit, optax's wrappers, nnx and a training run."""

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from helpers import grad_sequence
from helpers import random_params
from helpers import run
from helpers import tiny_config

import galore_optax
from galore_optax import quantization
from train.loop import train

BNB_MAPS = {"dynamic": True, "dynamic_unsigned": False}


def _inputs(rng):
  """Random, heavy-tailed and all-zero blocks, and a size that is not a
  multiple of 256."""
  normal = rng.standard_normal((64, 512))
  cauchy = rng.standard_cauchy((32, 256))  # a few huge entries per block
  zeros = np.concatenate([np.zeros(512), rng.standard_normal(256)])
  ragged = rng.standard_normal(1000)  # 3 whole blocks and one of 232
  return {
      "normal": normal,
      "heavy-tailed": cauchy,
      "zero blocks": zeros,
      "ragged": ragged,
  }


def _bnb_quantize(x: np.ndarray, signed: bool):
  code = bnb.create_dynamic_map(signed=signed)  # fresh: its kernel edits it
  codes, state = bnb.quantize_blockwise(
      torch.from_numpy(x.astype(np.float32).reshape(-1).copy()),
      code=code,
      blocksize=256,
  )
  return codes.numpy().astype(int), state.absmax.numpy()


def _flat_codes(q):
  return np.asarray(q.codes).reshape(-1)[: int(np.prod(q.shape))].astype(int)


@pytest.mark.parametrize("codebook", sorted(BNB_MAPS))
def test_dynamic_maps_equal_bitsandbytes(codebook):
  ours, _ = quantization.CODEBOOKS[codebook]
  theirs = bnb.create_dynamic_map(signed=BNB_MAPS[codebook]).numpy()
  np.testing.assert_array_equal(ours, theirs)  # to the bit


@pytest.mark.parametrize("codebook", sorted(BNB_MAPS))
def test_codes_and_scales_equal_bitsandbytes(codebook):
  rng = np.random.default_rng(0)
  table = quantization.CODEBOOKS[codebook][0].astype(np.float64)
  for name, x in _inputs(rng).items():
    if codebook == "dynamic_unsigned":
      x = np.abs(x) ** 2  # second moments
    x = x.astype(np.float32)
    q = galore_optax.quantize(jnp.asarray(x), codebook)
    codes = _flat_codes(q)
    theirs, absmax = _bnb_quantize(x, BNB_MAPS[codebook])
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), absmax)
    differ = np.nonzero(codes != theirs)[0]
    # Ours is the nearest entry; bitsandbytes' CPU kernel picks the entry
    # nearest to the input rounded to a grid of 2^-15 of the scale, so where
    # the two differ, its entry is at most 2^-15 farther from the input.
    scaled = x.reshape(-1)[differ] / np.repeat(absmax, 256)[differ]
    ours = np.abs(scaled - table[codes[differ]])
    extra = np.abs(scaled - table[theirs[differ]]) - ours
    assert np.all((extra >= -1e-7) & (extra <= 2.0**-15)), name
    if codebook == "dynamic" and name in ("normal", "ragged"):  # rare there
      assert len(differ) <= 5e-3 * x.size, name
    if name == "zero blocks":
      assert np.all(codes[:512] == 0) and np.all(theirs[:512] == 0)
      assert absmax[0] == absmax[1] == 0
      np.testing.assert_array_equal(
          np.asarray(galore_optax.dequantize(q))[:512], 0
      )


@pytest.mark.parametrize("codebook", sorted(quantization.CODEBOOKS))
def test_round_trip_takes_the_nearest_entry(codebook):
  table, bits = quantization.CODEBOOKS[codebook]
  rng = np.random.default_rng(1)
  x = rng.standard_normal((37, 300)).astype(np.float32)  # 11100: padded
  if codebook == "dynamic_unsigned":
    x = x**2
  q = galore_optax.quantize(jnp.asarray(x), codebook)
  assert q.codes.dtype == jnp.uint8
  assert q.codes.shape[-1] == 256 // (8 // bits)
  back = np.asarray(galore_optax.dequantize(q))
  assert back.shape == x.shape and back.dtype == x.dtype
  absmax = np.repeat(np.asarray(q.absmax), 256)[: x.size].reshape(x.shape)
  error = np.abs(back - x) / absmax
  nearest = np.min(
      np.abs((x / absmax)[..., None] - table.astype(np.float64)), axis=-1
  )
  np.testing.assert_allclose(error, nearest, atol=1e-6)
  # half the widest gap of the codebook, in units of the block's scale
  bound = {
      "dynamic": 0.0071,
      "dynamic_unsigned": 0.0036,
      "linear8": 1 / 254,
      "linear4": 1 / 14,
  }[codebook]
  assert error.max() <= bound + 1e-6


def test_int4_codes_pack_two_a_byte():
  codes = jnp.asarray(np.random.default_rng(2).integers(0, 15, (3, 8, 256)))
  packed = quantization._pack4(codes.astype(jnp.uint8))
  assert packed.shape == (3, 8, 128) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(quantization._unpack4(packed), codes)


def test_a_nan_survives_the_round_trip():
  x = np.random.default_rng(3).standard_normal(768).astype(np.float32)
  x[300] = np.nan
  back = np.asarray(galore_optax.dequantize(galore_optax.quantize(x)))
  assert np.all(np.isnan(back[256:512]))  # the NaN's block says so
  assert np.all(np.isfinite(back[:256])) and np.all(np.isfinite(back[512:]))


def _quadratic_run(tx, steps=300):
  """Noisy gradients of ``|W - W*|^2 / 2`` for a 64 x 128 W; final W."""
  rng = np.random.default_rng(4)
  target = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((steps, 64, 128)), jnp.float32)
  w = jnp.zeros((64, 128))
  state = tx.init(w)

  @jax.jit
  def step(w, state, noise):
    updates, state = tx.update(w - target + 0.5 * noise, state, w)
    return w + updates, state

  for t in range(steps):
    w, state = step(w, state, noise[t])
  return np.asarray(w), np.asarray(target), state


def test_8bit_adam_follows_float32_adam():
  w8, target, state = _quadratic_run(galore_optax.adamw_8bit(0.01, 0.0))
  w32, _, _ = _quadratic_run(optax.adamw(0.01, weight_decay=0.0))
  assert galore_optax.quantization.is_quantized(state[0].mu)
  # Tolerance (measured 3.4% and 15% on this noisy problem): after 300 steps
  # the runs are within 5% of the distance travelled of each other, and 8-bit
  # Adam's distance to the optimum is within 25% of float32 Adam's, nine
  # tenths of the way from the start (89.8).
  assert np.linalg.norm(w8 - w32) < 0.05 * np.linalg.norm(w32)
  err8, err32 = np.linalg.norm(w8 - target), np.linalg.norm(w32 - target)
  assert abs(err8 - err32) < 0.25 * err32 and err8 < 0.15 * np.linalg.norm(
      target
  )


def test_quantize_state_stores_moments_by_kind():
  params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}
  tx = galore_optax.quantize_state(optax.scale_by_adam())
  state = tx.init(params)
  assert state.mu["w"].codebook == "dynamic"
  assert state.nu["w"].codebook == "dynamic_unsigned"
  assert not quantization.is_quantized(state.mu["b"])  # < min_size
  report = galore_optax.memory_report(params, tx)
  blocks = 64 * 128 // 256
  codes_and_scales = 64 * 128 + 4 * blocks
  by_leaf = {leaf.path: leaf.state_bytes for leaf in report.leaves}
  assert by_leaf == {"b": 2 * 4 * 128, "w": 2 * codes_and_scales}
  with pytest.raises(ValueError, match="bits must be one of"):
    galore_optax.quantize_state(optax.scale_by_adam(), bits=4)


def test_a_mask_keeps_chosen_leaves_in_float32():
  # bitsandbytes' StableEmbedding recipe: the embedding's moments in float32
  params = {
      "embed": {"embedding": jnp.zeros((300, 64))},
      "w": jnp.zeros((64, 128)),
  }
  not_embedding = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: "embedding" not in jax.tree_util.keystr(path), tree
  )
  masked = galore_optax.adamw_8bit(1e-2, quantize_mask=not_embedding)
  plain = optax.adamw(1e-2, weight_decay=1e-4)
  state, plain_state = masked.init(params), plain.init(params)
  mu = state[0].mu
  assert quantization.is_quantized(mu["w"])
  assert not quantization.is_quantized(mu["embed"]["embedding"])
  for step, grads in enumerate(grad_sequence(params, 3, seed=2)):
    updates, state = masked.update(grads, state, params)
    want, plain_state = plain.update(grads, plain_state, params)
    # the float32 leaf is AdamW's to float32 rounding; the quantized one only
    # close
    np.testing.assert_allclose(
        updates["embed"]["embedding"], want["embed"]["embedding"], atol=1e-8
    )
    if step:
      assert np.max(np.abs(updates["w"] - want["w"])) > 1e-5
  # a tree of bools works as the function does
  fixed = galore_optax.quantize_state(
      optax.scale_by_adam(), mask={"embed": {"embedding": False}, "w": True}
  ).init(params)
  assert not quantization.is_quantized(fixed.nu["embed"]["embedding"])
  assert quantization.is_quantized(fixed.nu["w"])


def test_quantized_leaves_are_updated_one_at_a_time():
  # the same updates and state as one program over the whole tree, with the
  # temporaries of one leaf's float32 moments instead of every leaf's
  params = random_params(
      {f"w{i}": (256, 1024) for i in range(8)} | {"b": (1024,)}, seed=3
  )
  by_leaf, whole = (
      galore_optax.quantize_state(optax.scale_by_adam(), per_leaf=per_leaf)
      for per_leaf in (True, False)
  )
  state, whole_state = by_leaf.init(params), whole.init(params)
  for grads in grad_sequence(params, 3, seed=4):
    updates, state = jax.jit(by_leaf.update)(grads, state)
    want, whole_state = jax.jit(whole.update)(grads, whole_state)
    for got, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # codes equal but where float32 rounding puts a value on a bucket's edge
  for got, expected in zip(
      jax.tree.leaves(state), jax.tree.leaves(whole_state)
  ):
    assert np.mean(np.asarray(got) != np.asarray(expected)) < 1e-3
  temp = lambda tx: (
      jax.jit(tx.update)
      .lower(params, tx.init(params))
      .compile()
      .memory_analysis()
      .temp_size_in_bytes
  )
  # one leaf's float32 moments, old and new, are 4 of its size
  one_leaf = 4 * 256 * 1024 * 4
  assert temp(by_leaf) < 3 * one_leaf < temp(whole)


def test_galore_updates_quantized_untargeted_leaves_one_at_a_time():
  # 8-bit moments of leaves GaLore does not project (embeddings, heads) are
  # dequantized one leaf at a time too: 31 MiB of temporaries here before
  params = random_params(
      {f"w{i}": (256, 1024) for i in range(8)}
      | {"attn": {"kernel": (256, 1024)}},
      seed=3,
  )
  tx = galore_optax.galore_adamw(
      1e-3, rank=16, moment_bits=8, targets=galore_optax.match_paths("attn")
  )
  compiled = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
  one_leaf = 4 * 256 * 1024 * 4  # its float32 moments, old and new
  assert compiled.memory_analysis().temp_size_in_bytes < one_leaf


def _big_params():
  """Matrices large enough for their low-rank moments to be quantized."""
  shapes = {
      "attn": {"kernel": (256, 512)},
      "mlp": {"kernel": (512, 256), "bias": (256,)},
      "embed": (300, 64),
  }
  return random_params(shapes, seed=5, scale=0.1)


QUANTIZED = dict(moment_bits=8, projector_bits=4)


def _galore(**kw):
  return galore_optax.galore_adamw(
      1e-2, rank=16, update_proj_gap=3, **{**QUANTIZED, **kw}
  )


def test_galore_quantized_state_layout_and_bytes():
  params = _big_params()
  state = _galore().init(params)[0]
  left = state.projector.left["attn"]["kernel"]
  assert left.codebook == "linear4" and left.codes.shape == (16, 128)
  assert state.projector.right["mlp"]["kernel"].codebook == "linear4"
  mu = state.inner_state.mu
  assert mu["attn"]["kernel"].shape == (16, 512)  # low-rank, quantized
  assert mu["embed"].shape == (300, 64)  # full-size, quantized too
  assert state.inner_state.nu["embed"].codebook == "dynamic_unsigned"
  plain = galore_optax.memory_report(params, _galore(moment_bits=None))
  quantized = galore_optax.memory_report(params, _galore())
  assert quantized.state_bytes < 0.3 * plain.state_bytes


ALIASES = (
    "galore_adamw",
    "galore_adam",
    "galore_sgd",
    "galore_adafactor",
    "galore_lion",
    "galore_lamb",
)


@pytest.mark.parametrize("name", ALIASES)
def test_every_alias_quantizes_its_inner_state(name):
  extra = dict(momentum=0.9) if name == "galore_sgd" else {}
  alias = getattr(galore_optax, name)
  state = alias(1e-2, rank=16, moment_bits=8, **extra).init(_big_params())
  galore = galore_optax.find_states(state, galore_optax.GaLoreState)[0]
  codebooks = {
      x.codebook
      for x in jax.tree.leaves(
          galore.inner_state, is_leaf=quantization.is_quantized
      )
      if quantization.is_quantized(x)
  }
  assert "dynamic" in codebooks
  if name in ("galore_adamw", "galore_adam", "galore_lamb"):
    assert "dynamic_unsigned" in codebooks  # Adam's nu


@pytest.mark.parametrize("moments", galore_optax.MOMENT_POLICIES)
def test_galore_quantized_follows_float32_galore(moments):
  params = _big_params()
  grads = grad_sequence(params, 8)
  make = lambda **kw: _galore(moments=moments, **{**QUANTIZED, **kw})
  plain, _ = run(make(moment_bits=None, projector_bits=None), params, grads)
  # After 8 steps (3 refreshes), the distance to float32 GaLore's weights as a
  # share of the distance they moved; measured about 1%, 2% and 17%: an INT4
  # basis turns each update by its 5% projection error.
  for bits, bound in (
      (dict(projector_bits=None), 0.03),
      (dict(moment_bits=None, projector_bits=8), 0.05),
      (dict(), 0.3),
  ):
    quantized, state = run(make(**bits), params, grads)
    for name in ("attn", "mlp"):
      start = params[name]["kernel"]
      moved = plain[-1][name]["kernel"] - start
      gap = quantized[-1][name]["kernel"] - plain[-1][name]["kernel"]
      assert np.linalg.norm(gap) < bound * np.linalg.norm(moved), (bits, name)
    assert int(galore_optax.bases_computed(state)) == 3 * 2  # steps 0, 3, 6


def test_galore_one_compilation_and_bases_kept_between_refreshes():
  params = _big_params()
  tx = _galore()
  state = tx.init(params)
  update = jax.jit(tx.update, donate_argnums=1)
  codes = []
  for g in grad_sequence(params, 7):
    _, state = update(g, state, params)
    codes.append(np.asarray(state[0].projector.right["mlp"]["kernel"].codes))
  assert update._cache_size() == 1
  changed = [
      t for t in range(1, 7) if not np.array_equal(codes[t], codes[t - 1])
  ]
  assert changed == [3, 6]  # the refreshes; the codes never drift between


def test_galore_quantized_in_optax_wrappers():
  params = _big_params()
  grads = grad_sequence(params, 4)
  direct, _ = run(_galore(), params, grads[:2])
  for wrapped in (
      optax.chain(optax.clip_by_global_norm(1e9), _galore()),
      optax.apply_if_finite(_galore(), 3),
      optax.masked(_galore(), jax.tree.map(lambda _: True, params)),
  ):
    out, _ = run(wrapped, params, grads[:2])
    for a, b in zip(jax.tree.leaves(out[-1]), jax.tree.leaves(direct[-1])):
      np.testing.assert_allclose(a, b, atol=1e-6)
  # MultiSteps: two micro-batches make one optimizer step
  multi = optax.MultiSteps(_galore(), every_k_schedule=2)
  _, state = run(multi, params, grads)
  assert int(state.inner_opt_state[0].count) == 2
  make = optax.inject_hyperparams(
      galore_optax.galore_adamw,
      static_args=("rank", "update_proj_gap", "moment_bits", "projector_bits"),
  )
  injected, _ = run(
      make(learning_rate=1e-2, rank=16, update_proj_gap=3, **QUANTIZED),
      params,
      grads[:2],
  )
  for a, b in zip(jax.tree.leaves(injected[-1]), jax.tree.leaves(direct[-1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


_NNX_INPUT = np.random.default_rng(6).standard_normal((8, 64))


def _nnx_loss(model):
  return jnp.mean((model(jnp.asarray(_NNX_INPUT)) - 1.0) ** 2)


def _train_with_nnx_optimizer(tx, steps=8):
  """A Linear(64, 256) trained under nnx.Optimizer; (model, optimizer,
  losses)."""
  model = nnx.Linear(64, 256, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(steps)]
  return model, optimizer, losses


def test_flax_nnx_optimizer_with_quantized_state():
  # nnx.Optimizer rebuilds the nodes inside a params State from their paths;
  # the transforms put each QuantizedArray back together from its twin.
  make_tx = lambda: galore_optax.galore_adamw(
      1e-2,
      rank=16,
      update_proj_gap=3,
      targets=lambda p: jax.tree.map(lambda x: x.ndim == 2, p),
      **QUANTIZED,
  )
  model, optimizer, losses = _train_with_nnx_optimizer(make_tx())
  assert losses[-1] < 0.9 * losses[0]
  # codes are held in the nnx state
  held = jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))
  assert any(x.dtype == jnp.uint8 for x in held)
  # the same steps through the functional API give the same params
  graphdef, params = nnx.split(nnx.Linear(64, 256, rngs=nnx.Rngs(0)), nnx.Param)
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def functional_step(params, state):
    grads = jax.grad(lambda p: _nnx_loss(nnx.merge(graphdef, p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = params
  for _ in range(8):
    params, state = functional_step(params, state)
  stored = jax.tree.leaves(state, is_leaf=quantization.is_quantized)
  assert any(quantization.is_quantized(x) for x in stored)
  _, trained = nnx.split(model, nnx.Param)
  for a, b, s in zip(*map(jax.tree.leaves, (trained, params, start))):
    assert np.max(np.abs(b - s)) > 0.01  # trained
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_adamw_8bit_in_nnx_optimizer():
  _, _, losses = _train_with_nnx_optimizer(galore_optax.adamw_8bit(1e-2))
  assert losses[-1] < 0.5 * losses[0]


def test_bad_bits_are_refused():
  with pytest.raises(ValueError, match="moment_bits must be one of"):
    galore_optax.galore_adamw(1e-2, moment_bits=4)
  with pytest.raises(ValueError, match="projector_bits must be one of"):
    galore_optax.scale_by_galore(projector_bits=2)
  injected = optax.inject_hyperparams(
      galore_optax.galore_adamw, static_args=("rank", "update_proj_gap")
  )
  with pytest.raises(TypeError, match="list 'moment_bits' in static_args"):
    injected(learning_rate=1e-2, moment_bits=8).init(_big_params())


def test_training_resumes_exactly_with_quantized_state(tmp_path):
  cfg = lambda out, **kw: tiny_config(
      out, steps=6, checkpoint_every=3, **QUANTIZED, **kw
  )
  whole = train(cfg(tmp_path / "whole"), verbose=False)
  assert np.isfinite(whole.summary["val_loss"])
  train(cfg(tmp_path / "parts"), stop_after=3, verbose=False)
  resumed = train(cfg(tmp_path / "parts", resume=True), verbose=False)
  stored = jax.tree.leaves(resumed.opt_state, is_leaf=quantization.is_quantized)
  codebooks = {x.codebook for x in stored if quantization.is_quantized(x)}
  assert codebooks == {"dynamic", "dynamic_unsigned", "linear4"}
  for a, b in zip(
      jax.tree.leaves((whole.params, whole.opt_state)),
      jax.tree.leaves((resumed.params, resumed.opt_state)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
