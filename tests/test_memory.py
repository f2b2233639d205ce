"""Memory accounting against the formula and against optax.adamw."""

import jax
import jax.numpy as jnp
import optax

import galore_optax

# per-leaf int32 refresh counters
BOOKKEEPING = 4 * len(galore_optax.RefreshState._fields)


def test_galore_state_bytes_follow_the_formula(params):
  r = 4
  report = galore_optax.memory_report(
      params, galore_optax.galore_adamw(1e-3, rank=r)
  )
  rows = {leaf.path: leaf for leaf in report.leaves}
  for path, (m, n) in {"attn/kernel": (16, 8), "mlp/kernel": (8, 24)}.items():
    # basis min(m, n) r plus two moments max(m, n) r, float32 (plus the unused
    # side's scalar)
    assert (
        rows[path].state_bytes
        == 4 * (min(m, n) * r + 2 * max(m, n) * r + 1) + BOOKKEEPING
    )
    assert rows[path].adamw_bytes == 4 * 2 * m * n
  for path in ("embed", "mlp/bias"):  # untargeted: full Adam moments
    assert (
        rows[path].state_bytes == rows[path].adamw_bytes + 2 * 4 + BOOKKEEPING
    )
  assert report.param_bytes == sum(x.nbytes for x in jax.tree.leaves(params))
  # all state is accounted for, leaf by leaf or as "other" (the step counters)
  state = galore_optax.galore_adamw(1e-3, rank=r).init(params)
  assert report.state_bytes == sum(x.nbytes for x in jax.tree.leaves(state))
  adamw_state = optax.adamw(1e-3).init(params)
  assert report.adamw_bytes == sum(
      x.nbytes for x in jax.tree.leaves(adamw_state)
  )
  assert report.state_ratio < 1
  assert "attn/kernel" in report.table() and "of AdamW's" in report.table()


def test_report_needs_only_shapes():
  shapes = {
      "blocks": {"mlp": jax.ShapeDtypeStruct((4096, 16384), jnp.bfloat16)}
  }
  report = galore_optax.memory_report(
      shapes, galore_optax.galore_adamw(1e-3, rank=256)
  )
  (leaf,) = report.leaves
  assert (
      leaf.state_bytes == 2 * (4096 * 256 + 2 * 16384 * 256 + 1) + BOOKKEEPING
  )
  assert report.state_ratio < 1 / 3
