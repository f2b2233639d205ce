"""Leaves of one shape refresh as one group: the same result as leaf by leaf,
and a program that grows with the distinct shapes, not with the leaves."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import grad_sequence
from helpers import random_params
from helpers import run

import galore_optax
from galore_optax import refresh as refresh_lib
from galore_optax import targets as targets_lib

# Three shapes, four leaves of each, and a batched leaf: three groups of four
# and one of one.
SHAPES = {
    **{
        f"layer{i}": {"q": (24, 24), "up": (24, 40), "down": (40, 24)}
        for i in range(4)
    },
    "heads": (3, 24, 16),
}
AXES = lambda path, shape: (
    galore_optax.MatrixAxes(rows=-2, cols=-1) if len(shape) >= 2 else None
)


def _leaves_equal(a, b) -> bool:
  return all(
      np.array_equal(x, y, equal_nan=True)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize(
    "options",
    [
        dict(svd="exact", moments="keep"),
        dict(svd="randomized", moments="transport", residual="fira"),
        dict(svd="gram", moments="reset", lazy_threshold=0.5),
    ],
    ids=["exact", "randomized", "gram"],
)
def test_grouped_and_leaf_by_leaf_give_the_same_updates_and_state(options):
  options = dict(options)
  lazy = options.pop("lazy_threshold", None)
  if lazy is not None:
    options["lazy_refresh"] = galore_optax.LazyRefresh(
        threshold=lazy, patience=1
    )
  params = random_params(SHAPES)
  grads = grad_sequence(params, 9)
  # a gradient the refresh at step 3 must refuse: that leaf alone retries
  grads[3]["layer1"]["up"] = grads[3]["layer1"]["up"] * jnp.nan
  results = [
      run(
          galore_optax.galore_adamw(
              1e-2,
              rank=6,
              update_proj_gap=3,
              matrix_axes=AXES,
              group_leaves=grouped,
              **options,
          ),
          params,
          grads,
      )
      for grouped in (True, False)
  ]
  assert _leaves_equal(results[0], results[1])
  state = galore_optax.find_states(results[0][1], galore_optax.GaLoreState)[0]
  skipped = state.refresh.skipped
  assert int(skipped["layer1"]["up"]) == 1
  assert int(skipped["layer0"]["up"]) == 0  # its group mate refreshed


def test_members_of_a_group_keep_their_own_lazy_schedules():
  params = random_params(SHAPES)
  steady = grad_sequence(params, 1)[0]
  rng = np.random.default_rng(3)
  grads = []
  for _ in range(12):
    g = jax.tree.map(lambda x: x, steady)
    # one member's gradient changes direction every step: it never stabilises
    g["layer2"]["q"] = jnp.asarray(rng.standard_normal((24, 24)), jnp.float32)
    grads.append(g)
  tx = galore_optax.galore_adamw(
      1e-2,
      rank=4,
      update_proj_gap=2,
      matrix_axes=AXES,
      lazy_refresh=galore_optax.LazyRefresh(threshold=0.9, patience=1),
  )
  _, state = run(tx, params, grads)
  book = galore_optax.find_states(state, galore_optax.GaLoreState)[0].refresh
  interval = book.interval
  assert int(interval["layer2"]["q"]) == 2
  assert all(int(interval[f"layer{i}"]["q"]) > 2 for i in (0, 1, 3))
  assert int(book.computed["layer2"]["q"]) > int(book.computed["layer0"]["q"])


def _groups(params, records_like=None, **plan_options):
  plans = {
      i: p
      for i, p in enumerate(targets_lib.plan_leaves(params, **plan_options))
      if p is not None
  }
  dtype = lambda i: jax.tree.leaves(params)[i].dtype
  records = {
      i: refresh_lib.LeafRecord(
          jnp.zeros(p.view.batch_shape + (p.view.m, p.rank), dtype(i)),
          jnp.zeros((), dtype(i)),
          refresh_lib.RefreshState(*([jnp.zeros((), jnp.int32)] * 5)),
          (),
          (),
      )
      for i, p in plans.items()
  }
  paths = targets_lib.leaf_paths(params)
  return [[paths[i] for i in g] for g in refresh_lib.groups(plans, records)]


def test_leaves_of_one_shape_with_other_ranks_or_dtypes_form_other_groups():
  params = random_params({"a": (8, 12), "b": (8, 12), "c": (8, 12)})
  defaults = dict(proj_type="left", targets=None, matrix_axes=None)
  assert _groups(params, rank=4, **defaults) == [["a", "b", "c"]]
  ranks = {"a": 4, "b": 2, "c": 4}
  assert _groups(params, rank=ranks, **defaults) == [["a", "c"], ["b"]]
  params["b"] = params["b"].astype(jnp.bfloat16)
  assert _groups(params, rank=4, **defaults) == [["a", "c"], ["b"]]


def _compiled(tx, params) -> str:
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def _decompositions(text: str) -> int:
  """LAPACK decompositions (SVD, QR, Cholesky, eigh) in a compiled program."""
  return len(
      re.findall(
          r'custom_call_target="lapack_\w*(?:gesdd|geqrf|potrf|syevd)', text
      )
  )


def _distinct_kernels(text: str) -> int:
  """The fused computations of a compiled program that differ other than by
  their names: XLA generates code once for identical ones."""
  bodies = re.findall(r"^%?\S*fus\S* [^\n]*\{\n(.*?)^\}", text, re.M | re.S)
  return len({_canonical(body) for body in bodies})


def _canonical(body: str) -> str:
  """``body`` with its instructions renamed in order of appearance and no
  metadata."""
  body = re.sub(r", metadata=\{[^}]*\}", "", body)
  names = {}
  return re.sub(
      r"%[\w.\-]+",
      lambda m: names.setdefault(m.group(0), f"%{len(names)}"),
      body,
  )


def _layers(count: int) -> dict:
  shapes = {f"l{i}": {"a": (24, 40), "b": (40, 24)} for i in range(count)}
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
  )


@pytest.mark.parametrize("svd", ["exact", "gram", "randomized"])
def test_compiled_kernels_grow_with_distinct_shapes_not_with_leaves(svd):
  programs = {
      (layers, grouped): _compiled(
          galore_optax.galore_adamw(
              1e-3, rank=4, svd=svd, group_leaves=grouped
          ),
          _layers(layers),
      )
      for layers, grouped in ((2, True), (8, True), (2, False), (8, False))
  }
  two_layers = _distinct_kernels(programs[2, True])
  assert two_layers > 0
  # two shapes, whatever the leaf count: one loop per shape computes the
  # candidates, and its members adopt them with identical kernels
  assert _distinct_kernels(programs[8, True]) == two_layers
  assert _decompositions(programs[8, True]) == _decompositions(
      programs[2, True]
  )
  # leaf by leaf, each leaf holds its own decompositions
  assert _decompositions(programs[8, False]) == 4 * _decompositions(
      programs[2, False]
  )


def test_opaque_indices_are_the_members_indices_at_any_step():
  indices = jax.jit(lambda count: refresh_lib.opaque_indices(count, 5))
  for count in (0, 7, 2**31 - 1):
    assert [int(i) for i in indices(jnp.int32(count))] == [0, 1, 2, 3, 4]
