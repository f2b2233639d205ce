"""Orbax checkpoints of a run: params, the full optimizer state (bases included), and meta.

Arrays are saved as they are laid out (sharded or not, from one process or many) and
restored into the layout of the arrays passed to :meth:`Checkpointer.restore`, so a run can
resume on another mesh shape or device count.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed; the message says why."""


class Checkpointer:
  """Saves every ``every`` steps into ``DIR/checkpoints``, keeping the last ``keep``."""

  def __init__(self, out_dir: pathlib.Path, every: int, keep: int, fresh: bool, enabled: bool = True):
    self.path = (out_dir / "checkpoints").absolute()
    if fresh and self.path.exists() and jax.process_index() == 0:
      print(f"note: starting afresh; replacing the checkpoints in {self.path} (--resume continues them)")
      shutil.rmtree(self.path)
    if jax.process_count() > 1:  # no process may open the directory while process 0 clears it
      multihost_utils.sync_global_devices("galore_optax.checkpoints.fresh")
    self.every, self.enabled = every, enabled
    self.manager = ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def due(self, step: int, force: bool = False) -> bool:
    """Whether :meth:`save` should run after ``step`` (``force``: the run's last step)."""
    return self.enabled and (force or step % self.every == 0)

  def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, params: Any, opt_state: Any, identity: dict) -> tuple[Any, Any, dict]:
    """Restores the latest checkpoint into arrays shaped like ``params`` and ``opt_state``."""
    step = self.manager.latest_step()
    if step is None:
      raise CheckpointError(f"--resume: no checkpoint in {self.path}")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved = meta.get("config", {})
    differ = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if differ:
      detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
      raise CheckpointError(f"the checkpoint in {self.path} is from another config ({detail})")
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state))))
    return restored.params, restored.opt_state, meta

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
