"""The subspace engine: SVD methods, robustness, moment policies, lazy refresh,
adaptive rank."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import grad_sequence
from helpers import np_galore_adamw
from helpers import run

import galore_optax
from galore_optax import moments as moments_lib
from galore_optax import subspace


def _gapped(shape, rank, seed=0, batch=()):
  """A matrix whose top-``rank`` singular values (10..5) sit far above the rest
  (<= 0.1)."""
  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal(batch + (m, k)))
  v, _ = np.linalg.qr(rng.standard_normal(batch + (n, k)))
  s = np.concatenate(
      [np.linspace(10, 5, rank), np.linspace(0.1, 0.01, k - rank)]
  )
  return jnp.asarray((u * s) @ np.swapaxes(v, -1, -2), jnp.float32)


def _projector(basis, side):
  b = np.asarray(basis, np.float64)
  return (
      b @ np.swapaxes(b, -1, -2)
      if side == "left"
      else np.swapaxes(b, -1, -2) @ b
  )


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
@pytest.mark.parametrize("method", ["randomized", "gram"])
@pytest.mark.parametrize(
    "sides",
    [(True, False), (False, True), (True, True)],
    ids=["left", "right", "full"],
)
def test_fast_methods_agree_with_exact_on_a_spectral_gap(method, sides, shape):
  g = _gapped(shape, 5, batch=(2,))
  exact = subspace.exact_basis(g, 5, *sides)
  fast = subspace.compute_basis(
      g, 5, *sides, method=method, key=jax.random.key(0)
  )
  for side, e, f in zip(("left", "right"), exact, fast):
    assert (e is None) == (f is None)
    if e is not None:
      # same subspace
      np.testing.assert_allclose(
          _projector(f, side), _projector(e, side), atol=1e-4
      )
      # same vectors: canonical signs
      np.testing.assert_allclose(np.asarray(f), np.asarray(e), atol=1e-3)


def test_randomized_is_reproducible_from_its_seed():
  g = _gapped((40, 30), 4)
  a = subspace.randomized_basis(
      g, 4, True, False, jax.random.key(3), power_iters=0
  )
  b = subspace.randomized_basis(
      g, 4, True, False, jax.random.key(3), power_iters=0
  )
  c = subspace.randomized_basis(
      g + 0.02 * _gapped((40, 30), 30, seed=9),
      4,
      True,
      False,
      jax.random.key(4),
      power_iters=0,
  )
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))

  tx = galore_optax.scale_by_galore(
      rank=3, update_proj_gap=2, svd=galore_optax.RandomizedSVD(seed=7)
  )
  params = {"w": jnp.zeros((24, 10))}
  grads = [{"w": _gapped((24, 10), 3, seed=s)} for s in range(3)]
  states = [run(tx, params, grads)[1] for _ in range(2)]
  np.testing.assert_array_equal(
      states[0].projector.right["w"], states[1].projector.right["w"]
  )


@pytest.mark.parametrize("method", galore_optax.SVD_METHODS)
def test_zero_gradient_gives_an_orthonormal_basis(method):
  tx = galore_optax.scale_by_galore(rank=3, update_proj_gap=2, svd=method)
  params = {"w": jnp.zeros((12, 5))}
  updates, state = tx.update({"w": jnp.zeros((12, 5))}, tx.init(params))
  right = np.asarray(state.projector.right["w"])
  np.testing.assert_allclose(right @ right.T, np.eye(3), atol=1e-6)
  assert np.all(np.asarray(updates["w"]) == 0)
  # retried next step
  assert (
      int(state.refresh.skipped["w"]) == 1
      and int(state.refresh.next_step["w"]) == 1
  )


@pytest.mark.parametrize("method", galore_optax.SVD_METHODS)
def test_non_finite_gradient_keeps_the_previous_basis(method):
  tx = galore_optax.scale_by_galore(rank=3, update_proj_gap=2, svd=method)
  params = {"w": jnp.zeros((12, 5))}
  update = jax.jit(tx.update)
  state = tx.init(params)
  good = [{"w": _gapped((12, 5), 3, seed=s)} for s in range(4)]
  _, state = update(good[0], state)
  _, state = update(good[1], state)
  before = np.asarray(state.projector.right["w"])
  bad = {"w": good[2]["w"].at[0, 0].set(jnp.inf)}
  _, state = update(bad, state)  # step 2 would refresh
  np.testing.assert_array_equal(state.projector.right["w"], before)
  assert (
      int(state.refresh.skipped["w"]) == 1
      and int(state.refresh.computed["w"]) == 1
  )
  _, state = update(good[3], state)  # retried at step 3
  assert int(state.refresh.computed["w"]) == 2
  expected = subspace.compute_basis(
      good[3]["w"],
      3,
      False,
      True,
      method=method,
      key=jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 3), 0),
  )[1]
  np.testing.assert_allclose(state.projector.right["w"], expected, atol=1e-5)
  # a retried refresh is not a saving: steps 0 and 3 computed, as the fixed
  # schedule's 0 and 2
  assert galore_optax.refresh_stats(state, 2) == {
      "steps": 4,
      "bases_computed": 2,
      "refreshes_skipped": 1,
      "fixed_schedule": 2,
      "svds_saved": 0,
  }


def test_first_refresh_on_a_bad_gradient_falls_back_to_coordinate_axes():
  tx = galore_optax.scale_by_galore(rank=2, update_proj_gap=5)
  _, state = tx.update(
      {"w": jnp.full((6, 4), jnp.nan)}, tx.init({"w": jnp.zeros((6, 4))})
  )
  np.testing.assert_array_equal(state.projector.right["w"], np.eye(2, 4))


def test_transport_is_exact_for_a_rotation_inside_the_subspace():
  rng = np.random.default_rng(0)
  old, _ = np.linalg.qr(rng.standard_normal((10, 3)))  # left basis, m x r
  rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  new = old @ rotation
  c_left = jnp.asarray(new.T @ old, jnp.float32)
  mu = rng.standard_normal((3, 7)).astype(np.float32)
  moved = moments_lib.transport(jnp.asarray(mu), "first", c_left, None)
  # same full-space moment
  np.testing.assert_allclose(new @ np.asarray(moved), old @ mu, atol=1e-5)
  # a signed permutation (a rotation too) moves second moments exactly, with no
  # fill-in
  perm = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
  c_perm = jnp.asarray((old @ perm).T @ old, jnp.float32)
  nu = rng.random((3, 7)).astype(np.float32)
  np.testing.assert_allclose(
      moments_lib.transport(jnp.asarray(nu), "second", c_perm, None),
      np.abs(perm.T) @ nu,
      atol=1e-6,
  )
  # right side, and a new direction orthogonal to the old subspace gets the mean
  # second moment
  c_right = jnp.asarray(np.diag([1.0, 1.0, 0.0]), jnp.float32)
  nu = rng.random((7, 3)).astype(np.float32)
  moved = np.asarray(
      moments_lib.transport(jnp.asarray(nu), "second", None, c_right)
  )
  np.testing.assert_allclose(moved[:, :2], nu[:, :2], atol=1e-6)
  np.testing.assert_allclose(moved[:, 2], nu.mean(axis=1), atol=1e-6)


def test_moment_policies_end_to_end():
  """At a refresh that permutes the basis, 'transport' keeps the full-space
  first moment, 'keep' scrambles it and 'reset' forgets it."""
  rng = np.random.default_rng(1)
  u, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  g0 = jnp.asarray((u[:, :6] * [5, 3, 2, 0.1, 0.1, 0.1]) @ v.T, jnp.float32)
  # top two swapped
  g1 = jnp.asarray((u[:, :6] * [3, 5, 2, 0.1, 0.1, 0.1]) @ v.T, jnp.float32)
  params = {"w": jnp.zeros((16, 6))}
  results = {}
  for policy in galore_optax.MOMENT_POLICIES:
    tx = galore_optax.scale_by_galore(
        optax.trace(0.9), rank=3, update_proj_gap=1, moments=policy
    )
    state = tx.init(params)
    _, state = tx.update({"w": g0}, state)
    before = np.asarray(state.inner_state.trace["w"]) @ np.asarray(
        state.projector.right["w"]
    )
    _, state = tx.update({"w": g1}, state)
    right = np.asarray(state.projector.right["w"])
    # what this step's gradient adds, in full space
    new_part = np.asarray(g1) @ right.T @ right
    results[policy] = (
        np.asarray(state.inner_state.trace["w"]) @ right - new_part
    )
    results["expected"] = 0.9 * before
  np.testing.assert_allclose(
      results["transport"], results["expected"], atol=1e-4
  )
  assert not np.allclose(results["keep"], results["expected"], atol=1e-2)
  np.testing.assert_allclose(results["reset"], 0, atol=1e-5)


def test_transport_refuses_an_inner_state_it_does_not_know():
  with pytest.raises(
      ValueError, match=r"does not know how to transport ScaleByRmsState.nu"
  ):
    galore_optax.scale_by_galore(optax.rmsprop(1e-3), moments="transport")
  with pytest.raises(ValueError, match="unknown moments policy 'forget'"):
    galore_optax.scale_by_galore(moments="forget")
  # reset needs no kinds
  galore_optax.scale_by_galore(optax.rmsprop(1e-3), moments="reset")


def test_lazy_refresh_doubles_the_interval_up_to_the_cap():
  lazy = galore_optax.LazyRefresh(threshold=0.9, patience=2, max_gap=8)
  tx = galore_optax.scale_by_galore(
      rank=2, update_proj_gap=2, lazy_refresh=lazy
  )
  params = {"w": jnp.zeros((10, 4))}
  g = {
      "w": _gapped((10, 4), 2)
  }  # the same gradient every step: every refresh is similar
  state = tx.init(params)
  update = jax.jit(tx.update)
  refreshed = []
  for step in range(50):
    before = int(state.refresh.computed["w"])
    _, state = update(g, state)
    if int(state.refresh.computed["w"]) > before:
      refreshed.append(step)
  # 0 first; 2, 4 similar -> interval 4; 8, 12 -> interval 8; 20, 28 -> capped
  # at 8; 36, 44
  assert refreshed == [0, 2, 4, 8, 12, 20, 28, 36, 44]
  assert int(state.refresh.interval["w"]) == 8
  stats = galore_optax.refresh_stats(state, 2)
  assert stats == {
      "steps": 50,
      "bases_computed": 9,
      "refreshes_skipped": 0,
      "fixed_schedule": 25,
      "svds_saved": 16,
  }


def test_lazy_refresh_keeps_the_interval_when_bases_move():
  lazy = galore_optax.LazyRefresh(threshold=0.99, patience=2)
  tx = galore_optax.scale_by_galore(
      rank=2, update_proj_gap=2, lazy_refresh=lazy
  )
  params = {"w": jnp.zeros((10, 4))}
  _, state = run(
      tx, params, [{"w": _gapped((10, 4), 2, seed=s)} for s in range(12)]
  )
  assert (
      int(state.refresh.interval["w"]) == 2
      and int(state.refresh.computed["w"]) == 6
  )


def test_adaptive_ranks_from_a_known_spectrum():
  rng = np.random.default_rng(2)

  def with_spectrum(m, n, s):
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return jnp.asarray((u * s) @ v.T, jnp.float32)

  grads = {
      # 90% energy at k = 18
      "attn": with_spectrum(64, 48, [1.0] * 20 + [0.0] * 28),
      # 1 - 4^-k >= 0.9 at k = 2
      "mlp": with_spectrum(48, 96, [2.0**-i for i in range(48)]),
      "norm": jnp.ones(48),
  }
  ranks = galore_optax.adaptive_ranks(grads, energy=0.9, min_rank=1, multiple=1)
  assert ranks == {"attn": 18, "mlp": 2, "norm": None}
  assert galore_optax.adaptive_ranks(
      grads, energy=0.9, min_rank=4, multiple=8
  ) == {"attn": 24, "mlp": 8, "norm": None}
  assert (
      galore_optax.adaptive_ranks(grads, grads, energy=1.0, max_rank=16)["attn"]
      == 16
  )
  state = galore_optax.scale_by_galore(rank=ranks).init(grads)
  assert state.projector.right["attn"].shape == (
      18,
      48,
  ) and state.projector.left["mlp"].shape == (48, 2)


OPTIONS = {
    "randomized": dict(svd="randomized"),
    "gram": dict(svd="gram"),
    "transport": dict(moments="transport"),
    "reset": dict(moments="reset"),
    "lazy": dict(
        lazy_refresh=galore_optax.LazyRefresh(threshold=0.0, patience=1)
    ),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_under_jit_and_the_optax_wrappers(params, option):
  """Each wrapper, fed what the plain transform is fed, gives the plain
  transform's result."""
  make = lambda: galore_optax.galore_adamw(
      1e-2, rank=3, update_proj_gap=2, **OPTIONS[option]
  )
  grads = grad_sequence(params, 5)
  plain, plain_state = run(make(), params, grads)
  assert galore_optax.refresh_stats(plain_state, 2)["bases_computed"] > 2
  all_true = jax.tree.map(lambda _: True, params)
  wrapped = {
      "chain": optax.chain(optax.identity(), make()),
      "masked": optax.masked(make(), all_true),
      "multisteps": optax.MultiSteps(make(), every_k_schedule=1),
      "apply_if_finite": optax.apply_if_finite(make(), 3),
      "inject_hyperparams": optax.inject_hyperparams(
          galore_optax.galore_adamw,
          static_args=("rank", "update_proj_gap", "proj_type"),
      )(learning_rate=1e-2, rank=3, update_proj_gap=2, **OPTIONS[option]),
  }
  for name, tx in wrapped.items():
    trajectory, _ = run(tx, params, grads)
    for a, b in zip(
        jax.tree.leaves(trajectory[-1]), jax.tree.leaves(plain[-1])
    ):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def _hard_inputs():
  """Square, low-rank and ill-conditioned gradients: (name, matrix, rank, true
  rank)."""
  rng = np.random.default_rng(11)
  u, _ = np.linalg.qr(rng.standard_normal((128, 128)))
  v, _ = np.linalg.qr(rng.standard_normal((128, 128)))
  ill = (u * np.geomspace(1.0, 1 / 6e3, 128)) @ v.T  # condition number 6e3
  # rank 4, square
  low = rng.standard_normal((32, 4)) @ rng.standard_normal((4, 32))
  low_tall = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 24))
  return [
      ("ill_conditioned", ill, 128, 128),
      ("ill_conditioned_r32", ill, 32, 128),
      ("rank4_square", low, 16, 4),
      ("rank3_tall", low_tall, 12, 3),
      ("square", rng.standard_normal((20, 20)), 8, 20),
  ]


@pytest.mark.parametrize("proj_type", galore_optax.PROJ_TYPES)
@pytest.mark.parametrize("method", galore_optax.SVD_METHODS)
def test_every_method_gives_orthonormal_bases_on_hard_inputs(method, proj_type):
  for name, g, rank, true_rank in _hard_inputs():
    use_left, use_right = galore_optax.projection.basis_sides(
        *g.shape, proj_type
    )
    basis = subspace.compute_basis(
        jnp.asarray(g, jnp.float32),
        rank,
        use_left,
        use_right,
        method=method,
        key=jax.random.key(0),
    )
    u, _, vt = np.linalg.svd(g)
    for side, b, axis, true_vectors in (
        ("left", basis[0], -2, u[:, :true_rank]),
        ("right", basis[1], -1, vt[:true_rank].T),
    ):
      if b is None:
        continue
      b = np.asarray(b, np.float64)
      gram = b.T @ b if axis == -2 else b @ b.T
      np.testing.assert_allclose(
          gram, np.eye(rank), atol=1e-4, err_msg=f"{name} {side}"
      )
      if (
          true_rank < rank
      ):  # the basis holds the gradient's whole column (row) space
        projector = _projector(b, side)
        np.testing.assert_allclose(
            projector @ true_vectors,
            true_vectors,
            atol=1e-4,
            err_msg=f"{name} {side}",
        )


def test_a_basis_that_is_not_orthonormal_is_refused_and_counted():
  from galore_optax import refresh

  good = jnp.eye(6, 3)
  assert bool(refresh.is_orthonormal((good, None)))
  assert not bool(refresh.is_orthonormal((good, 1.01 * jnp.eye(3, 5))))
  assert not bool(refresh.is_orthonormal((good.at[0, 0].set(jnp.nan), None)))
  # A refused candidate keeps the previous basis and counts as skipped (the path
  # a NaN takes).
  tx = galore_optax.scale_by_galore(rank=2, update_proj_gap=1)
  params = {"w": jnp.zeros((6, 4))}
  _, state = tx.update({"w": _gapped((6, 4), 2)}, tx.init(params))
  before = np.asarray(state.projector.right["w"])
  _, state = tx.update({"w": jnp.full((6, 4), jnp.nan)}, state)
  np.testing.assert_array_equal(state.projector.right["w"], before)
  assert int(state.refresh.skipped["w"]) == 1


def test_reset_restarts_adams_bias_correction():
  """Under a constant gradient, a reset leaf's update right after a refresh is
  the first step's update again (Adam restarted), and whole runs match a float64
  statement.
  """
  rng = np.random.default_rng(5)
  g = rng.standard_normal((12, 6)).astype(np.float32)
  params = {"w": jnp.zeros((12, 6))}
  tx = galore_optax.galore_adamw(
      1e-2, rank=3, update_proj_gap=50, moments="reset"
  )
  state, update = tx.init(params), jax.jit(tx.update)
  norms = []
  for _ in range(51):
    u, state = update({"w": jnp.asarray(g)}, state, params)
    norms.append(float(jnp.linalg.norm(u["w"])))
  # With the shared count instead, step 50 would be 0.71 of step 0 (sqrt(1 -
  # b2^51) / sqrt(0.1^2 / 0.001)).
  np.testing.assert_allclose(norms[50], norms[0], rtol=1e-5)
  # the leaf's own Adam count restarted at step 50
  assert int(state[0].leaf_scalars[0]["w"]) == 1

  p0 = rng.standard_normal((12, 6)).astype(np.float32)
  grads = [
      (g + 0.5 * rng.standard_normal(g.shape)).astype(np.float32)
      for _ in range(8)
  ]
  tx = galore_optax.galore_adamw(
      1e-2, weight_decay=0.1, rank=3, update_proj_gap=3, moments="reset"
  )
  trajectory, _ = run(
      tx, {"w": jnp.asarray(p0)}, [{"w": jnp.asarray(x)} for x in grads]
  )
  want = np_galore_adamw(
      p0,
      grads,
      rank=3,
      gap=3,
      scale=0.25,
      lr=1e-2,
      weight_decay=0.1,
      moments="reset",
  )
  for t, (ours, ref) in enumerate(zip(trajectory, want)):
    np.testing.assert_allclose(ours["w"], ref, atol=2e-6, err_msg=f"step {t}")


def test_reset_restarts_any_inner_optimizer_per_leaf():
  """optax.scale_by_adam inside, and two leaves whose refreshes fall on
  different steps (one retried after a NaN gradient): each restarts its own
  Adam, the other keeps counting.
  """
  rng = np.random.default_rng(6)
  params = {"a": jnp.zeros((10, 4)), "b": jnp.zeros((8, 5))}
  tx = galore_optax.scale_by_galore(
      optax.scale_by_adam(), rank=2, update_proj_gap=4, moments="reset"
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = {
      k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
      for k, p in params.items()
  }
  bad = {"a": g["a"], "b": jnp.full((8, 5), jnp.nan)}
  for step in range(6):
    _, state = update(bad if step == 4 else g, state)
  # a: refreshed at 0 and 4, so 2 steps since; b: refused at 4, retried at 5, so
  # 1 step since
  assert (
      int(state.leaf_scalars[0]["a"]) == 2
      and int(state.leaf_scalars[0]["b"]) == 1
  )
  # the shared count (untargeted leaves) runs on
  assert int(state.inner_state.count) == 6
