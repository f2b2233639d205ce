"""GPT-2 on the main job's budget (``python -m train gpt2``: the ``cpu`` preset,
800 steps of 16 x 128 tokens of the standard library's source) with byte
tokens and with a byte-level BPE of 4096 tokens trained on the training split:
bits per byte of the validation text, for AdamW and galore_adamw at their
default learning rates, seed 0. A BPE window of 128 tokens holds more text
than a byte window, so the same budget of steps and tokens sees more of it.

    python -m benchmarks.tokenizer [--steps 800] [--bpe 4096]
"""

from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks.common import machine
from train import loop
from train.config import TrainConfig

OPTIMIZERS = ("adamw", "galore_adamw")
OUT = pathlib.Path("benchmarks/results/tokenizer")


def run(tokenizer: str, optimizer: str, steps: int, runs: str) -> dict:
  out = pathlib.Path(runs) / f"{tokenizer.replace(':', '')}-{optimizer}"
  cfg = TrainConfig(
      model="gpt2",
      optimizer=optimizer,
      tokenizer=tokenizer,
      steps=steps,
      out=str(out),
      overwrite=True,
      checkpoint_every=10**9,
  )
  s = loop.train(cfg, verbose=False).summary
  keys = ("val_loss", "val_bpb", "param_bytes", "optimizer_state_bytes")
  return {k: s[k] for k in keys}


def render(results: dict, steps: int) -> str:
  lines = [
      f"`python -m benchmarks.tokenizer --steps {steps}` — {machine()}",
      "",
      (
          f"GPT-2 `cpu` preset, {steps} steps of 16 x 128 tokens, seed 0, each"
          " optimizer at its default learning rate; bits per byte of the"
          " validation text (lower is better):"
      ),
      "",
      (
          "| tokenizer | optimizer | val loss (nats/token) | bits per byte |"
          " bytes per token |"
      ),
      "|---|---|---|---|---|",
  ]
  for tokenizer, rows in results.items():
    for optimizer, r in rows.items():
      per_token = r["val_loss"] / 0.6931471805599453 / r["val_bpb"]
      lines.append(
          f"| {tokenizer} | {optimizer} | {r['val_loss']:.4f} |"
          f" {r['val_bpb']:.4f} | {per_token:.2f} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--bpe", type=int, default=4096)
  p.add_argument("--runs", default="runs/benchmarks/tokenizer")
  args = p.parse_args(argv)
  results = {}
  for tokenizer in ("bytes", f"bpe:{args.bpe}"):
    for optimizer in OPTIMIZERS:
      results.setdefault(tokenizer, {})[optimizer] = run(
          tokenizer, optimizer, args.steps, args.runs
      )
      print(tokenizer, optimizer, results[tokenizer][optimizer], flush=True)
  table = render(results, args.steps)
  print(table)
  OUT.with_suffix(".md").write_text(table)
  OUT.with_suffix(".json").write_text(
      json.dumps({"machine": machine(), "results": results}, indent=1)
  )


if __name__ == "__main__":
  main()
