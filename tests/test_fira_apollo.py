"""Fira's residual and APOLLO: step for step against their PyTorch references
(``fira``'s FiraAdamW, ``apollo-torch``'s APOLLOAdamW) and against float64
NumPy statements of their updates, and inside optax's machinery.

Where a reference draws random numbers (APOLLO's projection) both are fed the
same projection; where it takes an SVD, torch's SVD is given our sign rule, as
in test_reference_parity.py.
"""

import warnings
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_reference_parity import _canonical_torch_svd

with warnings.catch_warnings():
  warnings.simplefilter("ignore")
  from apollo_torch import APOLLOAdamW
  from apollo_torch import random_projector
  from fira import FiraAdamW

import galore_optax
from galore_optax import apollo as apollo_lib
from galore_optax import projection
from galore_optax import scaling
from galore_optax import steps

SHAPES = {"tall": (12, 7), "wide": (6, 11)}
HP = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1)
ADAMW = {k: HP[k] for k in ("b1", "b2", "eps", "weight_decay")}  # ours


def _grads(shape, steps, seed, growth=1.0):
  """Gradients that drift slowly, for a matrix and a bias; ``growth`` > 1
  makes their norm grow step by step, so that the limiter acts."""
  rng = np.random.default_rng(seed)
  drift = rng.standard_normal(shape)
  return [
      {
          "w": (
              (growth**t * (drift + 0.5 * rng.standard_normal(shape))).astype(
                  np.float32
              )
          ),
          "b": rng.standard_normal(shape[1]).astype(np.float32),
      }
      for t in range(steps)
  ]


def _init(shape, seed):
  rng = np.random.default_rng(seed + 100)
  return {
      "w": rng.standard_normal(shape).astype(np.float32),
      "b": rng.standard_normal(shape[1]).astype(np.float32),
  }


def _run_torch(opt_cls, p0, grads, group, **kw):
  w = torch.nn.Parameter(torch.tensor(p0["w"]))
  b = torch.nn.Parameter(torch.tensor(p0["b"]))
  opt = opt_cls(
      [{"params": [b]}, {"params": [w], **group}],
      lr=HP["lr"],
      betas=(HP["b1"], HP["b2"]),
      eps=HP["eps"],
      weight_decay=HP["weight_decay"],
      **kw,
  )
  out = []
  for g in grads:
    w.grad, b.grad = torch.tensor(g["w"]), torch.tensor(g["b"])
    opt.step()
    out.append({"w": w.detach().numpy().copy(), "b": b.detach().numpy().copy()})
  return out


def _run_ours(tx, p0, grads):
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, p0)
  state = tx.init(params)
  out = []
  for g in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, g))
    out.append(jax.tree.map(np.asarray, params))
  return out, state


def _assert_same(ref, ours, p0):
  assert np.abs(ref[-1]["w"] - p0["w"]).max() > 1e-2  # the run really moved
  for t, (a, b) in enumerate(zip(ref, ours)):
    for k in a:
      np.testing.assert_allclose(
          b[k], a[k], atol=3e-6, rtol=1e-5, err_msg=f"{k} after step {t}"
      )


# ---------------------------------------------------------------------------
# Fira


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_fira_matches_fira_adamw(shape_name, proj_type):
  shape = SHAPES[shape_name]
  p0, grads = _init(shape, 0), _grads(shape, steps=8, seed=1, growth=1.3)
  group = dict(rank=3, update_proj_gap=3, alpha=0.25, proj_type=proj_type)
  with mock.patch.object(torch.linalg, "svd", _canonical_torch_svd):
    ref = _run_torch(FiraAdamW, p0, grads, group, no_deprecation_warning=True)
  tx = galore_optax.fira_adamw(
      HP["lr"],
      **ADAMW,
      rank=3,
      update_proj_gap=3,
      scale=0.25,
      proj_type=proj_type,
  )
  ours, _ = _run_ours(tx, p0, grads)
  _assert_same(ref, ours, p0)


def _canonical_basis(g, rank, left):
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  if left:
    b = u[:, :rank]
    return b * np.sign(b[np.abs(b).argmax(0), np.arange(rank)])
  b = vt[:rank]
  return b * np.sign(b[np.arange(rank), np.abs(b).argmax(1)])[:, None]


def _fira_numpy(g_seq, rank, gap, scale, b1=0.9, b2=0.999, eps=1e-6):
  """Fira's update for one matrix, in float64: GaLore-Adam on the projected
  gradient plus the residual, scaled per channel and limited to 1.01 growth.
  Returns the updates (before the learning rate) and how often the limiter
  acted."""
  m, n = g_seq[0].shape
  left = m < n  # 'std'
  mu = nu = prev = None
  updates, limited = [], 0
  for t, g in enumerate(g_seq, start=1):
    g = g.astype(np.float64)
    if (t - 1) % gap == 0:
      p = _canonical_basis(g, rank, left)
    r = p.T @ g if left else g @ p.T
    mu = (1 - b1) * r if mu is None else b1 * mu + (1 - b1) * r
    nu = (1 - b2) * r * r if nu is None else b2 * nu + (1 - b2) * r * r
    step = mu / (np.sqrt(nu) + eps)
    back = p @ step if left else step @ p
    back_r = p @ r if left else r @ p
    axis = 0 if left else 1
    phi = np.linalg.norm(step, axis=axis, keepdims=True) / (
        np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8
    )
    s = (g - scale * back_r) * phi
    norm = np.linalg.norm(s)
    if prev is not None and norm > 1.01 * prev:
      s, norm, limited = s * 1.01 * prev / norm, 1.01 * prev, limited + 1
    prev = norm
    c = np.sqrt(1 - b2**t) / (1 - b1**t)
    updates.append(c * (scale * back + s))
  return updates, limited


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_fira_matches_a_float64_statement(shape_name):
  shape = SHAPES[shape_name]
  grads = [g["w"] for g in _grads(shape, steps=7, seed=2, growth=1.2)]
  expected, limited = _fira_numpy(grads, rank=3, gap=3, scale=0.5)
  assert limited >= 2  # the limiter acted, and refreshes came at steps 0, 3, 6
  tx = galore_optax.scale_by_galore(
      galore_optax.scale_by_reference_adam(bias_correction=False),
      rank=3,
      update_proj_gap=3,
      scale=0.5,
      residual="fira",
  )
  tx = optax.chain(tx, galore_optax.scale_by_bias_correction())
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for t, (g, want) in enumerate(zip(grads, expected)):
    u, state = update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(
        u["w"], want, rtol=2e-4, atol=2e-6, err_msg=f"step {t}"
    )
  # one float32 of limiter state per matrix
  assert state[0].residual_norm["w"].shape == ()


def test_fira_at_full_rank_is_galore():
  # with rank min(m, n) and scale 1 nothing lies outside the subspace
  shape = SHAPES["tall"]
  grads = _grads(shape, steps=5, seed=3)
  p0 = _init(shape, 3)
  kw = dict(rank=min(shape), update_proj_gap=2, scale=1.0)
  fira, _ = _run_ours(galore_optax.fira_adamw(1e-2, **kw), p0, grads)
  galore, _ = _run_ours(galore_optax.galore_adamw(1e-2, **kw), p0, grads)
  for a, b in zip(fira, galore):
    np.testing.assert_allclose(a["w"], b["w"], atol=2e-6)


@pytest.mark.parametrize(
    "options",
    [
        dict(proj_type="full"),
        dict(proj_type="left", svd="randomized"),
        dict(proj_type="right", svd="gram", moments="reset"),
        dict(moments="transport", moment_bits=8, projector_bits=4),
    ],
    ids=["full", "left-randomized", "right-gram-reset", "transport-quantized"],
)
def test_fira_runs_with_every_option(options):
  # with every option the steps are finite and differ from GaLore's: the
  # residual is there, and its norm is kept
  shape = (64, 80)  # large enough to be quantized
  grads = _grads(shape, steps=3, seed=4)
  p0 = _init(shape, 4)
  kw = dict(rank=8, update_proj_gap=2)
  fira, state = _run_ours(
      galore_optax.fira_adamw(1e-2, **kw, **options), p0, grads
  )
  galore, _ = _run_ours(
      galore_optax.galore_adamw(1e-2, **kw, **options), p0, grads
  )
  assert all(np.isfinite(p["w"]).all() for p in fira)
  assert np.abs(fira[-1]["w"] - galore[-1]["w"]).max() > 1e-3
  norms = galore_optax.find_states(state, galore_optax.GaLoreState)[
      0
  ].residual_norm["w"]
  assert float(norms) > 0


# ---------------------------------------------------------------------------
# APOLLO


def _apollo_projection(p0, rank, gap, our_seed):
  """Our projections of leaf "w", as the torch projector's generator: the
  projector calls it at steps 0, gap, 2 gap, ..."""
  (plan,) = [
      p
      for p in galore_optax.plan_leaves(
          {"b": p0["b"], "w": p0["w"]}, rank=rank, proj_type="std"
      )
      if p is not None
  ]
  # leaf index 1: "w" comes after "b" in the flattened tree
  calls = iter(range(0, 10**6, gap))

  def generate(self, weights, rank, type, seed):
    del seed  # the reference's own; ours is our_seed
    key = apollo_lib.projection_key(our_seed, 1, next(calls), gap)
    left, right = apollo_lib.random_bases(key, plan)
    return torch.tensor(np.asarray(left if left is not None else right))

  return generate


@pytest.mark.parametrize("scaling_type", ["channel", "tensor"])
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_apollo_matches_apollo_adamw(shape_name, scaling_type):
  shape = SHAPES[shape_name]
  p0, grads = _init(shape, 5), _grads(shape, steps=8, seed=6, growth=1.3)
  rank, gap, scale = 3, 3, 4.0
  group = dict(
      rank=rank,
      update_proj_gap=gap,
      scale=scale,
      proj_type="std",
      proj="random",
      scale_type=scaling_type,
  )
  with mock.patch.object(
      random_projector.GradientProjector,
      "get_orthogonal_matrix",
      _apollo_projection(p0, rank, gap, our_seed=7),
  ):
    ref = _run_torch(APOLLOAdamW, p0, grads, group)
  tx = galore_optax.apollo_adamw(
      HP["lr"],
      **ADAMW,
      rank=rank,
      update_proj_gap=gap,
      scale=scale,
      scaling_type=scaling_type,
      seed=7,
  )
  ours, state = _run_ours(tx, p0, grads)
  _assert_same(ref, ours, p0)
  # nothing but low-rank moments, a count and one scalar per matrix
  (s,) = galore_optax.find_states(state, galore_optax.ApolloState)
  tall = shape[0] >= shape[1]
  low = (shape[0], rank) if tall else (rank, shape[1])
  assert s.inner_state.mu["w"].shape == low
  assert s.scaled_norm["w"].shape == ()


def _apollo_numpy(
    g_seq, bases, gap, scale, channel, b1=0.9, b2=0.999, eps=1e-6
):
  """APOLLO's update for one matrix in float64, given the projection of each
  period."""
  m, n = g_seq[0].shape
  left = m < n
  mu = nu = prev = None
  updates = []
  for t, g in enumerate(g_seq, start=1):
    g = g.astype(np.float64)
    p = bases[(t - 1) // gap].astype(np.float64)
    r = p.T @ g if left else g @ p.T
    mu = (1 - b1) * r if mu is None else b1 * mu + (1 - b1) * r
    nu = (1 - b2) * r * r if nu is None else b2 * nu + (1 - b2) * r * r
    step = mu / (np.sqrt(nu) + eps)
    axis = (0 if left else 1) if channel else None
    ratio = np.linalg.norm(step, axis=axis, keepdims=channel) / (
        np.linalg.norm(r, axis=axis, keepdims=channel) + 1e-8
    )
    s = g * ratio
    norm = np.linalg.norm(s)
    if prev is not None and norm > 1.01 * prev:
      s, norm = s * 1.01 * prev / norm, 1.01 * prev
    prev = norm
    c = np.sqrt(1 - b2**t) / (1 - b1**t)
    updates.append(c * np.sqrt(scale) * s)
  return updates


@pytest.mark.parametrize("scaling_type", ["channel", "tensor"])
def test_apollo_matches_a_float64_statement(scaling_type):
  shape, gap, rank = SHAPES["wide"], 2, 3
  grads = [g["w"] for g in _grads(shape, steps=5, seed=8, growth=1.2)]
  (plan,) = galore_optax.plan_leaves(
      {"w": jnp.zeros(shape)}, rank=rank, proj_type="std"
  )
  bases = [
      np.asarray(
          apollo_lib.random_bases(
              apollo_lib.projection_key(3, 0, t, gap), plan
          )[0]
      )
      for t in range(0, len(grads), gap)
  ]
  expected = _apollo_numpy(
      grads, bases, gap, scale=2.0, channel=scaling_type == "channel"
  )
  tx = optax.chain(
      galore_optax.scale_by_apollo(
          galore_optax.scale_by_reference_adam(bias_correction=False),
          rank=rank,
          update_proj_gap=gap,
          scale=2.0,
          scaling_type=scaling_type,
          seed=3,
      ),
      galore_optax.scale_by_bias_correction(),
  )
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for t, (g, want) in enumerate(zip(grads, expected)):
    u, state = update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(
        u["w"], want, rtol=2e-4, atol=2e-6, err_msg=f"step {t}"
    )


def test_apollo_projection_comes_from_seed_leaf_and_period():
  (plan,) = galore_optax.plan_leaves(
      {"w": jnp.zeros((8, 20))}, rank=4, proj_type="std"
  )

  def basis(seed, leaf, step):
    key = apollo_lib.projection_key(seed, leaf, jnp.int32(step), 5)
    return np.asarray(apollo_lib.random_bases(key, plan)[0])

  b = basis(0, 0, 0)
  assert b.shape == (8, 4)
  np.testing.assert_array_equal(b, basis(0, 0, 4))  # same period
  assert not np.allclose(b, basis(0, 0, 5))  # the next period
  assert not np.allclose(b, basis(0, 1, 0))  # another leaf
  assert not np.allclose(b, basis(1, 0, 0))  # another seed
  # entries of variance 1 / r
  many = np.concatenate([basis(0, 0, 5 * k).ravel() for k in range(50)])
  assert abs(many.var() * 4 - 1) < 0.1


def test_apollo_state_is_smaller_than_galores():
  params = {"w": jnp.zeros((256, 512)), "b": jnp.zeros(512)}

  def matrix_bytes(tx):
    report = galore_optax.memory_report(params, tx)
    return {leaf.path: leaf for leaf in report.leaves}["w"]

  mini = matrix_bytes(galore_optax.apollo_mini(1e-2))
  # a 1 x 512 projection: 2 x 512 float32 moments and the limiter's scalar,
  # against AdamW's 2 x 256 x 512
  assert mini.state_bytes == 4 * (2 * 512 + 1)
  assert mini.state_bytes < 0.01 * mini.adamw_bytes
  # no stored projector: GaLore at the same rank also holds its 256 x 8 basis
  # (and its refresh bookkeeping)
  apollo = matrix_bytes(galore_optax.apollo_adamw(1e-2, rank=8))
  galore = matrix_bytes(galore_optax.galore_adamw(1e-2, rank=8))
  assert apollo.state_bytes == 4 * (2 * 8 * 512 + 1)
  assert galore.state_bytes - apollo.state_bytes > 4 * 256 * 8


# ---------------------------------------------------------------------------
# Both, in optax's machinery


FOLLOWUPS = {
    "fira_adamw": lambda lr, **kw: galore_optax.fira_adamw(
        lr, rank=3, update_proj_gap=2, **kw
    ),
    "apollo_adamw": lambda lr, **kw: galore_optax.apollo_adamw(
        lr, rank=3, update_proj_gap=2, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(FOLLOWUPS))
def test_inject_hyperparams_and_multisteps(name):
  p0 = _init(SHAPES["tall"], 9)
  grads = _grads(SHAPES["tall"], steps=6, seed=9)
  factory = FOLLOWUPS[name]
  plain, _ = _run_ours(factory(1e-2, scale=0.5), p0, grads)
  injected_tx = optax.inject_hyperparams(
      lambda learning_rate, scale: factory(learning_rate, scale=scale),
  )(learning_rate=1e-2, scale=0.5)
  injected, _ = _run_ours(injected_tx, p0, grads)
  chex.assert_trees_all_close(injected, plain, atol=1e-6)
  # MultiSteps over pairs of micro-batches equals one step on their mean
  pairs = [
      jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
      for i in range(0, len(grads), 2)
  ]
  once, _ = _run_ours(factory(1e-2, scale=0.5), p0, pairs)
  accumulated, _ = _run_ours(
      optax.MultiSteps(factory(1e-2, scale=0.5), 2), p0, grads
  )
  chex.assert_trees_all_close(accumulated[1::2], once, atol=1e-6)


def test_grouped_draws_are_the_per_leaf_draws():
  # one program per shape draws what each leaf's own key draws, to the bit
  params = {
      "a": jnp.zeros((64, 128)),
      "b": jnp.zeros((64, 128)),
      "c": jnp.zeros((128, 32)),
      "d": jnp.zeros((96, 64), jnp.bfloat16),
  }
  plans = {
      i: p
      for i, p in enumerate(
          galore_optax.plan_leaves(params, rank=8, proj_type="std")
      )
      if p is not None
  }
  dtypes = {i: x.dtype for i, x in enumerate(jax.tree.leaves(params))}
  assert len(plans) == 4
  for count in (0, 7, 13):
    grouped = apollo_lib.grouped_bases(5, plans, dtypes, jnp.int32(count), 5)
    for i, plan in plans.items():
      key = apollo_lib.projection_key(5, i, jnp.int32(count), 5)
      for want, got in zip(
          apollo_lib.random_bases(key, plan, dtypes[i]), grouped[i]
      ):
        assert (want is None) == (got is None)
        if want is not None:
          assert want.dtype == got.dtype
          np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


@pytest.mark.parametrize("side", ["left", "right"])
def test_fira_update_from_one_product_is_the_explicit_residual(side):
  # c G + alpha back(N - c R) against alpha back(N) + limit(ratio (G -
  # alpha back(R))), the residual formed, on an orthonormal basis
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)
  basis, _ = np.linalg.qr(
      rng.standard_normal((48 if side == "left" else 40, 8))
  )
  left = jnp.asarray(basis, jnp.float32) if side == "left" else None
  right = jnp.asarray(basis.T, jnp.float32) if side == "right" else None
  low = projection.project(g, left, right)
  out = jnp.asarray(rng.standard_normal(low.shape), jnp.float32)
  alpha, axes = 0.5, scaling.projected_axes(left is not None, right is not None)
  for previous, first in ((jnp.float32(0.0), True), (jnp.float32(0.3), False)):
    got, got_norm = steps.fira_update(
        g, out, low, left, right, alpha, previous, first, "highest"
    )
    outside = g - alpha * projection.project_back(low, left, right)
    limited, norm = steps.rescale(outside, out, low, axes, previous, first)
    want = alpha * projection.project_back(out, left, right) + limited
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_norm, norm, rtol=1e-5)
  assert float(norm) < 1.02 * 0.3  # the limiter acted in the second case
