"""Moment policies and lazy refresh on a small GPT-2: final validation loss and bases computed.

Each configuration trains the 'cpu' GPT-2 preset with galore_adamw on the embedded corpus,
same seed, data and steps; only the subspace options differ.

    python -m benchmarks.ablation [--steps 400] [--update-proj-gap 25]
"""

from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks.common import machine
from train.config import TrainConfig
from train.loop import train

CONFIGS = {
    "moments=keep (reference)": dict(moments="keep"),
    "moments=reset": dict(moments="reset"),
    "moments=transport": dict(moments="transport"),
    "keep + lazy refresh": dict(moments="keep", lazy_threshold=0.4, lazy_patience=2),
    "transport + lazy refresh": dict(moments="transport", lazy_threshold=0.4, lazy_patience=2),
    "transport + randomized svd": dict(moments="transport", svd="randomized"),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--update-proj-gap", type=int, default=25)
  parser.add_argument("--out", default="runs/ablation")
  args = parser.parse_args()
  rows = {}
  for name, options in CONFIGS.items():
    cfg = TrainConfig(task="gpt2", preset="cpu", steps=args.steps, update_proj_gap=args.update_proj_gap,
                      eval_every=args.steps, log_every=50, out=str(pathlib.Path(args.out) / name.replace(" ", "_")),
                      **options)
    s = train(cfg, verbose=False).summary
    rows[name] = {"val_loss": s["val_loss"], "bases_computed": s["refresh"]["bases_computed"],
                  "svds_saved": s["refresh"]["svds_saved"], "ms_per_step": s["median_step_ms"]}
    print(name, rows[name], flush=True)
  print(f"\n## Subspace options on GPT-2 'cpu', {args.steps} steps, T={args.update_proj_gap}\n\nmachine: {machine()}\n")
  print("| configuration | final val loss | bases computed | SVDs saved | ms/step |\n|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['val_loss']:.4f} | {r['bases_computed']} | {r['svds_saved']} | {r['ms_per_step']:.1f} |")
  (pathlib.Path(__file__).parent / "results" / "ablation.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
