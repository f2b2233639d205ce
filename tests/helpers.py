"""Helpers shared by the tests: a small params tree, gradient sequences, a
float64 NumPy GaLore, and the tiny training runs of the parallel tests."""

import re

import jax
import jax.numpy as jnp
import numpy as np


def random_params(shapes, seed=0, scale=1.0, dtype=jnp.float32):
  """Standard normal arrays times ``scale``, one per tuple in ``shapes``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
  )


def small_params(dtype=jnp.float32):
  """A transformer-like tree: two matrices GaLore targets by default, and two it
  does not."""
  shapes = {
      "attn": {"kernel": (16, 8)},
      "mlp": {"kernel": (8, 24), "bias": (24,)},
      "embed": (30, 8),
  }
  return random_params(shapes, dtype=dtype)


def grad_sequence(params, steps, seed=1):
  """Gradients that drift slowly, as real ones do, so successive bases differ
  moderately."""
  rng = np.random.default_rng(seed)
  drift = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  return [
      jax.tree.map(
          lambda d, p: jnp.asarray(
              d + 0.5 * rng.standard_normal(p.shape), p.dtype
          ),
          drift,
          params,
      )
      for _ in range(steps)
  ]


def run(tx, params, grads, jit=True):
  """Applies ``tx`` to ``grads`` in turn; returns the params after each step and
  the last state."""

  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return (
        jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates),
        state,
    )

  step = jax.jit(step) if jit else step
  state = tx.init(params)
  trajectory = []
  for g in grads:
    params, state = step(params, state, g)
    trajectory.append(params)
  return trajectory, state


def np_canonical(vectors, axis):
  """The sign rule of galore_optax.subspace.canonical_signs, in NumPy."""
  pivot = np.argmax(np.abs(vectors), axis=axis)
  picked = np.take_along_axis(vectors, np.expand_dims(pivot, axis), axis=axis)
  signs = np.sign(picked)
  signs[signs == 0] = 1
  return vectors * signs


def np_sides(m, n, proj_type):
  return {
      "std": (m < n, m >= n),
      "reverse_std": (m >= n, m < n),
      "left": (True, False),
      "right": (False, True),
      "full": (True, True),
  }[proj_type]


def np_basis(g, rank, proj_type):
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  u, vt = np_canonical(u[:, :rank], 0), np_canonical(vt[:rank], 1)
  use_left, use_right = np_sides(*g.shape, proj_type)
  return (u if use_left else None), (vt if use_right else None)


def np_project(g, left, right):
  r = np.asarray(g, np.float64)
  r = left.T @ r if left is not None else r
  return r @ right.T if right is not None else r


def np_project_back(n, left, right):
  n = left @ n if left is not None else n
  return n @ right if right is not None else n


def np_galore_adamw(
    p0,
    grads,
    *,
    rank,
    gap,
    scale,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    weight_decay=0.0,
    proj_type="std",
    moments="keep",
):
  """GaLore-AdamW on one matrix, in float64, written from the formulas.

  The update, then the decoupled decay of the updated weight.
  ``moments='reset'`` restarts Adam (moments and bias correction) at every
  refresh.
  """
  p = np.asarray(p0, np.float64)
  m = v = left = right = None
  t = 0  # Adam's own step count
  out = []
  for step, g in enumerate(grads):
    if step % gap == 0:
      left, right = np_basis(g, rank, proj_type)
      if moments == "reset":
        m = v = None
        t = 0
    t += 1
    r = np_project(g, left, right)
    m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
    v = (1 - b2) * r**2 if v is None else b2 * v + (1 - b2) * r**2
    c = np.sqrt(1 - b2**t) / (1 - b1**t)
    p = p - lr * scale * np_project_back(
        c * m / (np.sqrt(v) + eps), left, right
    )
    p = p * (1 - lr * weight_decay)
    out.append(p)
  return out


# ---------------------------------------------------------------------------
# parallel runs: the tiny GPT-2 runs of test_parallel.py and its 4-device worker
# refreshes at steps 0, 2, 4
TINY = dict(
    model="gpt2",
    preset="tiny",
    steps=5,
    batch_size=8,
    seq_len=32,
    max_data_bytes=100_000,
    log_every=5,
    eval_every=5,
    eval_batches=2,
    checkpoint_every=100,
    update_proj_gap=2,
    # the rate the layouts' tolerances were set at
    lr=3e-3,
)
LAYOUTS = {
    "data4": dict(mesh="data=4"),
    "fsdp4": dict(mesh="fsdp=4"),
    "data2_fsdp2": dict(mesh="data=2,fsdp=2"),
    "fsdp4_auto": dict(mesh="fsdp=4", mesh_axes="auto"),
    "data2_fsdp2_auto": dict(mesh="data=2,fsdp=2", mesh_axes="auto"),
    "pmap": dict(parallel="pmap"),
}
ENGINE = dict(
    mesh="fsdp=4",
    svd="randomized",
    moments="transport",
    lazy_threshold=0.0,
    lazy_patience=1,
)
# ViT on digits: images split over the mesh
VIT = dict(model="vit", mesh="data=2,fsdp=2")
# LLaMA's grouped-query attention and rotary embeddings split over the mesh,
# in the layer-wise step
LLAMA = dict(model="llama", mesh="data=2,fsdp=2", layerwise=True)
# 8-bit moments and INT4 bases, split over fsdp
QUANTIZED = dict(mesh="fsdp=4", moment_bits=8, projector_bits=4)
# the layer-wise step (blocks stacked) on a mesh that splits them
LAYERWISE = dict(mesh="data=2,fsdp=2", layerwise=True)
# a vocabulary fsdp=4 does not divide: the table is split along its width
SPLIT_WIDTH = dict(mesh="fsdp=4", layerwise=True, vocab_size=258)
# vocabulary tables far larger than the rest of the tiny model, split along
# the vocabulary (32768) or along the width (32770) over fsdp=4
LARGE_VOCABULARIES = (32768, 32770)
# Fira and APOLLO: 3 steps on fsdp=4, resumed on data=2,fsdp=2
FOLLOWUPS = {
    "fira": dict(optimizer="fira_adamw"),
    "apollo": dict(optimizer="apollo_adamw"),
}
# 3 steps on the first, the rest on the second
RESUMED = (
    dict(mesh="fsdp=4"),
    dict(mesh="data=2,fsdp=2"),
)


def tiny_config(out, **kw):
  """:data:`TINY` with ``kw``; update_proj_gap only for optimizers that take
  it."""
  from train import config as config_lib
  from train import optimizers

  base = dict(TINY)
  if (
      "update_proj_gap"
      not in optimizers.OPTIMIZERS[kw.get("optimizer", "galore_adamw")].flags
  ):
    del base["update_proj_gap"]
  return config_lib.TrainConfig(out=str(out), **{**base, **kw})


def flat_params(params) -> dict:
  from galore_optax.targets import leaf_paths

  return dict(
      zip(leaf_paths(params), (np.asarray(x) for x in jax.tree.leaves(params)))
  )


def stacked_blocks(flat: dict) -> dict:
  """``blocks/<i>/rest`` entries of :func:`flat_params` as one ``blocks/rest``
  array stacked over ``i`` (the layer-wise layout); other entries as they
  are."""
  out, layers = {}, {}
  for path, x in flat.items():
    match = re.fullmatch(r"blocks/(\d+)/(.*)", path)
    if match:
      layers.setdefault(match[2], {})[int(match[1])] = x
    else:
      out[path] = x
  for rest, by_layer in layers.items():
    out[f"blocks/{rest}"] = np.stack([by_layer[i] for i in sorted(by_layer)])
  return out
