"""The training objectives: one module each in this package, each defining
``OBJECTIVE`` (a :class:`train.objectives.base.Objective`), found here by
name. An objective trains any model whose capabilities include the one it
needs; a model's default objective is the one that needs its first
capability."""

from __future__ import annotations

import importlib
import pkgutil

from models.registry import MODELS
from train.objectives.base import Objective
from train.objectives.base import ObjectiveError


def _discover() -> dict[str, Objective]:
  found = {}
  for module in pkgutil.iter_modules(__path__):
    if module.name != "base":
      objective = importlib.import_module(f"{__name__}.{module.name}").OBJECTIVE
      found[objective.name] = objective
  return found


OBJECTIVES: dict[str, Objective] = _discover()


def default_objective(model: str) -> str:
  """The objective a model trains on unless ``--objective`` says otherwise."""
  main = MODELS[model].capabilities[0]
  return next(n for n, o in OBJECTIVES.items() if o.needs == main)


def objectives_of(model: str) -> list[str]:
  """The objectives that can train ``model``."""
  offers = MODELS[model].capabilities
  return [n for n, o in OBJECTIVES.items() if o.needs in offers]


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveError",
    "default_objective",
    "objectives_of",
]
