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
from train import loop

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
      move,
      opt_state,
      is_leaf=lambda x: isinstance(x, galore_optax.GaLoreState),
  )


def train_step_times(
    setups: dict, loss_fn: Callable, batch, repeats: int
) -> dict:
  """Median seconds of a plain step of the training CLI's jitted, donated train
  step (``train.loop.make_steps``) for each setup, the setups' steps
  interleaved so that drift in the machine's speed hits all alike; and of a
  refresh step (one forced to recompute every basis) for those whose state
  holds GaLore's.

  ``setups``: name -> ``(graphdef, params, tx)``; ``loss_fn(model, batch)``.
  Returns ``{name: {"plain": s, "refresh": s or None}}``.
  """
  runs = {}
  for name, (graphdef, params, tx) in setups.items():
    step_fn, _ = loop.make_steps(graphdef, tx, loss_fn)
    step = jax.jit(step_fn, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    carry = [params, tx.init(params)]
    for _ in range(2):  # compile, and step 0 (GaLore's first refresh)
      carry[0], carry[1], metrics = step(carry[0], carry[1], batch)
      metrics["loss"].block_until_ready()
    runs[name] = (step, carry, [])

  def timed(step, carry):
    start = time.perf_counter()
    carry[0], carry[1], metrics = step(carry[0], carry[1], batch)
    metrics["loss"].block_until_ready()
    return time.perf_counter() - start

  for _ in range(repeats):
    for step, carry, times in runs.values():
      times.append(timed(step, carry))
  out = {}
  for name, (step, carry, times) in runs.items():
    refresh = None
    if galore_optax.find_states(carry[1], galore_optax.GaLoreState):
      refresh_times = []
      for _ in range(max(2, repeats // 2)):
        carry[1] = set_next_refresh(carry[1], lambda s: s.count)
        refresh_times.append(timed(step, carry))
      refresh = statistics.median(refresh_times)
    out[name] = {"plain": statistics.median(times), "refresh": refresh}
  return out


def amortised(plain: float, refresh, gap: int) -> float:
  """Seconds per step when one step in ``gap`` is a refresh step (``refresh``
  seconds; None: no refresh) and the others take ``plain``."""
  refresh = plain if refresh is None else refresh
  return plain + (refresh - plain) / gap
