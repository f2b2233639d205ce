"""Moment policies and lazy refresh on a small GPT-2: final validation loss and
bases computed.

Each configuration trains the 'cpu' GPT-2 preset with galore_adamw on the
embedded corpus, with the same data and steps for each seed; only the subspace
options differ. The table gives the mean and standard deviation of the final
validation loss over the seeds.

    python -m benchmarks.ablation [--steps 400] [--update-proj-gap 25] [--seeds
    0 1 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from benchmarks.common import machine
from train.config import TrainConfig
from train.loop import train

CONFIGS = {
    "moments=keep (reference)": dict(moments="keep"),
    "moments=reset": dict(moments="reset"),
    "moments=transport": dict(moments="transport"),
    "keep + lazy refresh": dict(
        moments="keep", lazy_threshold=0.4, lazy_patience=2
    ),
    "transport + lazy refresh": dict(
        moments="transport", lazy_threshold=0.4, lazy_patience=2
    ),
    "transport + randomized svd": dict(moments="transport", svd="randomized"),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--update-proj-gap", type=int, default=25)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="runs/ablation")
  args = parser.parse_args()
  rows = {}
  for name, options in CONFIGS.items():
    runs = []
    for seed in args.seeds:
      out = pathlib.Path(args.out) / f"{name}-seed{seed}".replace(" ", "_")
      cfg = TrainConfig(
          model="gpt2",
          preset="cpu",
          steps=args.steps,
          update_proj_gap=args.update_proj_gap,
          seed=seed,
          eval_every=args.steps,
          log_every=50,
          checkpoint_every=10**9,
          out=str(out),
          overwrite=True,
          **options,
      )
      runs.append(train(cfg, verbose=False).summary)
      print(name, seed, runs[-1]["val_loss"], flush=True)
    losses = [s["val_loss"] for s in runs]
    rows[name] = {
        "val_loss": losses,
        "mean": float(np.mean(losses)),
        "std": float(np.std(losses)),
        "bases_computed": runs[0]["refresh"]["bases_computed"],
        "svds_saved": runs[0]["refresh"]["svds_saved"],
    }
  table = [
      (
          f"## Subspace options on GPT-2 'cpu', {args.steps} steps,"
          f" T={args.update_proj_gap}, seeds {args.seeds}\n"
      ),
      f"machine: {machine()}\n",
      (
          "| configuration | final val loss (mean +- std) | per seed | bases"
          " computed (seed 0) | SVDs saved |"
      ),
      "|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    table.append(
        f"| {name} | {r['mean']:.4f} +- {r['std']:.4f} |"
        f" {', '.join(f'{v:.4f}' for v in r['val_loss'])} |"
        f" {r['bases_computed']} | {r['svds_saved']} |"
    )
  print("\n" + "\n".join(table))
  results = pathlib.Path(__file__).parent / "results"
  (results / "ablation.json").write_text(json.dumps(rows, indent=2))
  (results / "ablation.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
  main()
