"""Checkpoints on real files: what is set aside as damaged and what is not."""

import sys
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import checkpoint as checkpoint_lib
from train.checkpoint import Checkpointer
from train.checkpoint import CheckpointError

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}


def _saved(tmp_path, steps=(1, 2)):
  saver = Checkpointer(tmp_path, every=1, keep=5, fresh=True)
  state = optax.adam(1e-3).init(PARAMS)
  for step in steps:
    saver.save(step, PARAMS, state, {"step": step, "config": {}})
  saver.close()
  return Checkpointer(tmp_path, every=1, keep=5, fresh=False)


@pytest.mark.parametrize(
    "params, state, named",
    [
        # one field more in the optimizer state, as an upgrade adds
        (
            PARAMS,
            (
                optax.adam(1e-3).init(PARAMS)[0],
                {"extra": jnp.zeros(2)},
                optax.EmptyState(),
            ),
            "opt_state/1/extra is not in the checkpoint",
        ),
        # a shape
        (
            {"w": jnp.ones((4, 3)), "b": jnp.zeros(5)},
            optax.adam(1e-3).init({"w": jnp.ones((4, 3)), "b": jnp.zeros(5)}),
            "params/b is float32[3] in the checkpoint, float32[5] in this run",
        ),
        # a dtype
        (
            {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3)},
            optax.adam(1e-3).init(PARAMS),
            "params/w is float32[4, 3] in the checkpoint, bfloat16[4, 3]",
        ),
    ],
)
def test_a_checkpoint_of_other_code_stops_the_resume_and_stays(
    tmp_path, params, state, named
):
  ckpt = _saved(tmp_path)
  with pytest.raises(CheckpointError, match=named.replace("[", r"\[")) as e:
    ckpt.restore(params, state, {})
  assert "nothing was moved" in str(e.value)
  ckpt.close()
  # both checkpoints where they were, none set aside
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
      "1",
      "2",
  ]
  assert not (tmp_path / "damaged-checkpoints").exists()


def test_a_matching_checkpoint_restores_exactly(tmp_path):
  ckpt = _saved(tmp_path)
  state = optax.adam(1e-3).init(PARAMS)
  params, restored, meta = ckpt.restore(PARAMS, state, {})
  ckpt.close()
  assert meta["step"] == 2
  np.testing.assert_array_equal(params["w"], PARAMS["w"])
  assert type(restored[0]) is type(state[0])


def test_stray_reads_of_a_failed_restore_are_silenced_and_nothing_else():
  before, received = sys.unraisablehook, []
  sys.unraisablehook = received.append
  try:
    checkpoint_lib._quiet_stray_reads()
    for error in (RuntimeError("Event loop is closed"), ValueError("other")):
      sys.unraisablehook(
          types.SimpleNamespace(
              exc_type=type(error),
              exc_value=error,
              exc_traceback=None,
              err_msg=None,
              object=None,
          )
      )
  finally:
    sys.unraisablehook = before
  assert [str(r.exc_value) for r in received] == ["other"]
