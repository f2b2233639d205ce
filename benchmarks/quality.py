"""What GaLore costs in loss: GPT-2 on the embedded corpus, against AdamW and
optax.contrib.galore.

The main job's model and budget (GPT-2 ``cpu`` preset, d_model 128; 800 steps of
16 x 128 tokens of the standard-library corpus; warmup 10% then cosine to 10%)
for every optimizer, with the same seeds (initialisation and batch order):

- optax.adamw at its default learning rate 3e-3;
- galore_adamw at rank d/4 = 32 and d/2 = 64 (the paper's recipe: lr 1e-2, scale
  0.25, T 50 here for the short run; attention and MLP matrices);
- optax.contrib.galore at rank 32 with the same recipe and targets.

Final validation loss over ``--seeds`` (mean and spread), then a rank sweep of
galore_adamw at the first seed. Plots go to benchmarks/results/.

    python -m benchmarks.quality [--steps 800] [--seeds 0 1 2] [--ranks 8 16 32
    64 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

from benchmarks.common import machine
from train import report
from train.config import TrainConfig
from train.loop import train

CONFIGS = {  # name -> TrainConfig overrides
    "optax.adamw": dict(optimizer="adamw"),
    "galore_adamw r=32 (d/4)": dict(optimizer="galore_adamw", rank=32),
    "galore_adamw r=64 (d/2)": dict(optimizer="galore_adamw", rank=64),
    "optax.contrib.galore r=32": dict(optimizer="contrib_galore", rank=32),
}


def run(
    name: str, seed: int, steps: int, out: pathlib.Path, **overrides
) -> tuple[dict, list]:
  """Trains one configuration, or reuses the finished run already in its
  directory."""
  cfg = TrainConfig(
      task="gpt2",
      steps=steps,
      seed=seed,
      out=str(out / f"{name}-seed{seed}".replace(" ", "_")),
      overwrite=True,
      checkpoint_every=10**9,
      **overrides,
  )
  run_dir = pathlib.Path(cfg.out)
  done = (run_dir / "summary.json").exists() and json.loads(
      (run_dir / "config.json").read_text()
  ) == json.loads(json.dumps(dataclasses.asdict(cfg)))
  summary = (
      json.loads((run_dir / "summary.json").read_text())
      if done
      else train(cfg, verbose=False).summary
  )
  history = [
      json.loads(line)
      for line in (run_dir / "metrics.jsonl").read_text().splitlines()
  ]
  print(
      f"{name} seed {seed}: val {summary['val_loss']:.4f}"
      + (" (reused)" if done else ""),
      flush=True,
  )
  return summary, history


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
  p.add_argument(
      "--runs",
      default="runs/benchmarks/quality",
      help="where the runs' outputs go; finished runs found there are reused",
  )
  p.add_argument("--out", default="benchmarks/results/quality")
  args = p.parse_args(argv)
  runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  finals, curves = {}, {}
  for name, overrides in CONFIGS.items():
    for seed in args.seeds:
      summary, history = run(name, seed, args.steps, runs, **overrides)
      finals.setdefault(name, []).append(summary["val_loss"])
      if seed == args.seeds[0]:
        curves[name] = history
  sweep = {}
  for rank in args.ranks:
    known = {32: "galore_adamw r=32 (d/4)", 64: "galore_adamw r=64 (d/2)"}.get(
        rank
    )
    sweep[rank] = (
        finals[known][0]
        if known
        else run(
            f"galore_adamw r={rank}",
            args.seeds[0],
            args.steps,
            runs,
            optimizer="galore_adamw",
            rank=rank,
        )[0]["val_loss"]
    )

  adamw = statistics.mean(finals["optax.adamw"])
  stats = {
      k: (
          statistics.mean(v),
          statistics.stdev(v) if len(v) > 1 else 0.0,
          min(v),
          max(v),
      )
      for k, v in finals.items()
  }
  command = (
      f"python -m benchmarks.quality --steps {args.steps} --seeds"
      f" {' '.join(map(str, args.seeds))} --ranks"
      f" {' '.join(map(str, args.ranks))}"
  )
  lines = [
      f"`{command}` — {machine()}",
      "",
      (
          f"GPT-2 `cpu` preset (d_model 128), {args.steps} steps of 16 x 128"
          f" tokens, final validation loss over seeds {args.seeds}:"
      ),
      "",
      "| optimizer | mean | std | min | max | vs AdamW |",
      "|---|---|---|---|---|---|",
  ]
  lines += [
      f"| {k} | {m:.4f} | {s:.4f} | {lo:.4f} | {hi:.4f} |"
      f" {m / adamw - 1:+.2%} |"
      for k, (m, s, lo, hi) in stats.items()
  ]
  lines += [
      "",
      (
          f"Rank sweep, galore_adamw, seed {args.seeds[0]} (AdamW at that seed:"
          f" {finals['optax.adamw'][0]:.4f}):"
      ),
      "",
      "| rank | final val loss | vs AdamW |",
      "|---|---|---|",
  ]
  lines += [
      f"| {r} | {v:.4f} | {v / finals['optax.adamw'][0] - 1:+.2%} |"
      for r, v in sweep.items()
  ]
  text = "\n".join(lines)
  print(text)
  out.with_suffix(".md").write_text(text + "\n")
  out.with_suffix(".json").write_text(
      json.dumps(
          {
              "machine": machine(),
              "command": command,
              "finals": finals,
              "sweep": sweep,
          },
          indent=2,
      )
  )
  report.plot_losses(
      curves,
      out.parent / "quality-curves.png",
      f"GPT-2 cpu preset, seed {args.seeds[0]}",
  )
  _plot_sweep(sweep, finals["optax.adamw"][0], out.parent / "quality-ranks.png")


def _plot_sweep(sweep: dict, adamw: float, path: pathlib.Path) -> None:
  # train.report has chosen the file-only backend
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(list(sweep), list(sweep.values()), "o-", label="galore_adamw")
  ax.axhline(adamw, color="gray", linestyle="--", label="optax.adamw")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("rank (d_model = 128)")
  ax.set_ylabel("final validation loss (nats)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
