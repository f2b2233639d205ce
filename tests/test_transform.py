"""scale_by_galore and the aliases: the algorithm, targets, ranks, axes, state
and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import grad_sequence
from helpers import np_basis
from helpers import np_galore_adamw
from helpers import np_project
from helpers import np_project_back
from helpers import run
from helpers import small_params

import galore_optax
from galore_optax import MatrixAxes


@pytest.mark.parametrize("proj_type", galore_optax.PROJ_TYPES)
def test_galore_adamw_matches_float64_statement(params, proj_type):
  grads = grad_sequence(params, 7)
  hp = dict(rank=3, scale=0.5, lr=1e-2, weight_decay=0.05, proj_type=proj_type)
  if proj_type == "full":
    # see test_reference_parity: damp noise off the r x r diagonal
    hp.update(b2=0.0, eps=0.1)
  tx = galore_optax.galore_adamw(
      hp["lr"],
      b2=hp.get("b2", 0.999),
      eps=hp.get("eps", 1e-6),
      weight_decay=hp["weight_decay"],
      rank=3,
      update_proj_gap=3,
      scale=0.5,
      proj_type=proj_type,
  )
  trajectory, _ = run(tx, params, grads)
  for name in ("attn", "mlp"):
    ref = np_galore_adamw(
        params[name]["kernel"], [g[name]["kernel"] for g in grads], gap=3, **hp
    )
    for t, (ours, want) in enumerate(zip(trajectory, ref)):
      np.testing.assert_allclose(
          ours[name]["kernel"], want, atol=2e-5, err_msg=f"{name} step {t}"
      )


def test_untargeted_leaves_get_the_plain_inner_update(params):
  grads = grad_sequence(params, 3)
  galore, _ = run(galore_optax.galore_adamw(1e-2, rank=2), params, grads)
  plain, _ = run(
      optax.chain(
          galore_optax.scale_by_reference_adam(),
          optax.scale_by_learning_rate(1e-2),
      ),
      params,
      grads,
  )
  for leaf in (("embed",), ("mlp", "bias")):  # unscaled, full rank
    get = (
        lambda t, leaf=leaf: t[leaf[0]]
        if len(leaf) == 1
        else t[leaf[0]][leaf[1]]
    )
    np.testing.assert_allclose(get(galore[-1]), get(plain[-1]), rtol=1e-6)
  assert not np.allclose(
      galore[-1]["attn"]["kernel"], plain[-1]["attn"]["kernel"], rtol=1e-3
  )


def test_refresh_happens_exactly_every_gap_steps(params):
  tx = galore_optax.scale_by_galore(rank=2, update_proj_gap=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  bases = []
  for g in grad_sequence(params, 8):
    _, state = update(g, state)
    bases.append(np.asarray(state.projector.right["attn"]["kernel"]))
  changed = [
      t for t in range(1, 8) if not np.array_equal(bases[t], bases[t - 1])
  ]
  assert changed == [3, 6]
  assert update._cache_size() == 1  # the refresh is a lax.cond, not a retrace


def test_default_targets_skip_embeddings_heads_and_vectors():
  params = {
      "tok_embed": jnp.ones((50, 8)),
      "wte": jnp.ones((50, 8)),
      "lm_head": {"kernel": jnp.ones((8, 50))},
      "head": jnp.ones((8, 10)),
      "block": {
          "mlp": {"kernel": jnp.ones((8, 32)), "bias": jnp.ones(32)},
          "norm": {"scale": jnp.ones(8)},
          "qkv": jnp.ones((2, 8, 8)),
      },
  }
  plans = galore_optax.plan_leaves(params, rank=4, proj_type="std")
  targeted = [p.path for p in plans if p is not None]
  assert targeted == ["block/mlp/kernel"]


def test_targets_by_path_rule_bool_tree_and_callable(params):
  by_rule = galore_optax.plan_leaves(
      params,
      rank=4,
      proj_type="std",
      targets=galore_optax.match_paths(["attn", "embed"]),
  )
  assert [p.path for p in by_rule if p] == ["attn/kernel", "embed"]
  flags = jax.tree.map(lambda _: False, params)
  flags["mlp"]["kernel"] = True
  by_tree = galore_optax.plan_leaves(
      params, rank=4, proj_type="std", targets=flags
  )
  assert [p.path for p in by_tree if p] == ["mlp/kernel"]
  by_callable = galore_optax.plan_leaves(
      params,
      rank=4,
      proj_type="std",
      targets=lambda ps: jax.tree.map(lambda x: x.shape == (16, 8), ps),
  )
  assert [p.path for p in by_callable if p] == ["attn/kernel"]
  # and the state follows: embed gets a basis only when targeted
  state = galore_optax.scale_by_galore(
      rank=4, targets=galore_optax.match_paths("embed")
  ).init(params)
  assert (
      state.projector.right["embed"].shape == (4, 8)
      and state.projector.right["attn"]["kernel"].shape == ()
  )


def test_per_leaf_ranks_from_pytree_and_callable_are_clamped(params):
  ranks = {
      "attn": {"kernel": 2},
      "mlp": {"kernel": 100, "bias": None},
      "embed": None,
  }
  state = galore_optax.scale_by_galore(rank=ranks).init(params)
  assert state.projector.right["attn"]["kernel"].shape == (2, 8)
  # clamped to min(8, 24)
  assert state.projector.left["mlp"]["kernel"].shape == (
      8,
      8,
  )
  assert state.inner_state.mu["mlp"]["kernel"].shape == (8, 24)
  state = galore_optax.scale_by_galore(
      rank=lambda path, shape: 1 if "attn" in path else 3
  ).init(params)
  assert state.projector.right["attn"]["kernel"].shape == (1, 8)
  assert state.projector.left["mlp"]["kernel"].shape == (8, 3)


def test_attention_kernel_and_stacked_layers_with_matrix_axes():
  rng = np.random.default_rng(7)
  params = {
      # (embed, heads, head_dim)
      "attn": jnp.asarray(rng.standard_normal((8, 2, 4)), jnp.float32),
      "mlp": jnp.asarray(rng.standard_normal((3, 8, 16)), jnp.float32),
  }  # (layers, d_in, d_out)
  axes = {
      "attn": MatrixAxes(rows=0, cols=(1, 2)),
      "mlp": MatrixAxes(rows=1, cols=2),
  }
  tx = galore_optax.galore_adamw(
      1e-2, rank=2, update_proj_gap=2, matrix_axes=axes
  )
  state = tx.init(params)
  assert state[0].projector.right["attn"].shape == (2, 8)
  # one basis per layer
  assert state[0].projector.left["mlp"].shape == (
      3,
      8,
      2,
  )
  grads = grad_sequence(params, 5)
  trajectory, _ = run(tx, params, grads)
  for layer in range(3):  # each stacked layer behaves as its own GaLore matrix
    ref = np_galore_adamw(
        params["mlp"][layer],
        [g["mlp"][layer] for g in grads],
        rank=2,
        gap=2,
        scale=0.25,
        lr=1e-2,
    )
    np.testing.assert_allclose(trajectory[-1]["mlp"][layer], ref[-1], atol=2e-5)
  ref = np_galore_adamw(
      params["attn"].reshape(8, 8),
      [g["attn"].reshape(8, 8) for g in grads],
      rank=2,
      gap=2,
      scale=0.25,
      lr=1e-2,
  )
  np.testing.assert_allclose(
      trajectory[-1]["attn"].reshape(8, 8), ref[-1], atol=2e-5
  )


ALIASES = {
    "adamw": lambda **kw: galore_optax.galore_adamw(0.05, **kw),
    "adam": lambda **kw: galore_optax.galore_adam(0.05, **kw),
    "sgd_nesterov": lambda **kw: galore_optax.galore_sgd(
        0.02, momentum=0.9, nesterov=True, **kw
    ),
    "sgd": lambda **kw: galore_optax.galore_sgd(0.05, **kw),
    "adafactor": lambda **kw: galore_optax.galore_adafactor(
        0.05, min_dim_size_to_factor=2, momentum=0.9, **kw
    ),
    "lion": lambda **kw: galore_optax.galore_lion(0.02, **kw),
    "lamb": lambda **kw: galore_optax.galore_lamb(0.05, **kw),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_minimises_a_quadratic_through_its_targeted_leaves(name):
  """Each alias lowers ||W - W*||^2 over the leaves GaLore projects; with
  GaLore's update switched off (scale 0) the same run leaves them where they
  were."""
  params = small_params()
  target = jax.tree.map(lambda p: p + 1.0, params)
  loss = lambda p: sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )
  targeted = lambda p: sum(
      jnp.sum((p[k]["kernel"] - target[k]["kernel"]) ** 2)
      for k in ("attn", "mlp")
  )

  def train(scale):
    tx = ALIASES[name](rank=4, update_proj_gap=5, scale=scale)
    state = tx.init(params)
    # found once
    assert isinstance(
        optax.tree.get(state, "projector"), galore_optax.GaLoreProjector
    )

    @jax.jit
    def step(p, state):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      return optax.apply_updates(p, updates), state

    p = params
    for _ in range(30):
      p, state = step(p, state)
    return p, state

  trained, state = train(0.25)
  assert targeted(trained) < 0.9 * targeted(params)
  assert loss(trained) < 0.9 * loss(params)
  # targeted moments are low-rank
  mu_like = [
      x
      for x in jax.tree.leaves(optax.tree.get(state, "inner_state"))
      if x.ndim == 2
  ]
  assert all(min(x.shape) <= 4 or x.shape == (30, 8) for x in mu_like)
  frozen, _ = train(0.0)
  np.testing.assert_array_equal(
      frozen["attn"]["kernel"], params["attn"]["kernel"]
  )


def test_lamb_rescales_the_back_projected_adam_direction():
  """First step of galore_lamb against a float64 statement: d = scale *
  back(Adam(project(G))), w = d + weight_decay * p, update = -lr * ||p|| / ||w||
  * w (LAMB's trust ratio, full space).
  """
  rng = np.random.default_rng(0)
  p = rng.standard_normal((16, 8))
  g = rng.standard_normal((16, 8))
  lr, wd, scale, eps = 0.1, 0.3, 0.25, 1e-6
  tx = galore_optax.galore_lamb(
      lr, eps=eps, weight_decay=wd, rank=2, scale=scale
  )
  params = {"w": jnp.asarray(p, jnp.float32)}
  updates, _ = tx.update(
      {"w": jnp.asarray(g, jnp.float32)}, tx.init(params), params
  )
  left, right = np_basis(g, 2, "std")
  r = np_project(g, left, right)
  # Adam's first step: m_hat / sqrt(v_hat)
  d = scale * np_project_back(r / (np.abs(r) + eps), left, right)
  w = d + wd * p
  np.testing.assert_allclose(
      updates["w"], -lr * np.linalg.norm(p) / np.linalg.norm(w) * w, atol=1e-5
  )


def test_bfloat16_params_follow_the_float32_run():
  params32 = small_params()
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  grads = grad_sequence(params32, 6)
  tx = galore_optax.galore_adamw(0.1, rank=4, update_proj_gap=3)
  run16, state = run(
      tx,
      params16,
      [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in grads],
  )
  run32, _ = run(
      tx,
      jax.tree.map(
          lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params32
      ),
      grads,
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(run16[-1]))
  assert state[0].projector.right["attn"]["kernel"].dtype == jnp.bfloat16
  start = np.asarray(params16["attn"]["kernel"], np.float32)
  moved16 = np.asarray(run16[-1]["attn"]["kernel"], np.float32) - start
  moved32 = np.asarray(run32[-1]["attn"]["kernel"]) - start
  # the float32 run moved the leaf well past bf16 resolution
  assert np.abs(moved32).max() > 0.1
  # bf16 keeps 8 bits: weights of about 1 round by up to 8e-3 at each step, so
  # the runs agree to about a tenth of the movement, in direction and size.
  assert np.linalg.norm(moved16 - moved32) < 0.1 * np.linalg.norm(moved32)
  assert np.corrcoef(moved16.ravel(), moved32.ravel())[0, 1] > 0.99


def test_weight_decay_acts_on_the_updated_weight():
  """galore-torch decays after the step, p <- (p - lr u)(1 - lr wd); decaying
  first, p(1 - lr wd) - lr u, differs by lr^2 wd u: visible with lr wd large."""
  params = small_params()
  grads = grad_sequence(params, 3)
  hp = dict(rank=3, scale=1.0, lr=0.2, weight_decay=2.0)
  tx = galore_optax.galore_adamw(
      hp["lr"],
      weight_decay=hp["weight_decay"],
      rank=3,
      update_proj_gap=2,
      scale=1.0,
  )
  trajectory, _ = run(tx, params, grads)
  ref = np_galore_adamw(
      params["attn"]["kernel"],
      [g["attn"]["kernel"] for g in grads],
      gap=2,
      **hp,
  )
  p0 = np.asarray(params["attn"]["kernel"], np.float64)
  # -lr u of the first step
  step = ref[0] / (1 - hp["lr"] * hp["weight_decay"]) - p0
  decay_first = p0 * (1 - hp["lr"] * hp["weight_decay"]) + step
  # the two orders are told apart
  assert np.abs(decay_first - ref[0]).max() > 1e-2
  for t, want in enumerate(ref):
    np.testing.assert_allclose(
        trajectory[t]["attn"]["kernel"], want, atol=1e-5, err_msg=f"step {t}"
    )


def _dots(tx, params):
  """(full-precision, other) counts of the dot products in the jitted update."""
  grads = jax.tree.map(jnp.ones_like, params)
  text = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  full = sum("HIGHEST" in line for line in dots)
  return full, len(dots) - full


def test_projections_run_at_the_requested_precision(params):
  full, other = _dots(galore_optax.galore_adamw(1e-2, rank=3), params)
  # project and project_back of two leaves, all in full float32
  assert full >= 4 and other == 0
  full_fast, other_fast = _dots(
      galore_optax.galore_adamw(1e-2, rank=3, precision="default"), params
  )
  # the projections let XLA choose; the refresh math stays full
  assert other_fast == 4
  assert full_fast == full - 4


def test_jit_with_donated_state(params):
  tx = galore_optax.galore_adamw(1e-2, rank=4, update_proj_gap=2)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  grads = grad_sequence(params, 4)
  p, s = jax.tree.map(jnp.copy, params), tx.init(params)
  for g in grads:
    old_count = s[0].count
    p, s = donated(p, s, g)
    assert old_count.is_deleted()  # the buffers really were donated
  expected, _ = run(tx, params, grads)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(expected[-1])):
    np.testing.assert_array_equal(a, b)
