"""ViT on the offline default (scikit-learn's 8x8 digits), the main job of
``python -m train vit``: AdamW against galore_adamw (the step-size rule and the
paper's scale), fira_adamw and apollo_adamw.

Each row tuned as ``benchmarks.quality`` tunes (a sweep of at least 4 learning
rates spanning 10x at seed 0, extended while the best is at an end, then 3
seeds at the best), scored by validation accuracy on the held-out images.
Finished runs go to a ledger and are reused, so the benchmark completes over
several sittings (``--max-minutes``).

    python -m benchmarks.vit [--rows NAME ...] [--max-minutes M] [--report]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics

from benchmarks import quality as quality_lib
from benchmarks.common import machine
from train.config import TrainConfig

# name -> (TrainConfig overrides, the sweep's first learning rate). Rows
# without a scale use the step-size rule, the CLI's default.
ROWS = {
    "adamw": (dict(optimizer="adamw"), 5e-4),
    "galore_adamw": (dict(optimizer="galore_adamw"), 5e-4),
    "galore_adamw scale 0.25": (
        dict(optimizer="galore_adamw", scale=0.25),
        2e-3,
    ),
    "fira_adamw": (dict(optimizer="fira_adamw"), 5e-4),
    "apollo_adamw": (dict(optimizer="apollo_adamw"), 5e-4),
}
BASE = dict(model="vit")
SCORE = "val_accuracy"
LEDGER = pathlib.Path("benchmarks/results/vit-runs.jsonl")
OUT = pathlib.Path("benchmarks/results/vit.md")


def render(results: dict) -> str:
  cfg = TrainConfig(**BASE)
  lines = [
      "`python -m benchmarks.vit` — " + machine(),
      "",
      (
          f"ViT `{cfg.preset}` preset, {cfg.steps} steps of {cfg.batch_size}"
          " digit images; each row at the best learning rate of a seed-0 sweep"
          " (validation accuracy on the held-out images), then seeds 0-2:"
      ),
      "",
      (
          "| optimizer | best lr | accuracy (%), mean ± std | seeds | vs AdamW"
          " (points) | sweep at seed 0 |"
      ),
      "|---|---|---|---|---|---|",
  ]
  accuracy = lambda e: 100 * e["metrics"][SCORE]
  base = results["adamw"].get("seeds", ())
  base_mean = (
      statistics.mean(map(accuracy, base))
      if len(base) == len(quality_lib.SEEDS)
      else None
  )
  for name, r in results.items():
    seeds = [accuracy(e) for e in r.get("seeds", ())]
    done = len(seeds) == len(quality_lib.SEEDS)
    cell = (
        f"{statistics.mean(seeds):.1f} ± {statistics.stdev(seeds):.1f}"
        if done
        else "pending"
    )
    versus = (
        f"{statistics.mean(seeds) - base_mean:+.1f}"
        if done and base_mean is not None
        else "-"
    )
    sweep = ", ".join(
        f"{lr:g}: {accuracy(e):.1f}" for lr, e in sorted(r["sweep"].items())
    )
    best = f"{r['best']:g}" if "best" in r else "pending"
    listed = ", ".join(f"{v:.1f}" for v in seeds)
    lines.append(
        f"| {name} | {best} | {cell} | {listed} | {versus} | {sweep} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument(
      "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW"
  )
  p.add_argument("--max-minutes", type=float, default=math.inf)
  p.add_argument(
      "--report", action="store_true", help="only read finished runs"
  )
  p.add_argument("--runs", default="runs/benchmarks/vit")
  args = p.parse_args(argv)
  runner = quality_lib.Runner.for_sitting(
      args,
      TrainConfig(**BASE).steps,
      ledger=LEDGER,
      rows=ROWS,
      base=BASE,
      score=SCORE,
      higher_is_better=True,
  )
  table = render(quality_lib.tune_rows(runner, args.rows))
  print(table)
  OUT.write_text(table)


if __name__ == "__main__":
  main()
