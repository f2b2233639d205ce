"""CLIP on the offline default (digits with generated captions), the ``cpu``
preset: AdamW against galore_adamw, fira_adamw and apollo_adamw.

Quality: each row tuned as ``benchmarks.quality`` tunes (a sweep of at least 4
learning rates spanning 10x at seed 0, extended while the best is at an end,
then 3 seeds at the best), scored by zero-shot accuracy on the held-out
images; recall@1 both ways reported beside it. Finished runs go to a ledger
and are reused, so the benchmark completes over several sittings
(``--max-minutes``).

State and time (``--step-time``): each optimizer's state bytes, and the
training CLI's jitted train step of each, steps interleaved in one process,
GaLore's refresh amortised over its interval.

    python -m benchmarks.clip [--max-minutes M] [--report] [--step-time]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics

from flax import nnx

from benchmarks import quality as quality_lib
from benchmarks.common import amortised
from benchmarks.common import machine
from benchmarks.common import train_step_times
from benchmarks.memory import state_bytes
from models import clip
from train import loop
from train.config import TrainConfig
from train.objectives import OBJECTIVES

# name -> (TrainConfig overrides, the sweep's first learning rate). The
# low-rank rows without a scale use the step-size rule, the CLI's default since
# issue 27; "scale 0.25" and "scale 1" are the rows measured before it. Rows
# draw batches without a repeated image or caption (the CLI's default since
# issue 27) unless marked "random batches" (with replacement, the default
# before).
_RANDOM = dict(contrastive_batches="random")
ROWS = {
    "adamw": (dict(optimizer="adamw"), 2e-4),
    "galore_adamw": (dict(optimizer="galore_adamw"), 2e-4),
    "fira_adamw": (dict(optimizer="fira_adamw"), 2e-4),
    "apollo_adamw": (dict(optimizer="apollo_adamw"), 2e-4),
    "adamw, random batches": (dict(optimizer="adamw", **_RANDOM), 2e-4),
    "galore_adamw, random batches": (
        dict(optimizer="galore_adamw", **_RANDOM),
        2e-4,
    ),
    "fira_adamw, random batches": (
        dict(optimizer="fira_adamw", **_RANDOM),
        2e-4,
    ),
    "apollo_adamw, random batches": (
        dict(optimizer="apollo_adamw", **_RANDOM),
        2e-4,
    ),
    "galore_adamw scale 0.25, random batches": (
        dict(optimizer="galore_adamw", scale=0.25, **_RANDOM),
        5e-4,
    ),
    "fira_adamw scale 0.25, random batches": (
        dict(optimizer="fira_adamw", scale=0.25, **_RANDOM),
        5e-4,
    ),
    "apollo_adamw scale 1, random batches": (
        dict(optimizer="apollo_adamw", scale=1.0, **_RANDOM),
        5e-4,
    ),
}
BASE = dict(model="clip", preset="cpu", eval_every=100)
STEPS = 400
SCORE = "val_zero_shot_accuracy"
LEDGER = pathlib.Path("benchmarks/results/clip-runs.jsonl")
OUT = pathlib.Path("benchmarks/results/clip")


def tuned(args) -> dict:
  runner = quality_lib.Runner.for_sitting(
      args,
      STEPS,
      ledger=LEDGER,
      rows=ROWS,
      base=BASE,
      score=SCORE,
      higher_is_better=True,
  )
  return quality_lib.tune_rows(runner, args.rows)


def costs(repeats: int) -> dict:
  """Per row: optimizer state bytes and the seconds of a train step (median of
  interleaved steps; GaLore's refresh amortised over its interval)."""
  setups, state, loss, batch = {}, {}, None, None
  for name, (overrides, first_lr) in ROWS.items():
    cfg = TrainConfig(**BASE, lr=first_lr, **overrides)
    objective = OBJECTIVES[cfg.objective]
    if batch is None:
      data = objective.load_data(dataclasses.replace(cfg, out=None))
      batch = objective.batch(cfg, data, 0, slice(None))
      loss = objective.loss
    model = objective.build_model(cfg, data)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx, _ = loop.build_optimizer(cfg, params)
    setups[name] = (graphdef, params, tx)
    state[name] = state_bytes(tx, params)
  times = train_step_times(setups, loss, batch, repeats)
  gap = TrainConfig(**BASE).update_proj_gap
  out = {}
  for name, t in times.items():
    out[name] = dict(
        state_bytes=state[name], step_s=amortised(t["plain"], t["refresh"], gap)
    )
  return out


def _mean_std(values: list[float]) -> str:
  return (
      f"{100 * statistics.mean(values):.1f} ±"
      f" {100 * statistics.stdev(values):.1f}"
  )


def render(results: dict, cost: dict | None) -> str:
  preset = clip.PRESETS[BASE["preset"]]
  lines = [
      "`python -m benchmarks.clip` — " + machine(),
      "",
      (
          f"CLIP `{BASE['preset']}` preset (towers {preset.vision_width} /"
          f" {preset.text_width} wide, {preset.vision_layers} layers each),"
          f" {STEPS} steps of 64 digit images and byte captions; each row at"
          " the best learning rate of a seed-0 sweep (zero-shot accuracy on"
          " the 359 held-out images), then seeds 0-2:"
      ),
      "",
      (
          "| optimizer | best lr | zero-shot accuracy | image→text R@1 |"
          " text→image R@1 | optimizer state | step vs AdamW | sweep at seed 0"
          " (zero-shot) |"
      ),
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    seeds = r.get("seeds", ())
    done = len(seeds) == len(quality_lib.SEEDS)
    cell = lambda key, seeds=seeds, done=done: (
        _mean_std([e["metrics"][key] for e in seeds]) if done else "pending"
    )
    sweep = ", ".join(
        f"{lr:g}: {100 * e['metrics'][SCORE]:.1f}"
        for lr, e in sorted(r["sweep"].items())
    )
    state = time_ratio = "-"
    if cost and name in cost:
      state = f"{cost[name]['state_bytes'] / 2**20:.2f} MiB"
      time_ratio = f"{cost[name]['step_s'] / cost['adamw']['step_s']:.2f}"
    best = f"{r['best']:g}" if "best" in r else "pending"
    lines.append(
        f"| {name} | {best} | {cell(SCORE)} |"
        f" {cell('val_image_to_text_r1')} | {cell('val_text_to_image_r1')} |"
        f" {state} | {time_ratio} | {sweep} |"
    )
  if cost:
    lines += [
        "",
        (
            "Step time: the CLI's jitted, donated train step, median of"
            " interleaved steps (AdamW"
            f" {1000 * cost['adamw']['step_s']:.1f} ms), GaLore's refresh"
            " amortised over its interval."
        ),
    ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--max-minutes", type=float, default=math.inf)
  p.add_argument(
      "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW"
  )
  p.add_argument(
      "--report", action="store_true", help="only read finished runs"
  )
  p.add_argument("--step-time", action="store_true", help="state and step time")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--runs", default="runs/benchmarks/clip")
  args = p.parse_args(argv)
  results = tuned(args)
  cost_file = OUT.with_suffix(".json")
  cost = (
      json.loads(cost_file.read_text())["cost"] if cost_file.exists() else None
  )
  if args.step_time:
    cost = costs(args.repeats)
    cost_file.write_text(
        json.dumps({"machine": machine(), "cost": cost}, indent=1)
    )
  table = render(results, cost)
  print(table)
  OUT.with_suffix(".md").write_text(table)


if __name__ == "__main__":
  main()
