"""Projection math against a float64 NumPy statement of the formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import np_basis
from helpers import np_canonical
from helpers import np_project
from helpers import np_project_back
from helpers import np_sides

from galore_optax import projection
from galore_optax import subspace
from galore_optax.projection import MatrixAxes

SHAPES = [(12, 7), (6, 11), (9, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", projection.PROJ_TYPES)
def test_project_and_back_match_numpy(proj_type, shape):
  rng = np.random.default_rng(3)
  g = rng.standard_normal(shape).astype(np.float32)
  rank = 4
  use_left, use_right = projection.basis_sides(*shape, proj_type)
  assert (use_left, use_right) == np_sides(*shape, proj_type)
  left, right = subspace.exact_basis(jnp.asarray(g), rank, use_left, use_right)
  ref_left, ref_right = np_basis(g, rank, proj_type)
  for ours, ref in ((left, ref_left), (right, ref_right)):
    assert (ours is None) == (ref is None)
    if ref is not None:
      ours = np.asarray(ours, np.float64)
      # Same subspace, compared as a projector; then same vectors, since signs
      # are canonical.
      gram = (
          (lambda x: x @ x.T)
          if ref.shape[0] > ref.shape[1]
          else (lambda x: x.T @ x)
      )
      np.testing.assert_allclose(gram(ours), gram(ref), atol=1e-5)
      np.testing.assert_allclose(ours, ref, atol=1e-5)

  r = projection.project(jnp.asarray(g), left, right)
  ref_r = np_project(g, ref_left, ref_right)
  assert (
      r.shape
      == ref_r.shape
      == projection.low_rank_shape(
          projection.matrix_view(shape, MatrixAxes()), rank, use_left, use_right
      )
  )
  np.testing.assert_allclose(np.asarray(r), ref_r, atol=1e-4)

  n = rng.standard_normal(ref_r.shape)
  back = projection.project_back(jnp.asarray(n, jnp.float32), left, right)
  np.testing.assert_allclose(
      np.asarray(back), np_project_back(n, ref_left, ref_right), atol=1e-4
  )


def test_std_keeps_moments_along_the_larger_side():
  for m, n in [(64, 16), (16, 64)]:
    use_left, use_right = projection.basis_sides(m, n, "std")
    low = projection.low_rank_shape(
        projection.matrix_view((m, n), MatrixAxes()), 4, use_left, use_right
    )
    assert max(low) == max(m, n) and min(low) == 4


def test_canonical_signs_are_deterministic():
  rng = np.random.default_rng(4)
  g = rng.standard_normal((10, 6)).astype(np.float32)
  left, right = subspace.exact_basis(jnp.asarray(g), 6, True, True)
  left, right = np.asarray(left), np.asarray(right)
  # the largest-magnitude entry of every basis vector is positive
  assert np.all(left[np.abs(left).argmax(0), np.arange(6)] > 0)
  assert np.all(right[np.arange(6), np.abs(right).argmax(1)] > 0)
  # still singular vectors: U^T G V^T is diagonal with the singular values up to
  # sign
  core = left.T @ g @ right.T
  s = np.linalg.svd(g.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(np.abs(np.diag(core)), s, rtol=1e-5)
  np.testing.assert_allclose(core - np.diag(np.diag(core)), 0, atol=1e-5)
  # whatever signs the SVD kernel returns, the result is the same
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  flips = np.where(rng.random(6) < 0.5, -1.0, 1.0)
  np.testing.assert_allclose(np_canonical(u * flips, 0), left, atol=1e-5)
  np.testing.assert_allclose(
      np_canonical(vt * flips[:, None], 1), right, atol=1e-5
  )


def test_svd_runs_in_float32_for_bfloat16():
  rng = np.random.default_rng(5)
  g = jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)
  left, right = subspace.exact_basis(g, 4, False, True)
  # the refresh checks it, then casts it
  assert left is None and right.dtype == jnp.float32
  ref = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)[2][:4]
  np.testing.assert_allclose(
      np.asarray(right, np.float64).T @ np.asarray(right, np.float64),
      ref.T @ ref,
      atol=2e-2,
  )


def test_matrix_view_of_attention_kernel_and_stacked_layers():
  rng = np.random.default_rng(6)
  # (embed, heads, head_dim)
  x = rng.standard_normal((8, 2, 4)).astype(np.float32)
  view = projection.matrix_view(x.shape, MatrixAxes(rows=0, cols=(1, 2)))
  assert (view.batch_shape, view.m, view.n) == ((), 8, 8)
  np.testing.assert_array_equal(view.to_matrix(jnp.asarray(x)), x.reshape(8, 8))
  np.testing.assert_array_equal(
      view.from_matrix(view.to_matrix(jnp.asarray(x))), x
  )

  x = rng.standard_normal((3, 5, 7))  # (layers, d_in, d_out)
  view = projection.matrix_view(x.shape, MatrixAxes(rows=1, cols=2))
  assert (view.batch_shape, view.m, view.n) == ((3,), 5, 7)
  left, _ = subspace.exact_basis(
      view.to_matrix(jnp.asarray(x, jnp.float32)), 2, True, False
  )
  for layer in range(3):  # one basis per layer
    ref, _ = np_basis(x[layer], 2, "left")
    np.testing.assert_allclose(np.asarray(left[layer]), ref, atol=1e-5)

  # columns first, rows last, batch in the middle
  x = rng.standard_normal((4, 6, 5)).astype(np.float32)
  view = projection.matrix_view(x.shape, MatrixAxes(rows=2, cols=0))
  np.testing.assert_array_equal(
      view.to_matrix(jnp.asarray(x)), np.transpose(x, (1, 2, 0))
  )
  np.testing.assert_array_equal(
      view.from_matrix(view.to_matrix(jnp.asarray(x))), x
  )


@pytest.mark.parametrize(
    "axes", [MatrixAxes(0, 0), MatrixAxes(0, 3), MatrixAxes((), 1)]
)
def test_matrix_view_rejects_bad_axes(axes):
  with pytest.raises(ValueError):
    projection.matrix_view((4, 5, 6), axes)
