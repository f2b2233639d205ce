"""The layer-wise step, remat, bf16 and the dry run (train/layerwise.py).

Layer-wise runs keep the blocks stacked (``blocks/attn/qkv/kernel`` of shape
``(layers, 64, 192)``); the standard runs they are compared with keep one entry
per block (``blocks/<i>/...``), restacked here.
"""

import dataclasses
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import flat_params
from helpers import random_params
from helpers import stacked_blocks
from helpers import tiny_config

from models import gpt2
from models.transformer import GALORE_TARGETS
from train import layerwise
from train.__main__ import main
from train.loop import train
from train.objectives import OBJECTIVES
from train.objectives import causal_lm
from train.parallel import FOOTPRINT

ATOL = 2e-6  # float32: the layouts sum in other orders


def _distance(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _run(tmp_path, name, **kw):
  return train(tiny_config(tmp_path / name, **kw), verbose=False)


def _layerwise_states(opt_state) -> list:
  is_state = lambda x: isinstance(x, layerwise.LayerwiseState)
  return [
      x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)
  ]


@pytest.mark.parametrize(
    "kw",
    [
        # refreshes at steps 0, 2 and 4; a bound tight enough to act at every
        # step (the unclipped one-pass step is compared under MultiSteps below)
        dict(clip=0.05),
        # AdamW runs on the stacked blocks as it is: weight decay still skips
        # the stacked biases and norms
        dict(model="vit", optimizer="adamw", clip=0.0, weight_decay=0.1),
    ],
    ids=["galore-clipped", "vit-adamw"],
)
def test_layerwise_equals_the_standard_step(tmp_path, kw):
  standard = _run(tmp_path, "standard", **kw)
  remat = _run(tmp_path, "remat", remat="block", **kw)
  fused = _run(tmp_path, "layerwise", layerwise=True, **kw)
  reference = stacked_blocks(flat_params(standard.params))
  # ViT's LayerNorm scales sit near 1, where Adam's normalised steps carry the
  # rounding differences (as in test_parallel.py)
  atol = 2 * ATOL if kw.get("model") == "vit" else ATOL
  # remat (stacked blocks, the optimizer run block by block) equals no remat
  assert _distance(flat_params(remat.params), reference) < atol
  # the layer-wise step equals the standard one, state included (the bases
  # are SVD outputs, which amplify the rounding)
  assert _distance(flat_params(fused.params), reference) < atol
  # (AdamW's remat run updates the stacked blocks whole, in AdamW's own state)
  for a, b in zip(
      jax.tree.leaves(_layerwise_states(remat.opt_state)),
      jax.tree.leaves(layerwise.unpack(_layerwise_states(fused.opt_state))),
      strict=kw.get("optimizer") != "adamw",
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=50 * ATOL)
  assert fused.summary["val_loss"] == pytest.approx(
      standard.summary["val_loss"], abs=1e-5
  )
  if kw.get("optimizer", "galore_adamw") == "galore_adamw":
    assert (
        fused.summary["refresh"]["bases_computed"]
        == standard.summary["refresh"]["bases_computed"]
        # refreshes at steps 0, 2 and 4 of every targeted matrix
        == 3
        * sum(
            bool(re.search(GALORE_TARGETS, p))
            for p in flat_params(standard.params)
        )
    )


def test_clipping_acts_and_matches_optax(tmp_path):
  # The bound of the clipped case above acts: the tiny model's first gradient
  # is far above it.
  objective = causal_lm.OBJECTIVE
  cfg = tiny_config(tmp_path)
  data = objective.load_data(cfg)
  graphdef, state = nnx.split(objective.build_model(cfg, data))
  batch = objective.batch(cfg, data, 0, np.arange(cfg.batch_size))
  grads = jax.jit(
      jax.grad(lambda s: objective.loss(nnx.merge(graphdef, s), batch)[0])
  )(state)
  assert optax.global_norm(grads) > 10 * 0.05
  # each leaf is scaled as optax.clip_by_global_norm does, above and below it
  grads = random_params({"a": (3, 4), "b": (5,)})
  norm = optax.global_norm(grads)
  for bound in (0.5 * norm, 2 * norm):
    expected, _ = optax.clip_by_global_norm(bound).update(grads, None)
    factor = layerwise.clip_factor(norm, bound)
    for path in grads:
      np.testing.assert_array_equal(factor(grads[path]), expected[path])


def test_layerwise_accumulates_like_multisteps(tmp_path):
  kw = dict(clip=0.0, grad_accum=2, steps=6)
  standard = _run(tmp_path, "standard", **kw)
  fused = _run(tmp_path, "layerwise", layerwise=True, **kw)
  reference = stacked_blocks(flat_params(standard.params))
  assert _distance(flat_params(fused.params), reference) < ATOL
  # 3 updates, refreshing at the first and third
  assert fused.summary["refresh"]["bases_computed"] == 2 * 8


@pytest.mark.parametrize(
    "kw",
    [
        dict(layerwise=True, param_dtype="bfloat16", compute_dtype="bfloat16"),
        dict(compute_dtype="bfloat16"),  # mixed precision
    ],
    ids=["bf16-layerwise", "mixed"],
)
def test_bfloat16_trains(tmp_path, kw):
  result = _run(
      tmp_path, "bf16", steps=40, update_proj_gap=10, eval_every=40, **kw
  )
  # from ln(256) = 5.55 nats, as the float32 run does
  assert np.isfinite(result.summary["val_loss"])
  assert result.summary["val_loss"] < 3.5
  dtype = jnp.dtype(kw.get("param_dtype", "float32"))
  assert {x.dtype for x in jax.tree.leaves(result.params)} == {dtype}


def test_bfloat16_layerwise_run_resumes_exactly(tmp_path):
  # the checkpoints hold the packed bf16 blocks (uint16 bits) and their state
  kw = dict(layerwise=True, param_dtype="bfloat16", steps=4, checkpoint_every=2)
  whole = _run(tmp_path, "whole", **kw)
  cfg = tiny_config(tmp_path / "parts", **kw)
  train(cfg, stop_after=2, verbose=False)
  resumed = train(dataclasses.replace(cfg, resume=True), verbose=False)
  for a, b in zip(
      jax.tree.leaves((whole.params, whole.opt_state)),
      jax.tree.leaves((resumed.params, resumed.opt_state)),
      strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # --init takes the packed, stacked blocks into any other layout
  saved = flat_params(whole.params)
  for layout in (dict(), dict(remat="block"), dict(layerwise=True)):
    cfg = tiny_config(tmp_path / "next", init=str(tmp_path / "whole"), **layout)
    objective = OBJECTIVES[cfg.objective]
    model = objective.build_model(cfg, objective.load_data(cfg))
    loaded = flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if not cfg.stacked:
      loaded = stacked_blocks(loaded)
    assert loaded.keys() == saved.keys(), layout
    for path, value in saved.items():
      np.testing.assert_array_equal(
          loaded[path], value.astype(np.float32), err_msg=path
      )


def test_pack_round_trips_16_bit_leaves_only():
  tree = {
      "bf16": jnp.asarray([1.5, -2.0, np.nan], jnp.bfloat16),
      "f32": jnp.ones(3),
      "int": jnp.arange(3),
  }
  packed = layerwise.pack(tree)
  assert isinstance(packed["bf16"], layerwise.Bits)
  assert packed["bf16"].data.dtype == jnp.uint16
  assert packed["f32"] is tree["f32"] and packed["int"] is tree["int"]
  back = layerwise.unpack(packed)
  np.testing.assert_array_equal(
      np.asarray(back["bf16"]).view(np.uint16),
      np.asarray(tree["bf16"]).view(np.uint16),
  )


def test_chunked_loss_equals_the_whole_batch_loss():
  objective = causal_lm.OBJECTIVE
  cfg = gpt2.GPT2Config(
      vocab_size=50257, max_len=64, d_model=32, n_layers=1, n_heads=2
  )
  model = gpt2.GPT2(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = tuple(jnp.asarray(rng.integers(0, 50257, (4, 64))) for _ in "xy")
  assert causal_lm.loss_chunks(4, 64, 50257, cfg.d_model) > 1
  graphdef, state = nnx.split(model)
  chunked = lambda s: objective.loss(nnx.merge(graphdef, s), batch)[0]
  whole = lambda s: objective.logits_loss(
      nnx.merge(graphdef, s)(batch[0]), batch
  )[0]
  assert jax.jit(chunked)(state) == pytest.approx(
      float(jax.jit(whole)(state)), rel=1e-6
  )
  for a, b in zip(
      jax.tree.leaves(jax.jit(jax.grad(chunked))(state)),
      jax.tree.leaves(jax.jit(jax.grad(whole))(state)),
  ):
    np.testing.assert_allclose(a, b, atol=1e-7)


def _dry_run(out, *flags) -> dict:
  code = main([
      "gpt2",
      "--dry-run",
      "--out",
      str(out),
      "--preset",
      "tiny",
      "--batch-size",
      "8",
      "--seq-len",
      "32",
      *flags,
  ])
  assert code == 0
  return json.loads((out / "summary.json").read_text())


def test_dry_run_compiles_what_the_real_run_runs(tmp_path, capsys):
  dry = _dry_run(
      tmp_path / "dry",
      "--max-data-bytes",
      "100000",
      "--update-proj-gap",
      "2",
      "--layerwise",
  )
  assert "XLA footprint" in capsys.readouterr().out
  assert not (tmp_path / "dry" / "checkpoints").exists()
  real = train(
      tiny_config(
          tmp_path / "real", steps=1, layerwise=True, update_proj_gap=2
      ),
      verbose=False,
  )
  assert dry["per_device"] == {
      **real.summary["per_device"],
      "xla_train_step": dry["per_device"]["xla_train_step"],
  }
  # the same program: XLA's sizes agree (the code size may not)
  sizes = lambda s: {k: s["per_device"]["xla_train_step"][k] for k in FOOTPRINT}
  assert sizes(dry) == sizes(real.summary)
  assert dry["optimizer_state_bytes"] == real.summary["optimizer_state_bytes"]


def test_layerwise_footprint_is_below_the_standard_steps(tmp_path):
  footprint = lambda *flags: _dry_run(
      tmp_path / "-".join(flags or ("std",)),
      "--vocab-size",
      "50257",
      "--overwrite",
      *flags,
  )["per_device"]["xla_train_step"]["footprint_bytes"]
  standard, remat, fused = (
      footprint(),
      footprint("--remat", "block"),
      footprint("--layerwise"),
  )
  assert fused < remat < standard


def test_dry_run_of_7b_allocates_nothing(tmp_path):
  # The child reports its own peak resident memory: VmHWM, its address space's
  # high-water mark. (ru_maxrss would not do: Linux carries the spawning
  # process's peak across exec, and pytest's own grows past a gigabyte.)
  script = (
      "import sys; from train.__main__ import main;"
      " code = main(sys.argv[1:]);"
      " print(next(l for l in open('/proc/self/status') if 'VmHWM' in l));"
      " sys.exit(code)"
  )
  proc = subprocess.run(
      [
          sys.executable,
          "-c",
          script,
          "gpt2",
          "--dry-run",
          "--preset",
          "7b",
          "--layerwise",
          "--param-dtype",
          "bfloat16",
          "--compute-dtype",
          "bfloat16",
          "--rank",
          "1024",
          "--batch-size",
          "1",
          "--seq-len",
          "256",
          "--out",
          str(tmp_path),
      ],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  params = summary["per_device"]["param_bytes"]
  assert summary["n_params"] > 6.4e9 and params > 12 * 2**30
  peak = int(re.search(r"VmHWM:\s+(\d+) kB", proc.stdout)[1]) * 1024
  assert peak < params / 4  # the process never held the parameters


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layerwise", "--remat", "none"], "needs --remat block"),
        (["--layerwise", "--parallel", "pmap"], "drop --parallel pmap"),
        (["--layerwise", "--grad-accum", "2"], "needs --clip 0"),
        (["--dry-run", "--parallel", "pmap"], "drop --parallel pmap"),
        (["--param-dtype", "float16"], "unknown --param-dtype"),
        (["--remat", "all"], "unknown --remat"),
        (["--grad-accum", "0"], "--grad-accum must be positive"),
        (["--vocab-size", "100", "--steps", "1"], "smaller than the data's"),
    ],
)
def test_unsupported_combinations_fail_clearly(
    tmp_path, capsys, flags, message
):
  code = main(["gpt2", "--preset", "tiny", "--out", str(tmp_path), *flags])
  assert code == 2
  assert message in capsys.readouterr().err
