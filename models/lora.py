"""The LoRA baseline, with Flax's own ``nnx.LoRA``: rank-r adapters on the
matrices GaLore targets, the base weights frozen.

``add_adapters`` wraps each targeted ``nnx.Linear`` (``blocks/<i>/attn/*`` and
``blocks/<i>/mlp/*``) in an ``nnx.LoRA`` whose ``base_module`` is that layer:
``y = base(x) + x A B`` with ``A`` (d_in, r) drawn at random and ``B`` (r,
d_out) zero, so the adapted model starts as the base model. What trains is
:func:`trainable`: the adapters and the task's head.
"""

from __future__ import annotations

import re

from flax import nnx

# a targeted layer's path, as GaLore's rule (models.GALORE_TARGETS) names its
# kernel
ADAPTED = re.compile(r"(^|/)blocks/\d+/(attn|mlp)/\w+$")


def _path(key: tuple) -> str:
  return "/".join(str(k) for k in key)


# the adapters' own parameters
ADAPTER_PARAMS = re.compile(r"(^|/)lora_[ab]$")


def add_adapters(model: nnx.Module, rank: int, rngs: nnx.Rngs) -> int:
  """Wraps the targeted linear layers of ``model`` in ``nnx.LoRA`` adapters of
  rank ``rank``, in place; returns how many.

  Raises:
    ValueError: when ``rank`` exceeds a layer's smaller side, or nothing is
      targeted (stacked blocks are not adapted).
  """
  found = [
      (path, node)
      for path, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Linear) and ADAPTED.search(_path(path))
  ]
  if not found:
    raise ValueError(
        "LoRA found no attention or MLP layer under blocks/<i>/ (stacked blocks"
        " are not adapted)"
    )
  for path, linear in found:
    d_in, d_out = linear.in_features, linear.out_features
    if rank > min(d_in, d_out):
      raise ValueError(
          f"LoRA rank {rank} exceeds the layer {_path(path)!r}"
          f" ({d_in} x {d_out})"
      )
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(
        parent,
        path[-1],
        nnx.LoRA(
            d_in,
            rank,
            d_out,
            base_module=linear,
            param_dtype=linear.param_dtype,
            dtype=linear.dtype,
            rngs=rngs,
        ),
    )
  return len(found)


def trainable(path: str, heads: tuple[str, ...], rest: bool = False) -> bool:
  """Whether the parameter at ``path`` trains under LoRA: an adapter, or the
  task's head (paths starting with one of ``heads``); with ``rest``, every
  parameter but the adapted layers' base weights."""
  if rest:
    return "/base_module/" not in f"/{path}"
  return bool(ADAPTER_PARAMS.search(path)) or path.startswith(heads)


def merge(params: dict) -> dict:
  """Parameters by path with each adapted layer folded back into a plain
  one: ``.../base_module/kernel`` + ``lora_a @ lora_b`` as ``.../kernel``,
  ``.../base_module/bias`` as ``.../bias``; others as they are. The model
  without adapters computes what the adapted one did."""
  out = {}
  for path, value in params.items():
    layer, adapted, rest = path.rpartition("/base_module/")
    if not adapted:
      if not ADAPTER_PARAMS.search(path):
        out[path] = value
      continue
    if rest == "kernel":
      value = value + params[f"{layer}/lora_a"] @ params[f"{layer}/lora_b"]
    out[f"{layer}/{rest}"] = value
  return out
