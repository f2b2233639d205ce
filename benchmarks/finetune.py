"""Fine-tuning as the paper's Table 4 compares it: full fine-tuning with AdamW,
galore_adamw at ranks 4 and 8, LoRA at ranks 4 and 8 (flax's nnx.LoRA).

Memory, at BERT-base and RoBERTa-base size with a 2-way classification head
(shapes only, nothing allocated): parameters, trainable parameters, and the
optimizer's state, each configuration built by the training CLI's own code
(``train.loop.build_optimizer``, ``models.lora.add_adapters``).

    python -m benchmarks.finetune [--out benchmarks/results/finetune-memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
from flax import nnx

from benchmarks.common import machine
from benchmarks.memory import state_bytes
from models import bert
from models import lora
from train import loop
from train.config import TrainConfig

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


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure() -> dict:
  out = {}
  for size, model_config in SIZES.items():
    config = dataclasses.replace(model_config, num_labels=2)
    for name, options in CONFIGS.items():
      cfg = TrainConfig(
          task="bert", preset="base", finetune="stdlib:next", **options
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
      heads = ("pool/", "classifier/", "mlm_")
      labels = (
          jax.tree.leaves(loop.lora_labels(params, heads))
          if cfg.lora_rank
          else ["train"] * len(jax.tree.leaves(params))
      )
      trainable = sum(
          x.size
          for x, label in zip(jax.tree.leaves(params), labels)
          if label == "train"
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
      "Shapes only (jax.eval_shape), float32, a 2-way classification head;"
      " GaLore on the attention and MLP matrices (AdamW on the rest), LoRA's"
      " adapters on the same matrices with the base frozen:",
  ]
  for size, rows in results.items():
    full = rows["full fine-tuning, adamw"]["optimizer_state_bytes"]
    lines += [
        "",
        f"**{size}**",
        "",
        "| configuration | parameters | trainable | optimizer state (MiB) |"
        " vs full fine-tuning | parameters + state (MiB) |",
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
  args = p.parse_args(argv)
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
