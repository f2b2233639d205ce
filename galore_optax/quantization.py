"""Block-wise quantized arrays: 8-bit optimizer state and INT8 / INT4 bases.

An array ``x`` is cut into blocks of ``block_size`` consecutive elements in
row-major order; each block keeps one float32 scale ``absmax = max |x_b|`` and
one code per element, the index of the codebook value nearest to
``x / absmax``::

  codes = argmin_k |x / absmax - table[k]|      # uint8 (two per byte at 4 bits)
  x ~= table[codes] * absmax

Codebooks (:data:`CODEBOOKS`):

- ``dynamic``: Dettmers' dynamic tree map, signed (256 values in [-0.993, 1]):
  for each decade ``10^-6 .. 10^0`` a linear grid of ``2^i`` fractions, so
  small magnitudes keep their relative precision. Used for first moments.
- ``dynamic_unsigned``: the same without a sign bit (twice the fractions per
  decade, values in [0, 1]). Used for second moments.
- ``linear8`` / ``linear4``: symmetric linear grids ``k / 127`` and ``k / 7``
  (INT8, INT4). Used for the GaLore bases, whose entries are spread evenly.

The dynamic maps, the scales and the codes equal those of bitsandbytes'
``quantize_blockwise``, with these documented differences:

- A value exactly between two codebook entries goes to the lower one (as
  bitsandbytes' search does). bitsandbytes' CPU kernel (0.50) picks the entry
  nearest to the value rounded to a grid of ``2^-15`` of the block's scale, so
  near a midpoint it may pick another entry, never more than ``2^-15``
  farther from the value than the nearest (measured and tested).
- A block holding a NaN gets a NaN scale, so the NaN survives a round trip and
  an optimizer that diverges says so; bitsandbytes' scale skips NaN, and the
  NaN element comes back as ``-0.993 absmax``. Codes agree (code 0).
- A block of zeros has scale 0 and every code 0 (bitsandbytes' choice too); it
  dequantizes to zeros.

Blocks are whole runs of the trailing axes: for a leaf of shape ``(*lead,
*tail)``, where ``tail`` is the shortest run of trailing axes whose size is a
multiple of ``block_size``, the codes have shape ``(*lead, n_blocks,
block_size)`` and the scales ``(*lead, n_blocks)``. On a mesh the codes and
scales keep the split of the leading axes, and the block axis takes the split of
the first tail axis, so a block never straddles a shard boundary. A leaf with
no such run is flattened and its last block padded with zeros.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from galore_optax import moments as moments_lib
from galore_optax import sharding

DEFAULT_BLOCK_SIZE = 256
# The widths offered: 8-bit moments (the dynamic maps), INT8 or INT4 bases.
MOMENT_BITS = (8,)
PROJECTOR_BITS = (8, 4)
# Smaller state leaves stay in float32, as bitsandbytes keeps them.
DEFAULT_MIN_SIZE = 4096


def _linspace_like_torch(n: int) -> np.ndarray:
  # n points from 0.1 to 1, rounded as torch.linspace rounds them in float32
  # (a float32 step, points accumulated in double from both ends), so that
  # the map below equals bitsandbytes' to the bit.
  start, end = np.float32(0.1), np.float32(1.0)
  step = np.float64(np.float32((end - start) / np.float32(n - 1)))
  i = np.arange(n)
  points = np.where(
      i < n // 2,
      np.float64(start) + step * i,
      np.float64(end) - step * (n - 1 - i),
  )
  return points.astype(np.float32)


def dynamic_map(signed: bool = True) -> np.ndarray:
  """The 256 sorted float32 values of the dynamic tree map.

  Decade ``i = 0..6`` holds the midpoints of a linear grid of ``2^i`` (signed)
  or ``2^(i+1)`` (unsigned) intervals over ``[0.1, 1]``, times ``10^(i-6)``
  (and their negatives when signed); 0 and 1 complete the map.
  """
  values = [np.float32(0.0), np.float32(1.0)]
  for decade in range(7):
    fractions = 2**decade if signed else 2 ** (decade + 1)
    grid = _linspace_like_torch(fractions + 1)
    mids = (grid[:-1] + grid[1:]) / np.float32(2)
    level = np.float32(10.0 ** (decade - 6)) * mids
    values += list(level) + (list(-level) if signed else [])
  return np.sort(np.asarray(values, np.float32))


def _linear_map(levels: int) -> np.ndarray:
  k = np.arange(-levels, levels + 1, dtype=np.float64)
  return (k / levels).astype(np.float32)


# name -> (sorted codebook values, bits per code)
CODEBOOKS = {
    "dynamic": (dynamic_map(signed=True), 8),
    "dynamic_unsigned": (dynamic_map(signed=False), 8),
    "linear8": (_linear_map(127), 8),
    "linear4": (_linear_map(7), 4),
}


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A block-wise quantized array (see the module docstring).

  A pytree whose children are ``codes`` and ``absmax``; the rest is static.

  Attributes:
    codes: uint8, ``(*lead, n_blocks, block_size)``; at 4 bits ``(*lead,
      n_blocks, block_size // 2)``, two codes a byte (the first in the high
      nibble).
    absmax: float32 scales, ``(*lead, n_blocks)``.
    shape, dtype: of the array it stands for.
    codebook: a key of :data:`CODEBOOKS`.
    block_size: elements per block.
  """

  # A plain registered class rather than a dataclass: flax.nnx keeps such
  # nodes as they are inside an optimizer state.
  def __init__(self, codes, absmax, shape, dtype, codebook, block_size):
    self.codes, self.absmax = codes, absmax
    self.shape, self.dtype = tuple(shape), str(dtype)
    self.codebook, self.block_size = codebook, block_size

  def _static(self):
    return (self.shape, self.dtype, self.codebook, self.block_size)

  def tree_flatten_with_keys(self):
    key = jax.tree_util.GetAttrKey
    children = ((key("codes"), self.codes), (key("absmax"), self.absmax))
    return children, self._static()

  @classmethod
  def tree_unflatten(cls, static, children):
    return cls(*children, *static)

  def __repr__(self):
    return (
        f"QuantizedArray(shape={self.shape}, dtype={self.dtype},"
        f" codebook={self.codebook!r}, block_size={self.block_size})"
    )

  @property
  def nbytes(self) -> int:
    """Bytes of the codes and the scales."""
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in (self.codes, self.absmax)
    )


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _layout(shape: Sequence[int], block_size: int) -> Optional[int]:
  """The first tail axis: the last ``k`` axes hold whole blocks from there
  on; None if no run of trailing axes does (the array is then padded)."""
  for start in range(len(shape) - 1, -1, -1):
    if math.prod(shape[start:]) % block_size == 0:
      return start
  return None


def _blocks_shape(shape, block_size, start):
  if start is None:
    return (-(-math.prod(shape) // block_size), block_size)
  return tuple(shape[:start]) + (
      math.prod(shape[start:]) // block_size,
      block_size,
  )


def _mesh_axis_size(x: Any, axis: Any) -> int:
  mesh = jax.typeof(x).sharding.mesh
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in names)


def _blocked_spec(x, start, blocks_shape) -> sharding.Spec:
  """The spec of ``x``'s blocks: the leading axes' splits, and the first tail
  axis's split on the block axis when every shard holds whole blocks."""
  spec = sharding.spec_of(x)
  if spec is None:
    return None
  if start is None:
    return (None, None)
  first = spec[start]
  if any(spec[start + 1 :]) or (
      first is not None and blocks_shape[start] % _mesh_axis_size(x, first) != 0
  ):
    first = None
  return tuple(spec[:start]) + (first, None)


def _reshape(x, shape, spec: sharding.Spec):
  if spec is None:
    return jnp.reshape(x, shape)
  return jnp.reshape(x, shape, out_sharding=PartitionSpec(*spec))


def _pack4(codes: jax.Array) -> jax.Array:
  return (codes[..., 0::2] << 4) | codes[..., 1::2]


def _unpack4(packed: jax.Array) -> jax.Array:
  pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=-1)
  return pairs.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _lookup(values: jax.Array, index: jax.Array) -> jax.Array:
  """``values[index]``, placed like ``index`` on an explicit mesh."""
  spec = sharding.spec_of(index)
  if spec is None:
    return values[index]
  return values.at[index].get(out_sharding=PartitionSpec(*spec))


# A float32's sign, exponent and top 8 mantissa bits name its bucket: an
# interval of relative width 2^-8, narrower than every gap between codebook
# midpoints of the same magnitude, so a bucket holds at most one midpoint.
_BUCKET_SHIFT = 15


def _midpoints(codebook: str) -> np.ndarray:
  table = CODEBOOKS[codebook][0]
  return (table[:-1] + table[1:]) / np.float32(2)


@functools.cache
def _buckets(codebook: str) -> np.ndarray:
  """For each bucket, the count of midpoints below its lowest value (uint8)."""
  mids = _midpoints(codebook)
  keys = np.arange(2 ** (32 - _BUCKET_SHIFT), dtype=np.uint32) << _BUCKET_SHIFT
  ends = np.stack([keys, keys | ((1 << _BUCKET_SHIFT) - 1)]).view(np.float32)
  finite = np.all(np.isfinite(ends), axis=0)
  lowest, highest = ends.min(axis=0), ends.max(axis=0)
  below = np.searchsorted(mids, lowest, side="left")
  inside = np.searchsorted(mids, highest, side="right") - below
  if np.any(inside[finite] > 1):  # a codebook finer than the buckets
    raise ValueError(f"codebook {codebook!r} has two midpoints in a bucket")
  return below.astype(np.uint8)


def _nearest(codebook: str, scaled: jax.Array) -> jax.Array:
  """Index of the ``codebook`` entry nearest to each value: the count of
  midpoints below it (a tie goes to the lower entry, NaN to 0).

  The value's bucket gives the count below the bucket; one comparison with
  the next midpoint finishes it. Two table look-ups per value, placed like the
  values on an explicit mesh.
  """
  mids = _midpoints(codebook)
  key = jax.lax.bitcast_convert_type(scaled, jnp.uint32) >> _BUCKET_SHIFT
  below = _lookup(jnp.asarray(_buckets(codebook)), key).astype(jnp.int32)
  n = mids.shape[0]
  next_mid = _lookup(jnp.asarray(mids), jnp.minimum(below, n - 1))
  index = below + ((below < n) & (next_mid < scaled)).astype(jnp.int32)
  return jnp.where(jnp.isnan(scaled), 0, index)


def quantize(
    x: jax.Array,
    codebook: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizedArray:
  """Quantizes ``x`` block-wise with ``codebook`` (see the module docstring)."""
  if codebook not in CODEBOOKS:
    raise ValueError(
        f"unknown codebook {codebook!r}; expected one of {tuple(CODEBOOKS)}"
    )
  bits = CODEBOOKS[codebook][1]
  if bits == 4 and block_size % 2:
    raise ValueError(f"4-bit codes need an even block_size, got {block_size}")
  shape = tuple(x.shape)
  start = _layout(shape, block_size)
  blocks_shape = _blocks_shape(shape, block_size, start)
  spec = _blocked_spec(x, start, blocks_shape)
  values = x.astype(jnp.float32)
  if start is None:
    flat = values.reshape(-1)
    pad = math.prod(blocks_shape) - flat.size
    values = jnp.pad(flat, (0, pad))
  blocks = _reshape(values, blocks_shape, spec)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)  # NaN if the block holds one
  scaled = blocks / absmax[..., None]  # NaN for a block of zeros
  codes = _nearest(codebook, scaled).astype(jnp.uint8)
  if bits == 4:
    codes = _pack4(codes)
  return QuantizedArray(
      codes=codes,
      absmax=absmax,
      shape=shape,
      dtype=np.dtype(x.dtype).name,
      codebook=codebook,
      block_size=block_size,
  )


def dequantize(q: QuantizedArray) -> jax.Array:
  """The array ``q`` stands for: ``table[codes] * absmax``, in ``q.dtype``."""
  table, bits = CODEBOOKS[q.codebook]
  codes = _unpack4(q.codes) if bits == 4 else q.codes
  blocks = _lookup(jnp.asarray(table), codes.astype(jnp.int32))
  blocks = blocks * q.absmax[..., None]
  start = _layout(q.shape, q.block_size)
  if start is None:
    values = blocks.reshape(-1)[: math.prod(q.shape)].reshape(q.shape)
  else:
    spec = sharding.spec_of(blocks)
    if spec is not None:
      spec = spec[:-1] + (None,) * (len(q.shape) - start - 1)
    values = _reshape(blocks, q.shape, spec)
  return values.astype(q.dtype)


def dequantize_tree(tree: Any) -> Any:
  """``tree`` with every :class:`QuantizedArray` dequantized."""
  return jax.tree.map(
      lambda x: dequantize(x) if is_quantized(x) else x,
      tree,
      is_leaf=is_quantized,
  )


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  raise TypeError(f"cannot follow the pytree key {key!r} in {type(node)}")


def restore_quantized(tree: Any, like: Any) -> Any:
  """``tree`` in the structure of ``like``, its abstract twin (e.g.
  ``jax.eval_shape(tx.init, updates)``), with each :class:`QuantizedArray` of
  ``like`` rebuilt where ``tree`` holds only a mapping of its codes and
  scales.

  flax.nnx's ``Optimizer`` hands the state back so: it rebuilds the nodes
  inside a params ``State`` from their paths, which keeps the arrays but drops
  a node's type and static fields.
  """
  nodes, treedef = jax.tree_util.tree_flatten_with_path(
      like, is_leaf=is_quantized
  )
  restored = []
  for path, twin in nodes:
    value = tree
    for key in path:
      value = _child(value, key)
    if is_quantized(twin) and not is_quantized(value):
      value = QuantizedArray(value["codes"], value["absmax"], *twin._static())
    restored.append(value)
  return jax.tree_util.tree_unflatten(treedef, restored)


class StatePlan(NamedTuple):
  """Which parts of an optimizer state are quantized, and with what codebook.

  Attributes:
    slots: ``(path, codebook)`` per params-shaped subtree of the state (its
      moments, found as :mod:`galore_optax.moments` finds them).
    block_size: elements per block.
    min_size: smaller leaves stay as they are.
  """

  slots: tuple[tuple[tuple[Any, ...], str], ...]
  block_size: int
  min_size: int

  @property
  def by_leaf(self) -> bool:
    """Whether the moments were found, so that :func:`update_by_leaf` can
    update them leaf by leaf (not where the whole state is one slot)."""
    return all(path for path, _ in self.slots)


def state_plan(
    inner: Any,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
) -> StatePlan:
  """The :class:`StatePlan` of ``inner``'s state: second moments take the
  unsigned map, every other moment the signed one.

  An inner transform whose init cannot take a placeholder has every large
  floating leaf of its state quantized with the signed map.
  """
  for name, value in (("block_size", block_size), ("min_size", min_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  try:
    # every params-shaped subtree, whatever its kind ('reset' refuses none)
    slots = moments_lib.find_slots(inner, "reset")
  except ValueError:
    return StatePlan((((), "dynamic"),), block_size, min_size)
  return StatePlan(
      tuple(
          (s.path, "dynamic_unsigned" if s.kind == "second" else "dynamic")
          for s in slots
      ),
      block_size,
      min_size,
  )


def quantize_tree(state: Any, plan: StatePlan, mask: Any = None) -> Any:
  """``state`` with the large floating leaves of ``plan``'s slots quantized
  (those already quantized kept); ``mask``, a params-shaped tree of bools,
  keeps the leaves where it is False as they are."""

  def maybe(x, codebook, wanted=True):
    if (
        wanted
        and isinstance(x, (jax.Array, np.ndarray))
        and jnp.issubdtype(x.dtype, jnp.floating)
        and x.size >= plan.min_size
    ):
      return quantize(x, codebook, plan.block_size)
    return x

  for path, codebook in plan.slots:
    subtree = moments_lib.get_at(state, path)
    if mask is None or not path:  # the whole state: no params-shaped slot
      subtree = jax.tree.map(
          lambda x, c=codebook: maybe(x, c), subtree, is_leaf=is_quantized
      )
    else:
      subtree = jax.tree.map(
          lambda x, m, c=codebook: maybe(x, c, m),
          subtree,
          mask,
          is_leaf=is_quantized,
      )
    state = moments_lib.set_at(state, path, subtree)
  return state


def check_bits(name: str, bits: Any, allowed: tuple[Any, ...]) -> None:
  """Refuses a bit width outside ``allowed`` or one that is not a Python int
  (under ``optax.inject_hyperparams`` it must be a static arg)."""
  if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
    raise TypeError(
        f"{name} must be a Python int or None, got {bits!r}: it fixes the"
        f" state's layout, so with optax.inject_hyperparams list {name!r} in"
        " static_args"
    )
  if bits not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {bits!r}")


def quantize_state(
    inner: optax.GradientTransformation,
    bits: int = 8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
    *,
    mask: Any = None,
    per_leaf: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Keeps the moments of a params-free transform ``inner`` in 8 bits.

  Every params-shaped entry of ``inner``'s state (its moments) with at least
  ``min_size`` elements is stored block-wise quantized: second moments
  (``nu`` of Adam) with the unsigned dynamic map, the others with the signed
  one, ``block_size`` elements per float32 scale. ``update`` dequantizes them,
  runs ``inner`` and quantizes the new state; the updates are ``inner``'s,
  cast to the gradients' dtypes. The state has ``inner``'s structure with
  :class:`QuantizedArray` s in place of the large moment arrays.

  With ``per_leaf`` (the default), each quantized leaf is dequantized, updated
  and requantized on its own, in a ``lax.cond`` that XLA neither fuses with the
  others nor runs beside them, so the step holds one leaf's float32 moments at
  a time instead of every leaf's (GPT-2 124M's blocks: 0.1 GiB of temporaries
  instead of 0.7). It needs an ``inner`` that updates each leaf on its own, as
  Adam, Lion, momentum and every element-wise transform do; pass
  ``per_leaf=False`` for one that couples leaves (a global norm inside it).

  Args:
    inner: a transform that does not read params, e.g.
      ``optax.scale_by_adam()``.
    bits: 8 (the only width of the dynamic maps).
    block_size: elements per block (bitsandbytes' optimizers use 256).
    min_size: leaves with fewer elements stay in their own dtype.
    mask: which leaves' moments are quantized: a params-shaped tree of bools,
      or a function of the params that returns one (optax's convention, e.g.
      ``match_paths`` negated to keep embeddings in float32, as bitsandbytes'
      ``StableEmbedding`` does); None: every leaf of at least ``min_size``.
    per_leaf: update the quantized leaves one at a time (above).

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax
    >>> params = {"w": jnp.zeros((256, 64))}
    >>> tx = galore_optax.quantize_state(optax.scale_by_adam())
    >>> state = tx.init(params)
    >>> state.nu["w"].codes.shape, state.nu["w"].absmax.shape  # 64 blocks
    ((64, 256), (64,))
  """
  check_bits("bits", bits, MOMENT_BITS)
  inner = optax.with_extra_args_support(inner)
  plan = state_plan(inner, block_size, min_size)
  per_leaf = per_leaf and plan.by_leaf

  def mask_of(params):
    return mask(params) if callable(mask) else mask

  def init_fn(params):
    return quantize_tree(inner.init(params), plan, mask_of(params))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    state = restore_quantized(state, jax.eval_shape(init_fn, updates))
    if per_leaf:
      out, state = update_by_leaf(inner, plan, updates, state, extra_args)
    else:
      out, state = inner.update(
          updates, dequantize_tree(state), None, **extra_args
      )
      state = quantize_tree(state, plan, mask_of(updates))
    out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def update_by_leaf(
    inner: optax.GradientTransformationExtraArgs,
    plan: StatePlan,
    updates: Any,
    state: Any,
    extra_args: dict,
) -> tuple[Any, Any]:
  """``inner.update`` of ``updates`` on ``state``, whose slots (``plan``'s,
  none the whole state) hold :class:`QuantizedArray` s where quantized; the
  updates and the new state, quantized where it was.

  ``inner`` runs once for the leaves in their own dtype together and once for
  each quantized leaf in a ``lax.cond``: a conditional is not fused, and its
  temporaries are live only while it runs. Each run sees ``state`` with its
  slots narrowed to a list of its leaves; the entries outside the slots (a
  step count) come from the last run. ``inner`` must update each leaf on its
  own (:func:`quantize_state`'s ``per_leaf``)."""
  grads, treedef = jax.tree.flatten(updates)
  paths = [path for path, _ in plan.slots]
  slots = [treedef.flatten_up_to(moments_lib.get_at(state, p)) for p in paths]

  def run(grads, *moments):
    """``inner`` on a list of leaves: their gradients and each slot's
    entries."""
    narrowed = state
    for path, entries in zip(paths, moments):
      narrowed = moments_lib.set_at(narrowed, path, dequantize_tree(entries))
    out, new = inner.update(grads, narrowed, None, **extra_args)
    requantized = [
        [
            quantize(x, codebook, plan.block_size) if is_quantized(old) else x
            for x, old in zip(moments_lib.get_at(new, path), entries)
        ]
        for (path, codebook), entries in zip(plan.slots, moments)
    ]
    return out, requantized, new

  def never(*values):  # the branch not taken: zeros placed as run's outputs
    return jax.tree.map(
        lambda s: sharding.zeros(s.shape, s.dtype, sharding.spec_of(s), s),
        jax.eval_shape(run, *values),
    )

  out = [None] * len(grads)
  moments = [[None] * len(grads) for _ in paths]
  quantized = [
      any(is_quantized(s[i]) for s in slots) for i in range(len(grads))
  ]
  plain = [i for i, q in enumerate(quantized) if not q]
  groups = ([plain] if plain else []) + [
      [i] for i, q in enumerate(quantized) if q
  ]
  # a predicate XLA cannot fold, so that each conditional stays one
  taken = jax.lax.optimization_barrier(jnp.array(True))
  new = state
  for group in groups:
    values = (
        [grads[i] for i in group],
        *([s[i] for i in group] for s in slots),
    )
    if group is plain:
      group_out, group_moments, new = run(*values)
    else:
      group_out, group_moments, new = jax.lax.cond(taken, run, never, *values)
    for j, i in enumerate(group):
      out[i] = group_out[j]
      for k in range(len(paths)):
        moments[k][i] = group_moments[k][j]
  for path, entries in zip(paths, moments):
    new = moments_lib.set_at(new, path, treedef.unflatten(entries))
  return treedef.unflatten(out), new
