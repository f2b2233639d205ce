"""Orbax checkpoints of a run: params, the full optimizer state (bases
included), and meta.

Arrays are saved as they are laid out (sharded or not, from one process or many)
and restored into the layout of the arrays passed to
:meth:`Checkpointer.restore`, so a run can resume on another mesh shape or
device count. A checkpoint that cannot be read is set aside
(``DIR/damaged-checkpoints/<step>``) and the next older one is tried; one that
reads but whose tree, shapes or dtypes differ from the run's (written by other
code) stops the resume and is left where it is.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.config import upgrade


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
        self.path,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep),
        # named, so that a checkpoint's tree can be read before its arrays
        item_handlers=dict(
            params=ocp.StandardCheckpointHandler(),
            opt_state=ocp.StandardCheckpointHandler(),
            meta=ocp.JsonCheckpointHandler(),
        ),
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
      saved = upgrade(meta.get("config", {}))
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
        mismatch = self._mismatch(step, params=params, opt_state=opt_state)
      except Exception as e:  # the tree's own metadata is unreadable
        failures.append(self._damaged(step, e))
        continue
      if mismatch:
        raise CheckpointError(
            f"the checkpoint of step {step} in {self.path} does not fit this"
            f" run's state: {mismatch}. It was written by other code (a"
            " version whose optimizer state differs); nothing was moved"
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

  def _mismatch(self, step: int, **trees: Any) -> str | None:
    """The first leaf of ``trees`` (item name -> tree of arrays) whose path,
    shape or dtype differs from checkpoint ``step``'s, in words; None when all
    match."""
    saved = self.manager.item_metadata(step)
    for item, tree in trees.items():
      metadata = getattr(saved, item)
      have = _leaf_types(getattr(metadata, "tree", metadata))
      want = _leaf_types(tree)
      for key in [*want, *(k for k in have if k not in want)]:
        name = "/".join((item, *key))
        if key not in have:
          return f"{name} is not in the checkpoint"
        if key not in want:
          return f"{name} is in the checkpoint but not in this run's state"
        if have[key] != want[key]:
          return (
              f"{name} is {_describe(*have[key])} in the checkpoint,"
              f" {_describe(*want[key])} in this run"
          )
    return None

  def _damaged(self, step: int, error: Exception) -> str:
    _quiet_stray_reads()
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
    """Waits for the saves in flight and closes; closing again does
    nothing."""
    if self.manager is None:
      return
    self.manager.wait_until_finished()
    self.manager.close()
    self.manager = None


def _leaf_types(tree: Any) -> dict[tuple[str, ...], tuple[tuple, np.dtype]]:
  """Path (as orbax names it) -> (shape, dtype) of each array of ``tree``."""
  return {
      tuple(map(str, key)): (tuple(leaf.shape), np.dtype(leaf.dtype))
      for key, leaf in ocp.tree.to_flat_dict(tree).items()
  }


def _describe(shape: tuple, dtype: np.dtype) -> str:
  return f"{dtype}{list(shape)}"


def _quiet_stray_reads() -> None:
  """Silences the reads of a failed restore that finish after it.

  When one array of a checkpoint cannot be read, orbax's restore fails and
  closes its event loop while TensorStore's other reads are still in flight;
  each of those then reports ``RuntimeError: Event loop is closed`` through
  ``sys.unraisablehook``, dozens of tracebacks for one damaged checkpoint that
  was already set aside. Only that report is dropped; every other goes to the
  hook installed before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_stray_reads", False):
    return

  def hook(report):
    if not (
        report.object is None
        and isinstance(report.exc_value, RuntimeError)
        and str(report.exc_value) == "Event loop is closed"
    ):
      previous(report)

  hook._drops_stray_reads = True
  sys.unraisablehook = hook
