"""``--init``: where a run's first weights come from.

A directory of one of our own runs (its ``config.json`` names a ``task``)
gives the parameters of its newest checkpoint, and the architecture of its
config; anything else is a Hugging Face checkpoint (:mod:`models.hf`).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import galore_optax
from models import hf


def is_run(source: str) -> bool:
  """Whether ``source`` is a directory written by ``python -m train``."""
  config = pathlib.Path(source) / "config.json"
  return config.is_file() and "task" in json.loads(config.read_text())


def run_config(source: str) -> dict:
  return json.loads((pathlib.Path(source) / "config.json").read_text())


@functools.lru_cache(maxsize=8)
def model_config(source: str, task: str) -> Any:
  """The model config of checkpoint ``source`` for ``task``."""
  if not is_run(source):
    return hf.checkpoint_config(source, expect_task=task)
  saved = run_config(source)
  if saved["task"] != task:
    raise hf.CheckpointMismatch(
        f"--init {source} is a {saved['task']} run; it cannot initialise the"
        f" {task!r} task"
    )
  from train.tasks import TASKS  # the tasks import this module

  if saved.get("init"):
    return model_config(saved["init"], task)
  return TASKS[task].presets[saved["preset"]]


def _newest_params(source: str) -> dict[str, np.ndarray]:
  path = (pathlib.Path(source) / "checkpoints").absolute()
  manager = ocp.CheckpointManager(path)
  step = manager.latest_step()
  if step is None:
    raise hf.CheckpointMismatch(f"--init {source}: no checkpoint in {path}")
  params = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore())
  ).params
  return {
      galore_optax.targets.path_str(key): np.asarray(leaf)
      for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def load_run(source: str, model: nnx.Module, heads: tuple[str, ...]) -> list:
  """Fills ``model`` with the newest checkpoint of run ``source``; parameters
  under ``heads`` that the run lacks, or holds in another shape, keep their
  initialisation. Returns those.

  Raises:
    models.hf.CheckpointMismatch: naming the parameters that do not fit.
  """
  saved = _newest_params(source)
  flat = hf.flat_params(model)
  values, fresh, problems = hf.fit_params(flat, saved, heads)
  unknown = [k for k in saved if k not in flat and not k.startswith(heads)]
  if unknown:
    problems.append(f"the model has no {', '.join(sorted(unknown)[:8])}")
  if problems:
    raise hf.CheckpointMismatch(
        f"--init {source} does not fit: " + "; ".join(problems[:12])
    )
  hf.set_params(model, values)
  return fresh
