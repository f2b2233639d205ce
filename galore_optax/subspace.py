"""Computing a leaf's basis: exact, randomized or Gram SVD, canonical signs, robustness.

Every method returns the top-``rank`` singular directions of ``G`` (``(*batch, m, n)``) as
``(left, right)`` = ``(U_r, V_r^T)`` with ``None`` for an unused side, computed in float32
(float64 for float64 input) and cast to ``G``'s dtype.

- ``exact``: ``jnp.linalg.svd``, as galore-torch.
- ``randomized``: Halko, Martinsson and Tropp's range finder. For the side that is needed,
  ``A = G`` (left) or ``G^T`` (right), sketch ``Y = A Omega`` with ``r + oversample`` Gaussian
  columns, run ``power_iters`` rounds ``Y <- A (A^T Q)`` with re-orthonormalisation, take
  ``B = Q^T A`` and the eigenvectors ``W`` of the small ``B B^T``: ``U = Q W``. Its cost is
  ``(2 q + 2) m n k`` multiply-adds against the ``O(m n min(m, n))`` of a full SVD.
- ``gram``: the eigenvectors of the smaller Gram matrix ``G G^T`` or ``G^T G``; the other side,
  where needed, is ``G^T U / s`` or ``G V / s``. Exact up to the squared condition number.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

SVD_METHODS = ("exact", "randomized", "gram")


class RandomizedSVD(NamedTuple):
  """``svd=RandomizedSVD(...)`` tunes the randomized refresh; ``svd="randomized"`` is the default one.

  The sketch of a leaf at optimizer step ``t`` is drawn from
  ``fold_in(fold_in(PRNGKey(seed), t), leaf_index)``: runs are reproducible, and every device
  of a data-parallel run computes the same basis.
  """

  oversample: int = 8
  power_iters: int = 1
  seed: int = 0


class LazyRefresh(NamedTuple):
  """Q-GaLore's lazy refresh: a leaf whose successive bases agree refreshes less often.

  At each refresh after the first, the similarity of the new basis to the old one (the mean
  squared cosine of the principal angles between the two subspaces, see :func:`similarity`)
  is compared with ``threshold``; after ``patience``
  similar refreshes in a row, the leaf's interval doubles, up to ``max_gap`` (default
  ``8 * update_proj_gap``). A dissimilar refresh resets the count, not the interval.
  """

  threshold: float = 0.4
  patience: int = 5
  max_gap: Optional[int] = None


SvdSpec = Union[str, RandomizedSVD]

Basis = tuple[Optional[jax.Array], Optional[jax.Array]]


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each basis vector so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign, which LAPACK, cuSOLVER and TPU kernels (and a
  random sketch) resolve differently; fixing it makes the basis a deterministic function of
  ``G``. ``axis=-2`` for column vectors (``U_r``), ``axis=-1`` for row vectors (``V_r^T``).
  """
  pivot = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  signs = jnp.sign(jnp.take_along_axis(vectors, pivot, axis=axis))
  return vectors * jnp.where(signs == 0, 1, signs).astype(vectors.dtype)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 products: a GPU's default TF32 would cost the bases their orthonormality.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _finish(u: Optional[jax.Array], vt: Optional[jax.Array], dtype) -> Basis:
  left = None if u is None else canonical_signs(u, -2).astype(dtype)
  right = None if vt is None else canonical_signs(vt, -1).astype(dtype)
  return left, right


def _work(g: jax.Array) -> jax.Array:
  return g.astype(jnp.promote_types(g.dtype, jnp.float32))


def exact_basis(g: jax.Array, rank: int, use_left: bool, use_right: bool) -> Basis:
  u, _, vt = jnp.linalg.svd(_work(g), full_matrices=False)
  return _finish(u[..., :, :rank] if use_left else None, vt[..., :rank, :] if use_right else None, g.dtype)


def _cholesky_qr2(y: jax.Array) -> jax.Array:
  """Shifted CholeskyQR2: two Cholesky passes on the ``k x k`` Gram matrix, all matrix
  products, far cheaper than a Householder QR on CPUs and accelerators. The first pass's
  small diagonal shift keeps it finite when ``y`` is ill-conditioned (Fukaya et al., 2020)."""
  p, k = y.shape[-2:]
  eps = jnp.finfo(y.dtype).eps
  for shift in (True, False):
    gram = _mm(_t(y), y)
    if shift:
      norm = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
      gram = gram + (11 * (p * k + k * (k + 1)) * eps) * norm * jnp.eye(k, dtype=y.dtype)
    chol = jnp.linalg.cholesky(gram)
    y = _t(jax.scipy.linalg.solve_triangular(chol, _t(y), lower=True))
  return y


def _orthonormalize(y: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``y`` (``(*batch, p, k)``, p >= k).

  CholeskyQR2 first; when ``y`` is too ill-conditioned for it (a nearly rank-deficient
  gradient: the result is not finite or not orthonormal), Householder QR, which always works.
  """
  q = _cholesky_qr2(y)
  k = y.shape[-1]
  error = jnp.max(jnp.abs(_mm(_t(q), q) - jnp.eye(k, dtype=y.dtype)))
  good = jnp.all(jnp.isfinite(q)) & (error < 1e-3)
  return jax.lax.cond(good, lambda: q, lambda: jnp.linalg.qr(y)[0])


def _top_eigh(c: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """The ``rank`` largest eigenpairs of the symmetric ``c``, largest first."""
  lam, w = jnp.linalg.eigh(c)
  return lam[..., ::-1][..., :rank], w[..., :, ::-1][..., :, :rank]


def randomized_basis(g: jax.Array, rank: int, use_left: bool, use_right: bool, key: jax.Array,
                     oversample: int = 8, power_iters: int = 1) -> Basis:
  a = _work(g) if use_left else _t(_work(g))  # the needed vectors are A's left singular vectors
  rows, cols = a.shape[-2:]
  k = min(rank + oversample, rows, cols)
  omega = jax.random.normal(key, a.shape[:-2] + (cols, k), a.dtype)
  q = _orthonormalize(_mm(a, omega))
  for _ in range(power_iters):
    q = _orthonormalize(_mm(a, _mm(_t(a), q)))
  b = _mm(_t(q), a)  # (k, cols)
  lam, w = _top_eigh(_mm(b, _t(b)), rank)
  u = _mm(q, w)
  if not use_left:  # right side only: A = G^T, so U of A is V of G
    return _finish(None, _t(u), g.dtype)
  vt = _mm(_t(w), b) / jnp.sqrt(jnp.maximum(lam, jnp.finfo(lam.dtype).tiny))[..., :, None] if use_right else None
  return _finish(u, vt, g.dtype)


def gram_basis(g: jax.Array, rank: int, use_left: bool, use_right: bool) -> Basis:
  x = _work(g)
  m, n = x.shape[-2:]
  tiny = jnp.finfo(x.dtype).tiny
  if m <= n:
    lam, u = _top_eigh(_mm(x, _t(x)), rank)
    vt = _mm(_t(u), x) / jnp.sqrt(jnp.maximum(lam, tiny))[..., :, None] if use_right else None
    return _finish(u if use_left else None, vt, g.dtype)
  lam, v = _top_eigh(_mm(_t(x), x), rank)
  u = _mm(x, v) / jnp.sqrt(jnp.maximum(lam, tiny))[..., None, :] if use_left else None
  return _finish(u, _t(v) if use_right else None, g.dtype)


def compute_basis(g: jax.Array, rank: int, use_left: bool, use_right: bool, *, method: str = "exact",
                  key: Optional[jax.Array] = None, oversample: int = 8, power_iters: int = 1) -> Basis:
  """The basis of ``g`` by ``method`` (see the module docstring)."""
  if method == "exact":
    return exact_basis(g, rank, use_left, use_right)
  if method == "randomized":
    return randomized_basis(g, rank, use_left, use_right, key, oversample, power_iters)
  if method == "gram":
    return gram_basis(g, rank, use_left, use_right)
  raise ValueError(f"unknown svd method {method!r}; expected one of {SVD_METHODS}")


def axis_basis(shape: tuple[int, ...], side: str, rank: int, dtype) -> jax.Array:
  """The first ``rank`` coordinate axes: the documented fallback when a leaf's very first
  refresh sees a gradient it cannot use (not finite, or all zero)."""
  batch, (m, n) = shape[:-2], shape[-2:]
  if side == "left":
    return jnp.broadcast_to(jnp.eye(m, rank, dtype=dtype), batch + (m, rank))
  return jnp.broadcast_to(jnp.eye(rank, n, dtype=dtype), batch + (rank, n))


def overlap(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
  """``a^T b`` for bases of column vectors (``axis=-2``), ``a b^T`` for row vectors (``axis=-1``):
  the ``r x r`` matrix of cosines between the two bases' vectors, in full float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return _mm(_t(a), b) if axis == -2 else _mm(a, _t(b))


def similarity(old: jax.Array, new: jax.Array, axis: int) -> jax.Array:
  """How much of the new subspace the old one holds: the mean squared cosine of the principal
  angles between them, ``||old^T new||_F^2 / r`` (``axis=-2``: bases of column vectors) or
  ``||old new^T||_F^2 / r`` (``axis=-1``: row vectors), averaged over batch matrices.

  A scalar in [0, 1]: 1 for the same subspace whatever the order or signs of its vectors,
  ``r / d`` on average for unrelated random subspaces of a d-dimensional space.
  """
  rank = new.shape[-1] if axis == -2 else new.shape[-2]
  return jnp.mean(jnp.sum(overlap(old, new, axis) ** 2, axis=(-2, -1)) / rank)
