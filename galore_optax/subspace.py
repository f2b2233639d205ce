"""Computing a leaf's basis: exact, randomized or Gram SVD, with canonical
signs.

Every method returns the top-``rank`` singular directions of ``G``
(``(*batch, m, n)``) as ``(left, right)`` = ``(U_r, V_r^T)``, with ``None`` for
an unused side. The work runs in float32 (float64 for float64 input) and the
result stays in that precision: the caller checks it and casts it.

- ``exact``: ``jnp.linalg.svd``, as galore-torch.
- ``randomized``: Halko, Martinsson and Tropp's range finder. For the side that
  is needed, ``A = G`` (left) or ``G^T`` (right), sketch ``Y = A Omega`` with
  ``r + oversample`` Gaussian columns, run ``power_iters`` rounds
  ``Y <- A (A^T Q)`` with re-orthonormalisation, then ``U = Q W`` with ``W``
  the top eigenvectors of the small ``B B^T``, ``B = Q^T A``; for ``full``,
  the thin SVD ``B = W S Z^T`` gives ``V^T = Z^T`` as well. Every factor comes
  out of an orthogonal factorisation, so it is orthonormal even when ``G`` has
  lower rank than ``r``. Cost: ``(2 q + 2) m n k``
  multiply-adds against the ``O(m n min(m, n))`` of a full SVD.
- ``gram``: the top eigenvectors of the Gram matrix of each needed side:
  ``G G^T`` (m x m) for ``U``, ``G^T G`` (n x n) for ``V``. Eigenvectors of a
  symmetric matrix are orthonormal whatever its conditioning; their accuracy
  degrades with the squared condition number. Cheap when the needed side is
  the smaller one (``std``); ``reverse_std`` and ``full`` pay for the larger.
"""

from __future__ import annotations

from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp

SVD_METHODS = ("exact", "randomized", "gram")


class RandomizedSVD(NamedTuple):
  """``svd=RandomizedSVD(...)`` tunes the randomized refresh;
  ``svd="randomized"`` is the default one.

  The sketch of a leaf at optimizer step ``t`` is drawn from
  ``fold_in(fold_in(PRNGKey(seed), t), leaf_index)``: runs are reproducible, and
  every device of a data-parallel run computes the same basis.
  """

  oversample: int = 8
  power_iters: int = 1
  seed: int = 0


class LazyRefresh(NamedTuple):
  """Q-GaLore's lazy refresh: a leaf whose successive bases agree refreshes less
  often.

  At each refresh after the first, the similarity of the new basis to the old
  one (the mean squared cosine of the principal angles between the two
  subspaces, see :func:`similarity`) is compared with ``threshold``; after
  ``patience`` similar refreshes in a row, the leaf's interval doubles, up to
  ``max_gap`` (default ``8 * update_proj_gap``). A dissimilar refresh resets the
  count, not the interval.
  """

  threshold: float = 0.4
  patience: int = 5
  max_gap: Optional[int] = None


SvdSpec = Union[str, RandomizedSVD]

Basis = tuple[Optional[jax.Array], Optional[jax.Array]]


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each basis vector so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign, which LAPACK, cuSOLVER and TPU
  kernels (and a random sketch) resolve differently; fixing it makes the basis a
  deterministic function of ``G``. ``axis=-2`` for column vectors (``U_r``),
  ``axis=-1`` for row vectors (``V_r^T``).
  """
  pivot = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  signs = jnp.sign(jnp.take_along_axis(vectors, pivot, axis=axis))
  return vectors * jnp.where(signs == 0, 1, signs).astype(vectors.dtype)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 products: a GPU's default TF32 would cost the bases their
  # orthonormality.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _finish(u: Optional[jax.Array], vt: Optional[jax.Array]) -> Basis:
  left = None if u is None else canonical_signs(u, -2)
  right = None if vt is None else canonical_signs(vt, -1)
  return left, right


def _work(g: jax.Array) -> jax.Array:
  return g.astype(jnp.promote_types(g.dtype, jnp.float32))


def exact_basis(
    g: jax.Array, rank: int, use_left: bool, use_right: bool
) -> Basis:
  u, _, vt = jnp.linalg.svd(_work(g), full_matrices=False)
  return _finish(
      u[..., :, :rank] if use_left else None,
      vt[..., :rank, :] if use_right else None,
  )


def _cholesky_qr2(y: jax.Array) -> jax.Array:
  """Shifted CholeskyQR2: two Cholesky passes on the ``k x k`` Gram matrix, all
  matrix products, far cheaper than a Householder QR on CPUs and accelerators.
  The first pass's small diagonal shift keeps it finite when ``y`` is
  ill-conditioned (Fukaya et al., 2020).
  """
  p, k = y.shape[-2:]
  eps = jnp.finfo(y.dtype).eps
  for shift in (True, False):
    gram = _mm(_t(y), y)
    if shift:
      norm = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
      gram = gram + (11 * (p * k + k * (k + 1)) * eps) * norm * jnp.eye(
          k, dtype=y.dtype
      )
    chol = jnp.linalg.cholesky(gram)
    y = _t(jax.scipy.linalg.solve_triangular(chol, _t(y), lower=True))
  return y


def _orthonormalize(y: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``y`` (``(*batch, p, k)``, p >= k).

  CholeskyQR2 first; when ``y`` is too ill-conditioned for it (a nearly
  rank-deficient gradient: the result is not finite or not orthonormal),
  Householder QR, which always works.
  """
  q = _cholesky_qr2(y)
  k = y.shape[-1]
  error = jnp.max(jnp.abs(_mm(_t(q), q) - jnp.eye(k, dtype=y.dtype)))
  good = jnp.all(jnp.isfinite(q)) & (error < 1e-3)
  return jax.lax.cond(good, lambda: q, lambda: jnp.linalg.qr(y)[0])


def _top_eigh(c: jax.Array, rank: int) -> jax.Array:
  """The eigenvectors of the ``rank`` largest eigenvalues of the symmetric ``c``
  as columns, largest first."""
  _, w = jnp.linalg.eigh(c)
  return w[..., :, ::-1][..., :, :rank]


def randomized_basis(
    g: jax.Array,
    rank: int,
    use_left: bool,
    use_right: bool,
    key: jax.Array,
    oversample: int = 8,
    power_iters: int = 1,
) -> Basis:
  # The needed vectors are A's left singular vectors: U of G, or V of G^T.
  a = _work(g) if use_left else _t(_work(g))
  rows, cols = a.shape[-2:]
  k = min(rank + oversample, rows, cols)
  omega = jax.random.normal(key, a.shape[:-2] + (cols, k), a.dtype)
  q = _orthonormalize(_mm(a, omega))
  for _ in range(power_iters):
    q = _orthonormalize(_mm(a, _mm(_t(a), q)))
  b = _mm(_t(q), a)  # (k, cols)
  if use_left and use_right:  # 'full' needs B's right singular vectors too
    w, _, zt = jnp.linalg.svd(b, full_matrices=False)
    return _finish(_mm(q, w[..., :, :rank]), zt[..., :rank, :])
  u = _mm(q, _top_eigh(_mm(b, _t(b)), rank))  # cheaper: a k x k eigenproblem
  if not use_left:  # right side only: A = G^T, so U of A is V of G
    return _finish(None, _t(u))
  return _finish(u, None)


def gram_basis(
    g: jax.Array, rank: int, use_left: bool, use_right: bool
) -> Basis:
  x = _work(g)
  left = _top_eigh(_mm(x, _t(x)), rank) if use_left else None
  right = _t(_top_eigh(_mm(_t(x), x), rank)) if use_right else None
  return _finish(left, right)


def compute_basis(
    g: jax.Array,
    rank: int,
    use_left: bool,
    use_right: bool,
    *,
    method: str = "exact",
    key: Optional[jax.Array] = None,
    oversample: int = 8,
    power_iters: int = 1,
) -> Basis:
  """The basis of ``g`` by ``method`` (see the module docstring)."""
  if method == "exact":
    return exact_basis(g, rank, use_left, use_right)
  if method == "randomized":
    return randomized_basis(
        g, rank, use_left, use_right, key, oversample, power_iters
    )
  if method == "gram":
    return gram_basis(g, rank, use_left, use_right)
  raise ValueError(
      f"unknown svd method {method!r}; expected one of {SVD_METHODS}"
  )


def axis_basis(
    shape: tuple[int, ...], side: str, rank: int, dtype
) -> jax.Array:
  """The first ``rank`` coordinate axes: the documented fallback when a leaf's
  very first refresh sees a gradient it cannot use (not finite, or all zero)."""
  batch, (m, n) = shape[:-2], shape[-2:]
  if side == "left":
    return jnp.broadcast_to(jnp.eye(m, rank, dtype=dtype), batch + (m, rank))
  return jnp.broadcast_to(jnp.eye(rank, n, dtype=dtype), batch + (rank, n))


def overlap(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
  """``a^T b`` for bases of column vectors (``axis=-2``), ``a b^T`` for row
  vectors (``axis=-1``): the ``r x r`` matrix of cosines between the two bases'
  vectors, in full float32.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return _mm(_t(a), b) if axis == -2 else _mm(a, _t(b))


def similarity(old: jax.Array, new: jax.Array, axis: int) -> jax.Array:
  """How much of the new subspace the old one holds: the mean squared cosine of
  the principal angles between them, ``||old^T new||_F^2 / r`` (``axis=-2``:
  bases of column vectors) or ``||old new^T||_F^2 / r`` (``axis=-1``: row
  vectors), averaged over batch matrices.

  A scalar in [0, 1]: 1 for the same subspace whatever the order or signs of its
  vectors, ``r / d`` on average for unrelated random subspaces of a
  d-dimensional space.
  """
  rank = new.shape[-1] if axis == -2 else new.shape[-2]
  return jnp.mean(jnp.sum(overlap(old, new, axis) ** 2, axis=(-2, -1)) / rank)


def orthonormality_error(basis: jax.Array, axis: int) -> jax.Array:
  """``max |P^T P - I|`` over the basis vectors (``axis=-2``: columns of
  ``U_r``; ``axis=-1``: rows of ``V_r^T``) and batch matrices, in float32."""
  gram = overlap(basis, basis, axis)
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return jnp.max(jnp.abs(gram - eye))
