"""Orbax checkpoints of a run: params, the full optimizer state (bases
included), and meta.

Arrays are saved as they are laid out (sharded or not, from one process or many)
and restored into the layout of the arrays passed to
:meth:`Checkpointer.restore`, so a run can resume on another mesh shape or
device count. A checkpoint that cannot be read is set aside
(``DIR/damaged-checkpoints/<step>``) and the next older one is tried.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed; the message says why."""


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves every ``every`` steps into ``DIR/checkpoints``, keeping the last
  ``keep``."""

  def __init__(
      self,
      out_dir: pathlib.Path,
      every: int,
      keep: int,
      fresh: bool,
      enabled: bool = True,
  ):
    self.path = (out_dir / "checkpoints").absolute()
    self.damaged = (out_dir / "damaged-checkpoints").absolute()
    if fresh and self.path.exists() and jax.process_index() == 0:
      print(f"note: --overwrite: replacing the checkpoints in {self.path}")
      shutil.rmtree(self.path)
    # no process opens the directory while process 0 clears it
    _sync("galore_optax.checkpoints.fresh")
    self.every, self.enabled = every, enabled
    self.manager = ocp.CheckpointManager(
        self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep)
    )

  def due(self, step: int, force: bool = False) -> bool:
    """Whether :meth:`save` should run after ``step`` (``force``: the run's last
    step)."""
    return self.enabled and (force or step % self.every == 0)

  def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )

  def _set_aside(self, step: int) -> pathlib.Path:
    target = self.damaged / str(step)
    if jax.process_index() == 0:
      self.damaged.mkdir(parents=True, exist_ok=True)
      if target.exists():
        shutil.rmtree(target)
      shutil.move(str(self.path / str(step)), str(target))
    _sync(f"galore_optax.checkpoints.aside.{step}")
    self.manager.reload()
    return target

  def restore(
      self, params: Any, opt_state: Any, identity: dict
  ) -> tuple[Any, Any, dict]:
    """Restores the newest intact checkpoint into arrays shaped like ``params``
    and ``opt_state``.

    Raises:
      CheckpointError: when there is no checkpoint, the newest readable one is
        from another config, or none can be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"--resume: no checkpoint in {self.path}")
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    failures = []
    for step in steps:
      try:
        meta = self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
      except (
          Exception
      ) as e:  # unreadable: orbax and TensorStore raise many kinds
        failures.append(self._damaged(step, e))
        continue
      saved = meta.get("config", {})
      differ = {
          k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v
      }
      if differ:
        detail = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}"
            for k, (a, b) in differ.items()
        )
        raise CheckpointError(
            f"the checkpoint in {self.path} is from another config ({detail})"
        )
      try:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            ),
        )
      except Exception as e:
        failures.append(self._damaged(step, e))
        continue
      if failures and jax.process_index() == 0:
        print(
            f"warning: resuming from step {step}, the newest intact checkpoint"
        )
      return restored.params, restored.opt_state, meta
    raise CheckpointError(
        f"--resume: no intact checkpoint in {self.path}: " + "; ".join(failures)
    )

  def _damaged(self, step: int, error: Exception) -> str:
    first_line = (str(error).splitlines() or [""])[0]
    reason = f"{type(error).__name__}: {first_line}"[:300]
    target = self._set_aside(step)
    if jax.process_index() == 0:
      print(
          f"warning: the checkpoint of step {step} is unreadable ({reason});"
          f" moved it to {target}"
      )
    return f"step {step} unreadable ({reason})"

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
