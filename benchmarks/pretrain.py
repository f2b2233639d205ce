"""The paper's pretraining protocol on LLaMA (Zhao et al. 2024, section 5.1),
at the scale of a CPU: ``python -m train llama`` on the causal-LM objective,
sequences of 256 tokens, warm-up for 10% of the steps then cosine decay to
10%, GaLore on the attention and MLP matrices at rank d/4 with T = 200 scaled
to the run's length (200 of the paper's 10,000 steps at 60M: 2%).

Rows: AdamW, galore_adamw, fira_adamw, apollo_adamw, adamw8bit and the LoRA
baseline (rank d/4 adapters on the same matrices over frozen random weights,
with the embeddings, norms and output trained, ``--lora-train-rest``, as the
LoRA pretraining rows of ReLoRA and of the paper are), each tuned as
``benchmarks.quality`` tunes, but from 3 learning rates instead of 4 (a CPU
run here takes 5 minutes): 1e-3, 2e-3 and 5e-3 at seed 0, around AdamW's rate,
which the step-size rule makes every low-rank row's too; extended while the
best is at an end; then seeds 0-2 at the best. Scored by validation
perplexity. The table gives each row's perplexity as a ratio to
AdamW's beside the paper's ratios. Finished runs go to a ledger and are
reused, so the benchmark completes over several sittings.

The default is the ``9m`` preset (the GaLore repository's smallest config) on
the embedded standard-library corpus with a byte-level BPE trained on it;
``--data hf:allenai/c4:en --tokenizer hf:t5-base --preset 60m --steps 10000
--batch-size 512`` is the paper's own run, where C4 and the hub are reachable.

    python -m benchmarks.pretrain [--rows NAME ...] [--max-minutes M] [--report]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics

from benchmarks import quality as quality_lib
from benchmarks.common import machine
from models.registry import MODELS
from train.config import TrainConfig
from train.config import default_rank

# The paper's validation perplexity ratios to full-rank AdamW (its Table 2 and
# the follow-ups' tables under the same protocol): at 60M and at 130M.
PAPER = {
    "galore_adamw": (1.024, 1.011),
    "fira_adamw": (0.912, 0.906),
    "apollo_adamw": (0.926, 0.915),
    "lora": (34.99 / 34.06, 33.92 / 25.08),
}


def rows(rank: int, gap: int) -> dict:
  """name -> (TrainConfig overrides, the sweep's first learning rate)."""
  low_rank = lambda name: dict(optimizer=name, rank=rank, update_proj_gap=gap)
  return {
      "adamw": (dict(optimizer="adamw"), 1e-3),
      "galore_adamw": (low_rank("galore_adamw"), 1e-3),
      "fira_adamw": (low_rank("fira_adamw"), 1e-3),
      "apollo_adamw": (low_rank("apollo_adamw"), 1e-3),
      "adamw8bit": (dict(optimizer="adamw8bit"), 1e-3),
      "lora": (
          dict(optimizer="adamw", lora_rank=rank, lora_train_rest=True),
          1e-3,
      ),
  }


def gap(steps: int) -> int:
  """The paper's T = 200 of 10,000 steps, scaled to ``steps``."""
  return max(1, round(200 * steps / 10_000))


def base(args) -> dict:
  return dict(
      model="llama",
      preset=args.preset,
      data=args.data,
      tokenizer=args.tokenizer,
      seq_len=256,
      batch_size=args.batch_size,
      eval_every=max(args.steps // 8, 1),
  )


def render(results: dict, cfg: TrainConfig, rank: int) -> str:
  ppl = lambda e: e["metrics"]["val_ppl"]
  lines = [
      "`python -m benchmarks.pretrain` — " + machine(),
      "",
      (
          f"LLaMA `{cfg.preset}` on {cfg.data} ({cfg.tokenizer}), {cfg.steps}"
          f" steps of {cfg.batch_size} x {cfg.seq_len} tokens, T ="
          f" {gap(cfg.steps)}, rank {rank}; each row at the"
          " best learning rate of a seed-0 sweep, then seeds 0-2. Validation"
          " perplexity; the ratio to AdamW's beside the paper's (60M, 130M):"
      ),
      "",
      (
          "| row | best lr | perplexity, mean ± std | seeds | ratio to AdamW |"
          " paper's ratio (60M, 130M) | sweep at seed 0 |"
      ),
      "|---|---|---|---|---|---|---|",
  ]
  done = lambda r: len(r.get("seeds", ())) == len(quality_lib.SEEDS)
  base_ppl = (
      statistics.mean(map(ppl, results["adamw"]["seeds"]))
      if done(results["adamw"])
      else None
  )
  for name, r in results.items():
    seeds = [ppl(e) for e in r.get("seeds", ())]
    mean = statistics.mean(seeds) if done(r) else None
    cell = f"{mean:.2f} ± {statistics.stdev(seeds):.2f}" if mean else "pending"
    ratio = f"{mean / base_ppl:.3f}" if mean and base_ppl else "-"
    paper = PAPER.get(name)
    paper = f"{paper[0]:.3f}, {paper[1]:.3f}" if paper else "-"
    sweep = ", ".join(
        f"{lr:g}: {ppl(e):.2f}" for lr, e in sorted(r["sweep"].items())
    )
    best = f"{r['best']:g}" if "best" in r else "pending"
    listed = ", ".join(f"{v:.2f}" for v in seeds)
    lines.append(
        f"| {name} | {best} | {cell} | {listed} | {ratio} | {paper} | {sweep} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rows", nargs="+", default=None, metavar="ROW")
  p.add_argument("--preset", default="9m")
  p.add_argument("--data", default="stdlib")
  p.add_argument("--tokenizer", default="bpe:4096")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--sweep-points", type=int, default=3)
  p.add_argument("--max-minutes", type=float, default=math.inf)
  p.add_argument(
      "--report", action="store_true", help="only read finished runs"
  )
  p.add_argument("--runs", default="runs/benchmarks/pretrain")
  p.add_argument(
      "--ledger",
      type=pathlib.Path,
      default=pathlib.Path("benchmarks/results/pretrain-runs.jsonl"),
  )
  p.add_argument("--out", default="benchmarks/results/pretrain.md")
  args = p.parse_args(argv)
  rank = default_rank(MODELS["llama"].presets[args.preset].d_model)
  table_rows = rows(rank, gap(args.steps))
  unknown = set(args.rows or ()) - set(table_rows)
  if unknown:
    p.error(f"unknown rows {sorted(unknown)}; choose from {list(table_rows)}")
  runner = quality_lib.Runner.for_sitting(
      args,
      args.steps,
      ledger=args.ledger,
      rows=table_rows,
      base=base(args),
      score="val_loss",
      sweep_points=args.sweep_points,
  )
  results = quality_lib.tune_rows(runner, args.rows or list(table_rows))
  table = render(results, runner.config("adamw", 1e-3, 0), rank)
  print(table)
  pathlib.Path(args.out).write_text(table)


if __name__ == "__main__":
  main()
