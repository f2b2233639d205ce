"""Bad input fails at construction or init with a message naming the leaf and
the value."""

import jax.numpy as jnp
import pytest

import galore_optax
from galore_optax import MatrixAxes


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank=0), ValueError, "rank must be positive, got 0"),
        (dict(rank=-3), ValueError, "rank must be positive, got -3"),
        (dict(rank=2.5), TypeError, "rank must be a Python int, got 2.5"),
        (
            dict(update_proj_gap=0),
            ValueError,
            "update_proj_gap must be positive, got 0",
        ),
        (
            dict(update_proj_gap=1.5),
            TypeError,
            "update_proj_gap must be a Python int",
        ),
        (
            dict(proj_type="diagonal"),
            ValueError,
            "unknown proj_type 'diagonal'.*'std', 'reverse_std'",
        ),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, message):
  with pytest.raises(error, match=message):
    galore_optax.scale_by_galore(**kwargs)
  with pytest.raises(error, match=message):
    galore_optax.galore_adamw(1e-3, **kwargs)


def test_targeted_vector_names_the_leaf(params):
  tx = galore_optax.scale_by_galore(targets=galore_optax.match_paths("bias"))
  with pytest.raises(
      ValueError,
      match=(
          r"leaf 'mlp/bias' of shape \(24,\) is targeted for GaLore but is not"
          r" a matrix"
      ),
  ):
    tx.init(params)


def test_targeted_3d_leaf_without_axes_names_the_leaf():
  params = {"attn": {"qkv": jnp.ones((8, 3, 4))}}
  with pytest.raises(
      ValueError, match=r"leaf 'attn/qkv' of shape \(8, 3, 4\).*matrix_axes"
  ):
    galore_optax.scale_by_galore(targets={"attn": {"qkv": True}}).init(params)


def test_bad_matrix_axes_name_the_leaf():
  params = {"attn": {"qkv": jnp.ones((8, 3, 4))}}
  tx = galore_optax.scale_by_galore(matrix_axes=MatrixAxes(rows=0, cols=(0, 1)))
  with pytest.raises(
      ValueError,
      match=r"leaf 'attn/qkv' of shape \(8, 3, 4\): rows 0 and cols \(0, 1\)",
  ):
    tx.init(params)
  tx = galore_optax.scale_by_galore(matrix_axes=MatrixAxes(rows=0, cols=5))
  with pytest.raises(
      ValueError, match=r"leaf 'attn/qkv'.*axis 5 is out of range"
  ):
    tx.init(params)


def test_bad_per_leaf_rank_names_the_leaf(params):
  ranks = {
      "attn": {"kernel": 0},
      "mlp": {"kernel": 4, "bias": None},
      "embed": None,
  }
  with pytest.raises(
      ValueError,
      match=r"rank for leaf 'attn/kernel' must be a positive int, got 0",
  ):
    galore_optax.scale_by_galore(rank=ranks).init(params)
  with pytest.raises(
      ValueError,
      match=r"rank for leaf 'attn/kernel' must be a positive int, got 'big'",
  ):
    galore_optax.scale_by_galore(rank=lambda path, shape: "big").init(params)


def test_spec_pytrees_that_do_not_match_params_name_the_leaf(params):
  ranks = {
      "attn": {"kernel": 4},
      "mlp": {"kernel": 4, "bias": None},
  }  # no entry for embed
  with pytest.raises(
      ValueError,
      match=(
          r"rank pytree does not match params: no entry for params leaf 'embed'"
      ),
  ):
    galore_optax.scale_by_galore(rank=ranks).init(params)
  flags = {
      "attn": {"kernel": True},
      "mlp": {"kernel": True, "bias": False},
      "embed": False,
      "head": True,
  }
  with pytest.raises(
      ValueError,
      match=(
          r"targets pytree does not match params: entry 'head' is not a params"
          r" leaf"
      ),
  ):
    galore_optax.scale_by_galore(targets=flags).init(params)
  flags = {
      "attn": {"kernel": "yes"},
      "mlp": {"kernel": True, "bias": False},
      "embed": False,
  }
  with pytest.raises(
      ValueError,
      match=r"targets entry for leaf 'attn/kernel' must be a bool, got 'yes'",
  ):
    galore_optax.scale_by_galore(targets=flags).init(params)


def test_weight_decay_without_params_is_a_clear_error(params):
  tx = galore_optax.galore_adamw(1e-3, weight_decay=0.1)
  with pytest.raises(ValueError, match="weight decay needs params"):
    tx.update(params, tx.init(params))
