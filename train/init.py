"""``--init``: where a run's first weights come from.

A directory of one of our own runs (its ``config.json`` names a ``model``)
gives the parameters of its newest checkpoint, and the architecture of its
config; anything else is a Hugging Face checkpoint (:mod:`models.hf`).
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import galore_optax
from models import hf
from models import lora
from models import registry


def is_run(source: str) -> bool:
  """Whether ``source`` is a directory written by ``python -m train``."""
  config = pathlib.Path(source) / "config.json"
  return config.is_file() and run_model(source) is not None


def run_config(source: str) -> dict:
  return json.loads((pathlib.Path(source) / "config.json").read_text())


def run_model(source: str) -> Optional[str]:
  """The model run ``source`` trained (``task``: an earlier version's name
  of the field; :func:`train.config.upgrade` reads the others)."""
  saved = run_config(source)
  return saved.get("model", saved.get("task"))


@functools.lru_cache(maxsize=8)
def model_origin(source: str, model: str) -> tuple[Any, Optional[str]]:
  """What checkpoint ``source`` of ``model`` was built from: ``(its Hugging
  Face model config, None)``, or ``(None, the preset of the run that started
  from scratch)``, following ``--init`` from run to run."""
  if not is_run(source):
    return hf.checkpoint_config(source, expect_model=model), None
  saved = run_config(source)
  if run_model(source) != model:
    raise hf.CheckpointMismatch(
        f"--init {source} is a {run_model(source)} run; it cannot initialise"
        f" a {model}"
    )
  if saved.get("init"):
    return model_origin(saved["init"], model)
  return None, saved["preset"]


def newest_params(source: str) -> dict[str, np.ndarray]:
  """The parameters of run ``source``'s newest checkpoint, by path, blocks
  unstacked and unpacked, in their stored dtype."""
  path = (pathlib.Path(source) / "checkpoints").absolute()
  manager = ocp.CheckpointManager(path)
  step = manager.latest_step()
  if step is None:
    raise hf.CheckpointMismatch(f"{source}: no checkpoint in {path}")
  params = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore())
  ).params
  flat = {
      galore_optax.targets.path_str(key): np.asarray(leaf)
      for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  saved = run_config(source)
  if saved.get("layerwise"):
    flat = _unpacked(flat, jnp.dtype(saved.get("param_dtype") or "float32"))
  return hf.unstack_layers(flat)


def _unpacked(flat: dict, dtype: np.dtype) -> dict:
  """A layer-wise run keeps its blocks' 16-bit parameters as raw bits
  (``train.layerwise.Bits``, saved as one uint16 child ``.../0``): their
  values, under the parameter's own path."""
  if dtype.itemsize != 2:
    return flat
  return dict(
      (k[: -len("/0")], v.view(dtype))
      if v.dtype == np.uint16 and k.endswith("/0")
      else (k, v)
      for k, v in flat.items()
  )


def load_run(source: str, model: nnx.Module, heads: tuple[str, ...]) -> list:
  """Fills ``model`` with the newest checkpoint of run ``source``; parameters
  under ``heads`` that the run lacks, or holds in another shape, keep their
  initialisation. Returns those.

  Raises:
    models.hf.CheckpointMismatch: naming the parameters that do not fit.
  """
  saved = newest_params(source)
  flat = hf.flat_params(model)
  if not any(re.search(r"blocks/\d+/", k) for k in flat):
    # the model's blocks are stacked (--remat block, --layerwise)
    saved = hf.stack_layers(saved)
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


def trained_model(source: str) -> tuple[str, Any, dict[str, np.ndarray]]:
  """``(family, model config, parameters)`` of run ``source``: its model as
  it trained (``model.json``, blocks unstacked) and its newest checkpoint's
  parameters (:func:`newest_params`, LoRA adapters merged)."""
  path = pathlib.Path(source) / "model.json"
  if not is_run(source):
    raise hf.CheckpointMismatch(f"{source}: not a run directory of ours")
  if not path.is_file():
    raise hf.CheckpointMismatch(
        f"{source}: no model.json (runs of earlier versions lack it);"
        " resume it to write one: python -m train --config"
        f" {source}/config.json --out {source} --resume"
    )
  family = run_model(source)
  fields = json.loads(path.read_text())
  kind = type(next(iter(registry.MODELS[family].presets.values())))
  config = kind(**{**fields, "stacked": False, "remat": False})
  # a LoRA run's adapters folded into the weights they adapt
  return family, config, lora.merge(newest_params(source))
