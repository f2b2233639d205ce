"""GaLore inside optax's wrappers and flax.nnx: each test fails if the
composition breaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import grad_sequence
from helpers import np_basis
from helpers import run

import galore_optax


def _allclose_trees(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), **{"atol": 1e-6, **kw}
    )


def test_chain_after_gradient_clipping(params):
  grads = grad_sequence(params, 4)
  clipped = [
      optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
      for g in grads
  ]
  galore = lambda: galore_optax.galore_adamw(1e-2, rank=3, update_proj_gap=2)
  chained, _ = run(
      optax.chain(optax.clip_by_global_norm(1.0), galore()), params, grads
  )
  manual, _ = run(galore(), params, clipped)
  _allclose_trees(chained[-1], manual[-1], rtol=1e-5)


def test_masked(params):
  mask = {
      "attn": {"kernel": True},
      "mlp": {"kernel": False, "bias": False},
      "embed": False,
  }
  grads = grad_sequence(params, 4)
  galore = lambda: galore_optax.galore_adamw(1e-2, rank=3, update_proj_gap=2)
  tx = optax.masked(galore(), mask)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
  # masked out: passed through
  np.testing.assert_array_equal(updates["embed"], grads[-1]["embed"])
  sub = {"attn": params["attn"]}
  sub_tx = galore()
  sub_state = sub_tx.init(sub)
  for g in grads:
    sub_updates, sub_state = sub_tx.update({"attn": g["attn"]}, sub_state, sub)
  np.testing.assert_allclose(
      updates["attn"]["kernel"], sub_updates["attn"]["kernel"], rtol=1e-5
  )


def test_multi_transform_partition(params):
  labels = {
      "attn": {"kernel": "galore"},
      "mlp": {"kernel": "galore", "bias": "adam"},
      "embed": "adam",
  }
  galore = lambda: galore_optax.galore_adamw(1e-2, rank=3, update_proj_gap=2)
  tx = optax.multi_transform(
      {"galore": galore(), "adam": optax.adam(1e-2)}, labels
  )
  grads = grad_sequence(params, 5)
  trajectory, state = run(tx, params, grads)
  alone, _ = run(
      galore(),
      {"attn": params["attn"], "mlp": {"kernel": params["mlp"]["kernel"]}},
      [
          {"attn": g["attn"], "mlp": {"kernel": g["mlp"]["kernel"]}}
          for g in grads
      ],
  )
  adam, _ = run(optax.adam(1e-2), params["embed"], [g["embed"] for g in grads])
  np.testing.assert_allclose(
      trajectory[-1]["mlp"]["kernel"], alone[-1]["mlp"]["kernel"], rtol=1e-5
  )
  np.testing.assert_allclose(trajectory[-1]["embed"], adam[-1], rtol=1e-5)
  assert optax.tree.get(state, "projector").left["mlp"]["kernel"].shape == (
      8,
      3,
  )


def test_multisteps_refresh_counts_optimizer_steps(params):
  k, steps = 2, 7
  micro = grad_sequence(params, k * steps)
  galore = lambda: galore_optax.scale_by_galore(rank=3, update_proj_gap=3)
  tx = optax.MultiSteps(galore(), every_k_schedule=k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  bases = []
  for t, g in enumerate(micro):
    _, state = update(g, state, params)
    if t % k == k - 1:
      bases.append(
          np.asarray(state.inner_opt_state.projector.right["attn"]["kernel"])
      )
  assert int(state.inner_opt_state.count) == steps
  changed = [
      t for t in range(1, steps) if not np.array_equal(bases[t], bases[t - 1])
  ]
  assert changed == [3, 6]  # optimizer steps 3 and 6, not micro-batches
  averaged = [
      jax.tree.map(lambda a, b: (a + b) / 2, micro[2 * i], micro[2 * i + 1])
      for i in range(steps)
  ]
  _, direct = run(galore(), params, averaged)
  np.testing.assert_allclose(
      bases[-1], direct.projector.right["attn"]["kernel"], atol=1e-5
  )


def test_apply_if_finite_neither_updates_nor_refreshes(params):
  tx = optax.apply_if_finite(
      galore_optax.galore_adamw(1e-2, rank=3, update_proj_gap=3), 5
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = grad_sequence(params, 5)
  for g in grads[:3]:
    _, state = update(g, state, params)
  before = state.inner_state[0]
  # would be the refresh step
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), grads[3])
  updates, state = update(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  after = state.inner_state[0]
  assert int(after.count) == int(before.count) == 3
  _allclose_trees(after.projector, before.projector, rtol=0)
  _, state = update(grads[4], state, params)  # the next finite step refreshes
  right = np.asarray(state.inner_state[0].projector.right["attn"]["kernel"])
  _, ref = np_basis(grads[4]["attn"]["kernel"], 3, "std")
  np.testing.assert_allclose(right, ref, atol=1e-5)


STATIC = ("rank", "update_proj_gap", "proj_type")


def test_inject_hyperparams(params):
  make = optax.inject_hyperparams(galore_optax.galore_adamw, static_args=STATIC)
  tx = make(learning_rate=1e-2, b1=0.8, scale=0.5, rank=3, update_proj_gap=2)
  grads = grad_sequence(params, 4)
  injected, state = run(tx, params, grads[:3])
  plain, _ = run(
      galore_optax.galore_adamw(
          1e-2, b1=0.8, scale=0.5, rank=3, update_proj_gap=2
      ),
      params,
      grads[:3],
  )
  _allclose_trees(injected[-1], plain[-1], rtol=1e-5)
  assert set(state.hyperparams) >= {
      "learning_rate",
      "scale",
      "b1",
      "b2",
      "eps",
      "weight_decay",
  }
  state.hyperparams["scale"] = jnp.asarray(0.0)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
  updates, _ = tx.update(grads[3], state, injected[-1])
  # scale acts on targeted leaves
  assert np.all(np.asarray(updates["attn"]["kernel"]) == 0)
  assert np.any(np.asarray(updates["embed"]) != 0)


ALIASES = {
    "galore_adamw": [
        dict(weight_decay=0.0),
        dict(
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
        ),
    ],
    "galore_adam": [dict()],
    "galore_sgd": [
        dict(),
        dict(momentum=0.9, nesterov=True, weight_decay=0.0),
        dict(momentum=0.5, weight_decay=0.1),
    ],
    "galore_lion": [dict(weight_decay=0.0), dict(weight_decay=0.1)],
    "galore_lamb": [dict(weight_decay=0.0), dict(weight_decay=0.1)],
    "galore_adafactor": [
        dict(),
        dict(weight_decay=0.1, momentum=0.9, clipping_threshold=None),
        dict(multiply_by_parameter_scale=False),
    ],
    "fira_adamw": [dict(weight_decay=0.0), dict(weight_decay=0.1)],
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_inject_hyperparams_state_has_the_plain_structure(params, name):
  """As optax's own alias tests require: for every hyperparameter value,
  injecting the hyperparameters changes nothing but the wrapper."""
  alias = getattr(galore_optax, name)
  for kwargs in ALIASES[name]:
    for options in (dict(), dict(moments="reset")):
      plain = alias(1e-2, rank=3, **kwargs, **options).init(params)
      injected = optax.inject_hyperparams(alias, static_args=STATIC)(
          1e-2, rank=3, **kwargs, **options
      ).init(params)
      assert jax.tree.structure(injected.inner_state) == jax.tree.structure(
          plain
      ), (kwargs, options)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_takes_every_galore_keyword(params, name):
  import inspect

  alias = getattr(galore_optax, name)
  galore = dict(inspect.signature(galore_optax.scale_by_galore).parameters)
  if name == "fira_adamw":  # it is the residual
    del galore["residual"]
  own = inspect.signature(alias).parameters
  for keyword in list(galore)[
      1:
  ]:  # all but inner, with the same default, keyword-only
    assert keyword in own, keyword
    assert (
        own[keyword].default is galore[keyword].default
        or own[keyword].default == galore[keyword].default
    )
    assert own[keyword].kind is inspect.Parameter.KEYWORD_ONLY
  # and passes each on: a non-default value of every keyword shows in the state
  # or the math
  lazy = galore_optax.LazyRefresh(threshold=0.0, patience=1, max_gap=8)
  options = dict(
      rank=2,
      update_proj_gap=3,
      scale=0.5,
      proj_type="reverse_std",
      targets=galore_optax.match_paths("attn"),
      matrix_axes=galore_optax.MatrixAxes(1, 0),
      svd="gram",
      moments="reset",
      lazy_refresh=lazy,
      precision="default",
      axis_name=None,
      moment_bits=8,  # tested on matrices large enough: test_quantization.py
      projector_bits=8,
      residual="fira",
      group_leaves=False,
  )
  if name == "fira_adamw":
    del options["residual"]
  assert set(options) == set(galore) - {"inner"}
  tx = alias(1e-2, **options)
  full_state = tx.init(params)
  state = galore_optax.find_states(full_state, galore_optax.GaLoreState)[0]
  # group_leaves=False: no group loop around the refresh
  update = jax.make_jaxpr(lambda s: tx.update(params, s, params))(full_state)
  assert "while" not in str(update)
  assert (
      int(state.refresh.interval["attn"]["kernel"]) == 3
      and int(state.refresh.interval["mlp"]["kernel"]) == 0
  )
  # matrix_axes (1, 0) sees attn/kernel as 8 x 16, where reverse_std keeps V_r^T
  # (2 x 16)
  assert state.projector.right["attn"]["kernel"].shape == (2, 16)
  assert state.projector.right["attn"]["kernel"].codebook == "linear8"
  if (
      name != "galore_sgd"
  ):  # plain galore_sgd runs optax.identity(), which has no state
    assert state.leaf_scalars  # moments='reset' keeps per-leaf step counts
  assert state.residual_norm["attn"]["kernel"].shape == ()  # Fira's limiter


def test_inject_hyperparams_without_static_rank_is_a_clear_error(params):
  tx = optax.inject_hyperparams(galore_optax.galore_adamw)(
      learning_rate=1e-2, rank=3
  )
  with pytest.raises(TypeError, match="static_args"):
    tx.init(params)


def test_map_params_reaches_bases_and_moments(params):
  tx = galore_optax.galore_adamw(1e-2, rank=3, weight_decay=0.1)
  state = tx.init(params)
  names = jax.tree_util.tree_map_with_path(
      lambda p, _: galore_optax.targets.path_str(p), params
  )
  mapped = optax.tree.map_params(
      tx,
      lambda _, name: name,
      state,
      names,
      transform_non_params=lambda _: None,
  )
  galore_state = mapped[0]
  assert galore_state.count is None
  assert galore_state.projector.right["attn"]["kernel"] == "attn/kernel"
  assert galore_state.inner_state.mu["mlp"]["kernel"] == "mlp/kernel"
  assert galore_state.inner_state.nu["embed"] == "embed"


class _TinyNet(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.mlp = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 20, rngs=rngs)

  def __call__(self, tokens):
    return self.out(jax.nn.gelu(self.mlp(self.embed(tokens))))


def test_flax_nnx_optimizer():
  tokens = jnp.arange(16) % 20
  loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(
      model(tokens), (tokens + 1) % 20
  ).mean()
  make_tx = lambda: galore_optax.galore_adamw(0.1, rank=4, update_proj_gap=5)
  model = _TinyNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(12)]
  assert losses[-1] < 0.8 * losses[0]
  projector = optax.tree.get(optimizer.opt_state, "projector")
  assert projector.left["mlp"]["kernel"].shape == (8, 4)

  # the same run through the functional API gives the same params
  graphdef, start_params = nnx.split(_TinyNet(nnx.Rngs(0)), nnx.Param)
  pure_loss = lambda p: loss_fn(nnx.merge(graphdef, p))
  tx = make_tx()
  params, state = start_params, tx.init(start_params)
  for _ in range(12):
    updates, state = tx.update(jax.grad(pure_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  _, trained = nnx.split(model, nnx.Param)
  _allclose_trees(trained, params, atol=1e-5)
  assert state[0].projector.left["mlp"]["kernel"].shape == (8, 4)


def test_find_states_reaches_through_wrappers():
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
  galore = galore_optax.scale_by_galore(
      rank=2, targets=galore_optax.match_paths("w")
  )
  apollo = galore_optax.scale_by_apollo(
      rank=2, targets=galore_optax.match_paths("w")
  )
  tx = optax.chain(
      optax.masked(galore, {"w": True, "b": False}),
      optax.MultiSteps(
          optax.chain(apollo, optax.scale(-1.0)), 2
      ).gradient_transformation(),
      galore_optax.galore_adamw(1e-2, rank=2),
  )
  state = tx.init(params)
  found = galore_optax.find_states(state, galore_optax.GaLoreState)
  assert len(found) == 2 and all(
      isinstance(s, galore_optax.GaLoreState) for s in found
  )
  (apollo_state,) = galore_optax.find_states(state, galore_optax.ApolloState)
  assert apollo_state.scaled_norm["w"].shape == ()
  assert (
      galore_optax.find_states(
          optax.adam(1e-3).init(params), galore_optax.GaLoreState
      )
      == []
  )
