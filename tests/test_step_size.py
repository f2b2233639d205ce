"""The step-size rule (scale='rms' / 'norm'): a targeted matrix's update gets
the size of the full-rank inner optimizer's, so one learning rate serves every
leaf."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax
from galore_optax import step_size

M, N, RANK = 96, 160, 16


def _rms(x) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _rms_ratios(low_rank, full, shape=(M, N), steps=12, seed=0):
  """RMS of ``low_rank``'s update over ``full``'s, step by step, on the same
  random gradients (one leaf ``w``)."""
  params = {"w": jnp.zeros(shape)}
  opts = low_rank, full
  updates = [jax.jit(opt.update) for opt in opts]
  states = [opt.init(params) for opt in opts]
  ratios = []
  for t in range(steps):
    grads = {"w": jax.random.normal(jax.random.PRNGKey(seed + t), shape)}
    (a, states[0]), (b, states[1]) = (
        update(grads, s, params) for update, s in zip(updates, states)
    )
    ratios.append(_rms(a["w"]) / _rms(b["w"]))
  return np.array(ratios)


def _adamw():
  return optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0)


def test_the_rms_factor_is_the_float64_statement():
  """An orthonormal basis keeps norms: r rows (or r x r entries) of unit-size
  entries, projected back, have sqrt(r / k) (or r / sqrt(m n)) of the RMS of m
  x n unit-size entries."""
  rng = np.random.default_rng(0)
  left = np.linalg.qr(rng.normal(size=(M, RANK)))[0]  # U_r, M x r
  right = np.linalg.qr(rng.normal(size=(N, RANK)))[0].T  # V_r^T, r x N
  signs = lambda *shape: rng.choice([-1.0, 1.0], size=shape)
  backs = {
      "left": left @ signs(RANK, N),
      "right": signs(M, RANK) @ right,
      "full": left @ signs(RANK, RANK) @ right,
  }
  for proj_type, back in backs.items():
    plan = galore_optax.plan_leaves(
        {"w": jnp.zeros((M, N))}, rank=RANK, proj_type=proj_type
    )[0]
    rms = np.sqrt(np.mean(back**2))  # a full update of signs has RMS 1
    assert step_size.rms_factor(plan) * rms == pytest.approx(1.0, rel=1e-12)
  # and by hand, in float64
  plans = {
      pt: galore_optax.plan_leaves(
          {"w": jnp.zeros((M, N))}, rank=RANK, proj_type=pt
      )[0]
      for pt in galore_optax.PROJ_TYPES
  }
  assert step_size.rms_factor(plans["std"]) == math.sqrt(M / RANK)  # M < N
  assert step_size.rms_factor(plans["reverse_std"]) == math.sqrt(N / RANK)
  assert step_size.rms_factor(plans["full"]) == pytest.approx(
      math.sqrt(M * N) / RANK
  )


@pytest.mark.parametrize("proj_type", galore_optax.PROJ_TYPES)
@pytest.mark.parametrize("shape", [(M, N), (N, M)])
def test_galore_under_the_rule_moves_like_adamw(proj_type, shape):
  galore = galore_optax.galore_adamw(
      1.0, rank=RANK, scale="rms", proj_type=proj_type, update_proj_gap=5
  )
  ratios = _rms_ratios(galore, _adamw(), shape)
  # 'full' projects G onto its own top singular pairs at a refresh: R is then
  # diagonal, and Adam's first output has r nonzero entries of r^2. From the
  # second step on the moments fill every entry.
  checked = ratios[1:] if proj_type == "full" else ratios
  np.testing.assert_allclose(checked, 1.0, atol=0.1)
  # the paper's 0.25 moves the matrices 4 sqrt(k / r) times less
  paper = _rms_ratios(
      galore_optax.galore_adamw(
          1.0, rank=RANK, scale=0.25, proj_type=proj_type, update_proj_gap=5
      ),
      _adamw(),
      shape,
  )
  assert paper.max() < 0.2


def test_rule_is_per_leaf_for_per_leaf_ranks():
  params = {
      "a": jnp.zeros((32, 64)),
      "b": jnp.zeros((64, 48)),
      "c": jnp.zeros((8, 24)),  # rank 12 is clamped to 8: a full-rank leaf
      "stack": jnp.zeros((3, 16, 40)),
  }
  ranks = {"a": 4, "b": 12, "c": 12, "stack": 4}
  axes = lambda path, shape: (
      galore_optax.MatrixAxes(rows=1, cols=2)
      if path == "stack"
      else galore_optax.MatrixAxes()
  )
  # sqrt(k / r), k the side the 'std' basis shortens (the smaller one)
  expected = {
      "a": math.sqrt(32 / 4),
      "b": math.sqrt(48 / 12),
      "c": 1.0,
      "stack": math.sqrt(16 / 4),
  }
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params
  )
  updates = {}
  for scale in ("rms", 1.0):
    tx = galore_optax.scale_by_galore(
        rank=lambda path, shape: ranks[path],
        scale=scale,
        matrix_axes=axes,
        targets=jax.tree.map(lambda _: True, params),
    )
    updates[scale] = tx.update(grads, tx.init(params))[0]
  for name, factor in expected.items():
    np.testing.assert_allclose(
        updates["rms"][name], factor * updates[1.0][name], rtol=1e-6
    )


def test_adaptive_ranks_get_their_own_factor():
  params = {"a": jnp.zeros((64, 64)), "b": jnp.zeros((64, 64))}
  ranks = {"a": 4, "b": 16}
  plans = galore_optax.plan_leaves(params, rank=ranks, proj_type="std")
  assert [step_size.rms_factor(p) for p in plans] == [4.0, 2.0]
  assert step_size.describe(plans, "rms") == "64x64 r4: 4, 64x64 r16: 2"


def test_norm_rule_gives_a_projected_sgd_step_the_gradient_norm():
  params = {"w": jnp.zeros((4, M, N))}  # four matrices
  tx = galore_optax.galore_sgd(
      1.0,
      rank=RANK,
      scale="norm",
      matrix_axes=galore_optax.MatrixAxes(rows=1, cols=2),
      targets={"w": True},
  )
  state = tx.init(params)
  for t in range(3):
    g = jax.random.normal(jax.random.PRNGKey(t), (4, M, N))
    g = g * jnp.arange(1.0, 5.0)[:, None, None]  # matrices of other norms
    update, state = tx.update({"w": g}, state, params)
    np.testing.assert_allclose(
        jnp.linalg.norm(update["w"], axis=(1, 2)),
        jnp.linalg.norm(g, axis=(1, 2)),
        rtol=1e-5,
    )


def test_sign_based_inner_optimizers_match_exactly():
  """Lion's entries are +-1 in the subspace and out of it: the rule is exact."""
  ratios = _rms_ratios(
      galore_optax.galore_lion(1.0, rank=RANK, scale="rms"), optax.lion(1.0)
  )
  np.testing.assert_allclose(ratios, 1.0, rtol=1e-5)


def test_adafactor_under_the_rule_is_near_adafactor():
  """Factored statistics of a low-rank gradient differ from a full one's more
  than Adam's do: within 25%, not 10%."""
  ratios = _rms_ratios(
      galore_optax.galore_adafactor(
          1.0, rank=RANK, scale="rms", min_dim_size_to_factor=8
      ),
      optax.adafactor(1.0, min_dim_size_to_factor=8),
  )
  np.testing.assert_allclose(ratios, 1.0, atol=0.25)


def test_lamb_trust_ratio_cancels_the_scale():
  grads = {"w": jax.random.normal(jax.random.PRNGKey(0), (M, N))}
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (M, N))}
  out = []
  for scale in ("rms", 0.25):
    tx = galore_optax.galore_lamb(1.0, rank=RANK, scale=scale)
    out.append(tx.update(grads, tx.init(params), params)[0]["w"])
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-7)


def test_fira_rule_scales_its_whole_update_and_apollo_rule_is_k_over_r():
  grads = {"w": jax.random.normal(jax.random.PRNGKey(0), (M, N))}
  params = {"w": jnp.zeros((M, N))}

  def first_update(tx):
    return tx.update(grads, tx.init(params), params)[0]["w"]

  # the subspace step and the true residual (alpha 1), both times sqrt(k / r)
  np.testing.assert_allclose(
      first_update(galore_optax.fira_adamw(1.0, rank=RANK, scale="rms")),
      math.sqrt(M / RANK)
      * first_update(galore_optax.fira_adamw(1.0, rank=RANK, scale=1.0)),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      first_update(galore_optax.apollo_adamw(1.0, rank=RANK, scale="rms")),
      first_update(galore_optax.apollo_adamw(1.0, rank=RANK, scale=M / RANK)),
      rtol=1e-6,
  )


@pytest.mark.parametrize("scaling_type", ["channel", "tensor"])
def test_apollo_under_the_rule_moves_like_adamw(scaling_type):
  """A Gaussian sketch keeps norms only approximately: within 15%."""
  ratios = _rms_ratios(
      galore_optax.apollo_adamw(
          1.0, rank=RANK, scale="rms", scaling_type=scaling_type
      ),
      _adamw(),
  )
  np.testing.assert_allclose(ratios, 1.0, atol=0.15)


def test_rule_survives_inject_hyperparams_as_a_static_argument():
  opt = optax.inject_hyperparams(
      galore_optax.galore_adamw, static_args=("rank", "update_proj_gap")
  )(learning_rate=1.0, rank=RANK, update_proj_gap=5, scale="rms")
  ratios = _rms_ratios(opt, _adamw(), steps=3)
  np.testing.assert_allclose(ratios, 1.0, atol=0.1)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: galore_optax.galore_adamw(1.0, scale="wide"),
            "unknown scale rule 'wide'",
        ),
        (
            lambda: galore_optax.galore_adamw(1.0, scale=-1.0),
            "scale must be a finite number >= 0, got -1.0",
        ),
        (
            lambda: galore_optax.fira_adamw(1.0, scale="norm"),
            "under Fira's residual use scale='rms'",
        ),
        (
            lambda: galore_optax.apollo_adamw(1.0, scale="norm"),
            "unknown scale rule 'norm'",
        ),
    ],
)
def test_bad_scales_are_refused_at_construction(make, message):
  with pytest.raises(ValueError, match=message):
    make()
