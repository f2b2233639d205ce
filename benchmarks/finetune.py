"""Fine-tuning as the paper's Table 4 compares it: full fine-tuning with AdamW,
galore_adamw at ranks 4 and 8 (the paper's scales, 4 and 2), LoRA at ranks 4
and 8 (flax's nnx.LoRA).

Memory, at BERT-base and RoBERTa-base size with a 2-way classification head
(shapes only, nothing allocated): parameters, trainable parameters, and the
optimizer's state, each configuration built by the training CLI's own code
(``train.loop.build_optimizer``, ``models.lora.add_adapters``).

Quality (``--quality``), on the offline tasks: one encoder (the ``cpu`` preset)
is pretrained by masked LM with AdamW, then each configuration fine-tunes it on
each task, tuned as ``benchmarks.quality`` tunes (a sweep of at least 4
learning rates spanning 10x at seed 0, extended while the best is at an end,
then 3 seeds at the best), scored by the task's metric: accuracy for
``stdlib:next``, Matthews correlation for ``stdlib:order``. Finished runs go
to a ledger committed beside the tables and are reused, so the benchmark
completes over several sittings (``--max-minutes``).

Time per step (``--step-time``), at BERT-base size on ``stdlib:next``
examples: the training CLI's jitted, donated train step of each configuration,
steps interleaved; GaLore's refresh amortised over the runs' interval.

    python -m benchmarks.finetune [--quality [--max-minutes M] [--report]]
    python -m benchmarks.finetune --step-time [--batch 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
from flax import nnx

from benchmarks import quality as quality_lib
from benchmarks.common import amortised
from benchmarks.common import machine
from benchmarks.common import train_step_times
from benchmarks.memory import state_bytes
from models import bert
from models import lora
from train import loop
from train.config import TrainConfig
from train.objectives import OBJECTIVES

SIZES = {
    "BERT-base": bert.PRESETS["base"],
    "RoBERTa-base": dataclasses.replace(
        bert.PRESETS["base"],
        vocab_size=50265,
        max_len=512,
        type_vocab_size=1,
        padding_position=1,
    ),
}
CONFIGS = {
    "full fine-tuning, adamw": dict(optimizer="adamw"),
    "galore_adamw r=4": dict(optimizer="galore_adamw", rank=4),
    "galore_adamw r=8": dict(optimizer="galore_adamw", rank=8),
    "LoRA r=4, adamw": dict(optimizer="adamw", lora_rank=4),
    "LoRA r=8, adamw": dict(optimizer="adamw", lora_rank=8),
}


GAP = 100  # GaLore's T in every fine-tuning run
# the fine-tuning runs: name -> (TrainConfig overrides, first lr of the sweep)
ROWS = {
    "full fine-tuning, adamw": (dict(optimizer="adamw"), 1e-4),
    "galore_adamw r=4": (
        dict(optimizer="galore_adamw", rank=4, scale=4.0, update_proj_gap=GAP),
        1e-4,
    ),
    "galore_adamw r=8": (
        dict(optimizer="galore_adamw", rank=8, scale=2.0, update_proj_gap=GAP),
        1e-4,
    ),
    "LoRA r=4, adamw": (dict(optimizer="adamw", lora_rank=4), 1e-4),
    "LoRA r=8, adamw": (dict(optimizer="adamw", lora_rank=8), 1e-4),
    # the step-size rule (issue 27): sqrt(128 / r) on the cpu encoder's
    # matrices, 5.66 at r=4 and 4 at r=8
    "galore_adamw r=4, rule": (
        dict(
            optimizer="galore_adamw", rank=4, scale="rms", update_proj_gap=GAP
        ),
        1e-4,
    ),
    "galore_adamw r=8, rule": (
        dict(
            optimizer="galore_adamw", rank=8, scale="rms", update_proj_gap=GAP
        ),
        1e-4,
    ),
}
TASKS = {"stdlib:next": "val_accuracy", "stdlib:order": "val_matthews"}
PRETRAIN = dict(model="bert", preset="cpu", optimizer="adamw", steps=1600)
FINETUNE = dict(seq_len=64, eval_every=100)
STEPS = 400
LEDGER = pathlib.Path("benchmarks/results/finetune-runs.jsonl")


def pretrained(runs: pathlib.Path) -> str:
  """The encoder every row fine-tunes: trained here once (seed 0), reused."""
  out = runs / "pretrained"
  summary = out / "summary.json"
  if not (summary.exists() and json.loads(summary.read_text())["finished"]):
    loop.train(TrainConfig(**PRETRAIN, out=str(out), overwrite=True))
  return str(out)


def quality(args) -> dict:
  """Every row tuned on every task: ``{task: {row: quality.tune's dict}}``."""
  runs = pathlib.Path(args.runs)
  init = str(runs / "pretrained") if args.report else pretrained(runs)
  results = {}
  deadline = time.time() + 60 * args.max_minutes
  for task, score in TASKS.items():
    runner = quality_lib.Runner(
        runs / task.replace(":", "-"),
        STEPS,
        ledger=LEDGER,
        deadline=deadline,
        dry=args.report,
        rows=ROWS,
        base=dict(model="bert", finetune=task, init=init, **FINETUNE),
        score=score,
        higher_is_better=True,
        # the encoder is PRETRAIN's, wherever --runs put it: a ledger run
        # made on it in another scratch directory is the same run
        scratch=("out", "init"),
    )
    results[task] = quality_lib.tune_rows(runner, ROWS)
  return results


def render_quality(results: dict) -> str:
  lines = [
      "`python -m benchmarks.finetune --quality` — " + machine(),
      "",
      (
          f"`{PRETRAIN['preset']}` encoder pretrained {PRETRAIN['steps']}"
          f" steps by masked LM (AdamW); fine-tuning {STEPS} steps of"
          f" {FINETUNE.get('batch_size', 16)} x {FINETUNE['seq_len']}"
          " tokens per run; each row at its best learning rate of a seed-0"
          " sweep, then seeds 0-2:"
      ),
  ]
  for task, rows in results.items():
    score = TASKS[task]
    metric = lambda e, score=score: e["metrics"][score]
    full = rows["full fine-tuning, adamw"]
    full_mean = (
        statistics.mean(map(metric, full["seeds"]))
        if len(full.get("seeds", ())) == len(quality_lib.SEEDS)
        else None
    )
    lines += [
        "",
        f"**{task}** ({score[4:]})",
        "",
        (
            f"| configuration | best lr | {score[4:]}, mean ± std of 3 seeds |"
            " vs full fine-tuning (points) | sweep at seed 0 |"
        ),
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
      values = [metric(e) for e in r.get("seeds", ())]
      done = len(values) == len(quality_lib.SEEDS)
      cell = (
          f"{100 * statistics.mean(values):.1f} ±"
          f" {100 * statistics.stdev(values):.1f}"
          if done
          else "pending"
      )
      gap = (
          f"{100 * (statistics.mean(values) - full_mean):+.1f}"
          if done and full_mean is not None
          else "pending"
      )
      sweep = ", ".join(
          f"{lr:g}: {100 * metric(e):.1f}"
          for lr, e in sorted(r["sweep"].items())
      )
      best = f"{r['best']:g}" if "best" in r else "pending"
      lines.append(f"| {name} | {best} | {cell} | {gap} | {sweep} |")
  return "\n".join(lines) + "\n"


def step_times(batch_size: int, seq_len: int, repeats: int) -> dict:
  """Median seconds per train step of each of :data:`CONFIGS` at BERT-base
  size: ``{name: {"plain", "refresh", "amortised"}}``."""
  setups, loss = {}, None
  for name, options in CONFIGS.items():
    cfg = TrainConfig(
        model="bert", preset="base", finetune="stdlib:next", **options
    )
    objective = OBJECTIVES[cfg.objective]
    if loss is None:
      examples = objective.load_data(cfg)
      batch = objective.batch(
          dataclasses.replace(cfg, batch_size=batch_size, seq_len=seq_len),
          examples,
          0,
          slice(None),
      )
      loss = objective.loss
    model = bert.Bert(
        dataclasses.replace(SIZES["BERT-base"], num_labels=2),
        rngs=nnx.Rngs(0),
    )
    if cfg.lora_rank:
      lora.add_adapters(model, cfg.lora_rank, nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    setups[name] = (graphdef, params, loop.build_optimizer(cfg, params)[0])
  times = train_step_times(setups, loss, batch, repeats)
  for t in times.values():
    t["amortised"] = amortised(t["plain"], t["refresh"], GAP)
  return times


def render_step_times(times: dict, batch_size: int, seq_len: int) -> str:
  full = times["full fine-tuning, adamw"]["amortised"]
  lines = [
      (
          f"`python -m benchmarks.finetune --step-time --batch {batch_size}"
          f" --seq-len {seq_len}` — {machine()}"
      ),
      "",
      (
          f"BERT-base train step, {batch_size} x {seq_len} tokens of"
          " stdlib:next pairs, median of interleaved steps; GaLore's refresh"
          f" amortised over T = {GAP}:"
      ),
      "",
      (
          "| configuration | step (s) | refresh step (s) | amortised (s) |"
          " vs full fine-tuning |"
      ),
      "|---|---|---|---|---|",
  ]
  for name, t in times.items():
    refresh = f"{t['refresh']:.3f}" if t["refresh"] else "-"
    lines.append(
        f"| {name} | {t['plain']:.3f} | {refresh} | {t['amortised']:.3f} |"
        f" {t['amortised'] / full:.3f} |"
    )
  return "\n".join(lines) + "\n"


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure() -> dict:
  out = {}
  for size, model_config in SIZES.items():
    config = dataclasses.replace(model_config, num_labels=2)
    for name, options in CONFIGS.items():
      cfg = TrainConfig(
          model="bert", preset="base", finetune="stdlib:next", **options
      )

      def build(cfg=cfg, config=config):
        model = bert.Bert(config, rngs=nnx.Rngs(0))
        if cfg.lora_rank:
          lora.add_adapters(model, cfg.lora_rank, nnx.Rngs(1))
        return model

      params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))
      params = jax.tree.map(
          lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params
      )
      tx, _ = loop.build_optimizer(cfg, params)
      trainable = (
          loop.lora_trainable(params, OBJECTIVES[cfg.objective].heads)
          if cfg.lora_rank
          else sum(x.size for x in jax.tree.leaves(params))
      )
      out.setdefault(size, {})[name] = {
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "param_bytes": _bytes(params),
          "trainable_params": int(trainable),
          "optimizer_state_bytes": state_bytes(tx, params),
      }
  return out


def render(results: dict) -> str:
  lines = [
      "`python -m benchmarks.finetune` — " + machine(),
      "",
      (
          "Shapes only (jax.eval_shape), float32, a 2-way classification head;"
          " GaLore on the attention and MLP matrices (AdamW on the rest),"
          " LoRA's adapters on the same matrices with the base frozen:"
      ),
  ]
  for size, rows in results.items():
    full = rows["full fine-tuning, adamw"]["optimizer_state_bytes"]
    lines += [
        "",
        f"**{size}**",
        "",
        (
            "| configuration | parameters | trainable | optimizer state (MiB) |"
            " vs full fine-tuning | parameters + state (MiB) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
      state = r["optimizer_state_bytes"]
      lines.append(
          f"| {name} | {r['params'] / 1e6:.2f}M |"
          f" {r['trainable_params'] / 1e6:.3f}M | {state / 2**20:,.1f} |"
          f" {state / full:.3f} |"
          f" {(state + r['param_bytes']) / 2**20:,.1f} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default="benchmarks/results/finetune-memory")
  p.add_argument("--quality", action="store_true", help="the fine-tuning runs")
  p.add_argument(
      "--report", action="store_true", help="only read finished runs"
  )
  p.add_argument("--max-minutes", type=float, default=float("inf"))
  p.add_argument("--runs", default="runs/benchmarks/finetune")
  p.add_argument(
      "--step-time", action="store_true", help="time per step at BERT-base"
  )
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  if args.step_time:
    table = render_step_times(
        step_times(args.batch, args.seq_len, args.repeats),
        args.batch,
        args.seq_len,
    )
    print(table)
    pathlib.Path("benchmarks/results/finetune-time.md").write_text(table)
    return
  if args.quality:
    table = render_quality(quality(args))
    print(table)
    pathlib.Path("benchmarks/results/finetune-quality.md").write_text(table)
    return
  results = measure()
  table = render(results)
  print(table)
  out = pathlib.Path(args.out)
  out.with_suffix(".md").write_text(table)
  out.with_suffix(".json").write_text(
      json.dumps({"machine": machine(), "results": results}, indent=2)
  )


if __name__ == "__main__":
  main()
