"""Shared by the benchmarks: timing, the machine's description, GPT-2 124M
shapes."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

import galore_optax

# One GPT-2 124M block's matrices (Flax layout: in x out): qkv, attention out,
# MLP in, MLP out.
GPT2_124M_BLOCK = {
    "attn_qkv": (768, 2304),
    "attn_proj": (768, 768),
    "mlp_fc": (768, 3072),
    "mlp_proj": (3072, 768),
}


def gpt2_124m_shapes(layers: int = 12) -> dict:
  return {f"layer{i}": dict(GPT2_124M_BLOCK) for i in range(layers)}


def median_seconds(
    fn: Callable[[], object], repeats: int, warmup: int = 1
) -> float:
  """Median wall time of ``fn()`` (which must block until its result is
  ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def cpu_model() -> str:
  """The CPU's model name (Linux), else its architecture."""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  device = jax.devices()[0]
  kind = (
      device.device_kind
      if device.platform != "cpu"
      else f"{os.cpu_count()}-core CPU ({cpu_model()})"
  )
  return f"{kind}, jax {jax.__version__}, {datetime.date.today().isoformat()}"


def set_next_refresh(opt_state, step_of: Callable):
  """``opt_state`` with every GaLore leaf's next refresh at
  ``step_of(galore_state)``.

  ``lambda s: s.count`` makes the next step refresh; ``lambda s: 2**30`` rules
  refreshes out.
  """

  def move(x):
    if isinstance(x, galore_optax.GaLoreState):
      # A fresh int32 scalar per leaf (jnp.array copies): a donated state must
      # not hold a buffer twice.
      nxt = jax.tree.map(
          lambda n: jnp.array(step_of(x), n.dtype), x.refresh.next_step
      )
      return x._replace(refresh=x.refresh._replace(next_step=nxt))
    return x

  return jax.tree.map(
      move, opt_state, is_leaf=lambda x: isinstance(x, galore_optax.GaLoreState)
  )
