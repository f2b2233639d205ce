"""Which leaves GaLore projects, with which matrix axes and rank: the static
per-leaf plan.

Everything here runs at trace time on shapes only, so it costs nothing inside
``jit``. Leaves are named by their path with ``/`` separators
(``blocks/0/attn/query/kernel``); the trailing ``value`` of a ``flax.nnx``
variable is dropped.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Union

import jax

from galore_optax import projection

# Leaves whose path has a part matching this are left to the inner optimizer by
# default: the paper applies GaLore to attention and MLP matrices, not to
# embeddings or output heads.
DEFAULT_EXCLUDE = r"(?i)^(.*embed.*|wte|wpe|lm_head|head|classifier)$"

TargetsSpec = Union[None, Any, Callable[[Any], Any]]
RankSpec = Union[int, Any, Callable[[str, tuple[int, ...]], int]]
AxesSpec = Union[
    None,
    projection.MatrixAxes,
    Any,
    Callable[[str, tuple[int, ...]], Optional[projection.MatrixAxes]],
]


class LeafPlan(NamedTuple):
  """How one targeted leaf is projected."""

  path: str
  view: projection.MatrixView
  rank: int
  use_left: bool
  use_right: bool

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    return projection.low_rank_shape(
        self.view, self.rank, self.use_left, self.use_right
    )


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """``(DictKey('blocks'), SequenceKey(0), ...)`` -> ``'blocks/0/...'``."""
  names = [_key_name(k) for k in path]
  if (
      len(names) > 1
      and names[-1] == "value"
      and isinstance(path[-1], jax.tree_util.GetAttrKey)
  ):
    names = names[:-1]
  return "/".join(names)


def leaf_paths(tree: Any) -> list[str]:
  """The path string of every leaf of ``tree``, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_paths(
    include: Union[str, Sequence[str]],
    exclude: Union[str, Sequence[str], None] = None,
) -> Callable[[Any], Any]:
  """A ``targets`` rule in the manner of HF Trainer's ``optim_target_modules``.

  A leaf is targeted when ``re.search`` finds one of ``include`` in its path and
  none of ``exclude``. ``match_paths(["attn", "mlp"])`` is the paper's rule for
  our GPT-2.

  Returns:
    A callable mapping params to a pytree of bools.
  """
  include = [include] if isinstance(include, str) else list(include)
  exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())

  def rule(params: Any) -> Any:
    def pick(path, _):
      name = path_str(path)
      return any(re.search(p, name) for p in include) and not any(
          re.search(p, name) for p in exclude
      )

    return jax.tree_util.tree_map_with_path(pick, params)

  return rule


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, projection.MatrixAxes)


def _flatten_matching(spec: Any, params: Any, what: str) -> list[Any]:
  """Flattens a per-leaf ``spec`` pytree, checking that it names the leaves of
  ``params``."""
  spec_flat = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)[
      0
  ]
  spec_paths = [path_str(p) for p, _ in spec_flat]
  param_paths = leaf_paths(params)
  if spec_paths != param_paths:
    missing = [p for p in param_paths if p not in spec_paths]
    extra = [p for p in spec_paths if p not in param_paths]
    detail = (
        f"no entry for params leaf {missing[0]!r}"
        if missing
        else f"entry {extra[0]!r} is not a params leaf"
        if extra
        else "its leaves are in another order"
    )
    raise ValueError(f"the {what} pytree does not match params: {detail}")
  return [leaf for _, leaf in spec_flat]


def _resolve_targets(targets: TargetsSpec, params: Any) -> Optional[list[bool]]:
  if targets is None:
    return None
  if callable(targets):
    targets = targets(params)
  flags = _flatten_matching(targets, params, "targets")
  for path, flag in zip(leaf_paths(params), flags):
    if not isinstance(flag, bool) and not (
        hasattr(flag, "dtype") and flag.shape == () and flag.dtype == bool
    ):
      raise ValueError(
          f"targets entry for leaf {path!r} must be a bool, got {flag!r}"
      )
  return [bool(f) for f in flags]


def _resolve_axes(
    matrix_axes: AxesSpec,
    params: Any,
    paths: list[str],
    shapes: list[tuple[int, ...]],
):
  if matrix_axes is None:
    return [projection.MatrixAxes() if len(s) == 2 else None for s in shapes]
  if isinstance(matrix_axes, projection.MatrixAxes):
    return [matrix_axes] * len(shapes)
  if callable(matrix_axes):
    return [matrix_axes(p, s) for p, s in zip(paths, shapes)]
  return _flatten_matching(matrix_axes, params, "matrix_axes")


def _resolve_ranks(
    rank: RankSpec, params: Any, paths: list[str], shapes: list[tuple[int, ...]]
):
  if isinstance(rank, int):
    return [rank] * len(shapes)
  if callable(rank):
    return [rank(p, s) for p, s in zip(paths, shapes)]
  return _flatten_matching(rank, params, "rank")


def plan_leaves(
    params: Any,
    *,
    rank: RankSpec,
    proj_type: str,
    targets: TargetsSpec = None,
    matrix_axes: AxesSpec = None,
) -> list[Optional[LeafPlan]]:
  """The plan of every leaf of ``params`` (flattening order); ``None`` for a
  leaf left alone.

  Default targets: every leaf that has a matrix view (2-D leaves, or leaves
  given ``matrix_axes``) and whose path has no part named like an embedding or
  an output head (:data:`DEFAULT_EXCLUDE`). Ranks are clamped to ``min(m, n)``.

  Raises:
    ValueError: naming the leaf, for a spec pytree that does not match params, a
      targeted leaf that is not a matrix under its axes, or a rank that is not a
      positive int.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_str(p) for p, _ in flat]
  shapes = [tuple(getattr(leaf, "shape", ())) for _, leaf in flat]
  axes = _resolve_axes(matrix_axes, params, paths, shapes)
  flags = _resolve_targets(targets, params)
  if flags is None:
    flags = [
        a is not None
        and not any(re.match(DEFAULT_EXCLUDE, part) for part in p.split("/"))
        for p, a in zip(paths, axes)
    ]
  ranks = (
      _resolve_ranks(rank, params, paths, shapes)
      if any(flags)
      else [None] * len(flat)
  )

  plans: list[Optional[LeafPlan]] = []
  for path, shape, leaf_axes, flag, leaf_rank in zip(
      paths, shapes, axes, flags, ranks
  ):
    if not flag:
      plans.append(None)
      continue
    if leaf_axes is None:
      raise ValueError(
          f"leaf {path!r} of shape {shape} is targeted for GaLore but is not a"
          " matrix: give its rows and columns with matrix_axes=, or leave it"
          " out of targets"
      )
    try:
      view = projection.matrix_view(shape, leaf_axes)
    except ValueError as e:
      raise ValueError(f"leaf {path!r} of shape {shape}: {e}") from None
    if (
        isinstance(leaf_rank, bool)
        or not isinstance(leaf_rank, int)
        or leaf_rank <= 0
    ):
      raise ValueError(
          f"rank for leaf {path!r} must be a positive int, got {leaf_rank!r}"
      )
    use_left, use_right = projection.basis_sides(view.m, view.n, proj_type)
    plans.append(
        LeafPlan(
            path, view, min(leaf_rank, view.m, view.n), use_left, use_right
        )
    )
  return plans
