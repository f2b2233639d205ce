"""Where a run's metrics go besides ``metrics.jsonl``: ``--log-to
tensorboard,wandb``.

Each tracker takes the rows ``metrics.jsonl`` gets (``step``, ``loss``,
``lr``, throughput, and the validation metrics at evaluation steps) through
one interface, :class:`Tracker`. Both are optional extras (``pip install -e
".[trackers]"``); Weights & Biases runs offline unless ``WANDB_MODE`` says
otherwise, so nothing leaves the machine by default (``wandb sync DIR``
uploads an offline run later).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any
from typing import Protocol

TRACKERS = ("tensorboard", "wandb")
# the module each needs, from the 'trackers' extra
MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb"}


class Tracker(Protocol):

  def log(self, step: int, row: dict[str, Any]) -> None:
    """Records the numbers of one ``metrics.jsonl`` row at ``step``."""

  def close(self) -> None:
    """Writes out what is buffered."""


def _numbers(row: dict[str, Any]) -> dict[str, float]:
  return {
      k: float(v)
      for k, v in row.items()
      if k != "step" and isinstance(v, (int, float))
  }


class TensorBoard:
  """Scalars under ``DIR/tensorboard`` (``tensorboard --logdir DIR``), the
  config as text."""

  def __init__(self, out: pathlib.Path, config: Any):
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(str(out / "tensorboard"))
    self.writer.add_text(
        "config", json.dumps(dataclasses.asdict(config), indent=2)
    )

  def log(self, step: int, row: dict[str, Any]) -> None:
    for name, value in _numbers(row).items():
      self.writer.add_scalar(name, value, step)

  def close(self) -> None:
    self.writer.close()


class Wandb:
  """A Weights & Biases run under ``DIR/wandb``, offline unless
  ``WANDB_MODE`` is set; project ``WANDB_PROJECT`` or ``galore-optax``."""

  def __init__(self, out: pathlib.Path, config: Any):
    import wandb

    self.run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "galore-optax"),
        name=out.name,
        dir=str(out),
        config=dataclasses.asdict(config),
        mode=os.environ.get("WANDB_MODE", "offline"),
        reinit="create_new",
    )

  def log(self, step: int, row: dict[str, Any]) -> None:
    self.run.log(_numbers(row), step=step)

  def close(self) -> None:
    self.run.finish()


def parse(names: str | None) -> tuple[str, ...]:
  """``--log-to``'s names; an unknown one, or one whose package is missing, is
  refused naming it."""
  if not names:
    return ()
  chosen = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n))
  for name in chosen:
    if name not in TRACKERS:
      raise ValueError(
          f"unknown --log-to {name!r}; choose from {', '.join(TRACKERS)}"
      )
    try:
      __import__(MODULES[name])
    except ImportError as e:
      raise ValueError(
          f'--log-to {name} needs {MODULES[name]}: pip install -e ".[trackers]"'
      ) from e
  return chosen


def open_trackers(
    names: tuple[str, ...], out: pathlib.Path, config: Any
) -> list[Tracker]:
  kinds = {"tensorboard": TensorBoard, "wandb": Wandb}
  return [kinds[name](out, config) for name in names]
