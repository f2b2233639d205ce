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

  module = "tensorboardX"

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

  module = "wandb"

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


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}


def parse(names: str | None) -> tuple[str, ...]:
  """``--log-to``'s names, each once; an unknown one is refused naming it.
  Nothing is imported here: :func:`open_trackers` does that."""
  if not names:
    return ()
  chosen = tuple(
      dict.fromkeys(n.strip() for n in names.split(",") if n.strip())
  )
  for name in chosen:
    if name not in TRACKERS:
      raise ValueError(
          f"unknown --log-to {name!r}; choose from {', '.join(TRACKERS)}"
      )
  return chosen


def open_trackers(
    names: tuple[str, ...], out: pathlib.Path, config: Any
) -> list[Tracker]:
  """The trackers ``names``; one whose package is missing is refused naming
  the package and the extra that brings it."""
  opened = []
  for name in names:
    kind = TRACKERS[name]
    try:
      __import__(kind.module)
    except ImportError as e:
      raise ValueError(
          f'--log-to {name} needs {kind.module}: pip install -e ".[trackers]"'
      ) from e
    opened.append(kind(out, config))
  return opened
