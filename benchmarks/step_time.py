"""What GaLore costs in time, as ratios measured side by side in one process.

Train step: our jitted, donated GPT-2 train step (forward, backward, optimizer)
with optax.adamw and with galore_adamw (rank ``--rank``, attention and MLP
matrices), same model, same batch, steps of the two interleaved so that drift in
the machine's speed hits both alike. GaLore's refresh is timed separately (a
step forced to refresh) and amortised over T = 200: ``plain + (refresh - plain)
/ T``.

Optimizer update alone: one update on GPT-2 124M's block matrices (12 layers of
768x2304, 768x768, 768x3072, 3072x768; identical random gradients) for
optax.adamw, galore_adamw, optax.contrib.galore (both in JAX) and
torch.optim.AdamW and galore-torch's GaLoreAdamW (torch CPU), each as a plain
step and a refresh step, amortised the same way.

    python -m benchmarks.step_time [--presets cpu 124m] [--batch 8] [--seq-len
    256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_optax
from benchmarks.common import amortised as common_amortised
from benchmarks.common import gpt2_124m_shapes
from benchmarks.common import machine
from benchmarks.common import median_seconds
from benchmarks.common import train_step_times as common_train_step_times
from models import GPT2
from models import gpt2
from train import optimizers as optimizers_lib
from train.objectives import OBJECTIVES

GAP = 200


def galore(rank: int, **options):
  return galore_optax.galore_adamw(
      1e-3,
      rank=rank,
      update_proj_gap=GAP,
      targets=optimizers_lib.galore_targets(),
      **options,
  )


def train_step_times(
    preset: str, batch: int, seq_len: int, optimizers: dict, repeats: int
) -> dict:
  """:func:`benchmarks.common.train_step_times` of GPT-2 preset ``preset`` on
  one random batch, for each optimizer of ``optimizers`` (name -> tx)."""
  config = gpt2.PRESETS[preset]
  graphdef, state = nnx.split(GPT2(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  tokens = (
      np.random.default_rng(0)
      .integers(0, config.vocab_size, (batch, seq_len + 1))
      .astype(np.int32)
  )
  data = (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]))
  return common_train_step_times(
      {name: (graphdef, params, tx) for name, tx in optimizers.items()},
      OBJECTIVES["causal_lm"].loss,
      data,
      repeats,
  )


def _random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
  )


def jax_update_times(tx, params, grads, repeats) -> tuple[float, float]:
  """(plain, refresh) seconds of ``tx.update``: at step 1 and at step 0 of a
  T=200 schedule."""
  update = jax.jit(tx.update)
  first = tx.init(params)
  _, second = update(grads, first, params)
  run = lambda state: jax.block_until_ready(update(grads, state, params))
  return median_seconds(lambda: run(second), repeats), median_seconds(
      lambda: run(first), repeats
  )


def torch_update_times(params, grads, rank, repeats) -> dict:
  import torch

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdamW
  tensors = [
      torch.nn.Parameter(torch.tensor(np.asarray(p)))
      for p in jax.tree.leaves(params)
  ]
  grads_t = [torch.tensor(np.asarray(g)) for g in jax.tree.leaves(grads)]
  for p, g in zip(tensors, grads_t):
    p.grad = g
  adamw = torch.optim.AdamW(tensors, lr=1e-3)
  adamw.step()
  galore_opt = GaLoreAdamW(
      [{
          "params": tensors,
          "rank": rank,
          "update_proj_gap": GAP,
          "scale": 0.25,
          "proj_type": "std",
      }],
      lr=1e-3,
      no_deprecation_warning=True,
  )
  galore_opt.step()  # step 0: the first refresh; the step counter is now 1

  def at_step(step: int):
    def run():
      for p in tensors:
        galore_opt.state[p][
            "step"
        ] = step  # galore-torch refreshes when step % update_proj_gap == 0
      galore_opt.step()

    return run

  return {
      "torch.optim.AdamW": (median_seconds(adamw.step, repeats),) * 2,
      f"galore-torch GaLoreAdamW r={rank}": (
          median_seconds(at_step(1), repeats),
          median_seconds(at_step(GAP), repeats),
      ),
  }


def update_times(rank: int, repeats: int) -> dict:
  params, grads = (
      _random_tree(gpt2_124m_shapes(), 0),
      _random_tree(gpt2_124m_shapes(), 1),
  )
  out = {
      "optax.adamw": (
          (jax_update_times(optax.adamw(1e-3), params, grads, repeats)[0],) * 2
      ),
      f"galore_adamw r={rank}": jax_update_times(
          galore_optax.galore_adamw(1e-3, rank=rank, update_proj_gap=GAP),
          params,
          grads,
          repeats,
      ),
      # contrib keeps its moments along the smaller side: ours with its side
      f"galore_adamw r={rank}, reverse_std": jax_update_times(
          galore_optax.galore_adamw(
              1e-3, rank=rank, update_proj_gap=GAP, proj_type="reverse_std"
          ),
          params,
          grads,
          repeats,
      ),
      f"optax.contrib.galore r={rank}": jax_update_times(
          optax.contrib.galore(1e-3, rank=rank, update_proj_gap=GAP),
          params,
          grads,
          repeats,
      ),
  }
  out.update(torch_update_times(params, grads, rank, repeats))
  return out


def amortised(plain: float, refresh: float) -> float:
  return common_amortised(plain, refresh, GAP)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--presets", nargs="*", default=["cpu", "124m"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-update", action="store_true")
  p.add_argument("--out", default="benchmarks/results/step_time")
  args = p.parse_args(argv)
  command = (
      f"python -m benchmarks.step_time --presets {' '.join(args.presets)}"
      f" --batch {args.batch} --seq-len {args.seq_len} --repeats {args.repeats}"
  )
  lines = [
      f"`{command}` — {machine()}",
      "",
      (
          f"Train step, GPT-2, {args.batch} x {args.seq_len} tokens, median of"
          f" {args.repeats} interleaved steps; GaLore's refresh amortised over"
          f" T = {GAP}:"
      ),
      "",
      (
          "| preset | rank | AdamW step (s) | GaLore plain step (s) | GaLore"
          " refresh step (s) | GaLore amortised / AdamW |"
      ),
      "|---|---|---|---|---|---|",
  ]
  results = {
      "machine": machine(),
      "command": command,
      "train_step": {},
      "update": {},
  }
  for preset in args.presets:
    config = gpt2.PRESETS[preset]
    rank = config.d_model // 4 if preset != "124m" else 128
    t = train_step_times(
        preset,
        args.batch,
        args.seq_len,
        {"optax.adamw": optax.adamw(1e-3), "galore": galore(rank)},
        args.repeats,
    )
    adamw = t["optax.adamw"]["plain"]
    plain, refresh = t["galore"]["plain"], t["galore"]["refresh"]
    ratio = amortised(plain, refresh) / adamw
    lines.append(
        f"| {preset} ({config.d_model}) | {rank} | {adamw:.3f} | {plain:.3f} |"
        f" {refresh:.3f} | {ratio:.3f} ({ratio - 1:+.1%}) |"
    )
    results["train_step"][preset] = {
        "optax.adamw": adamw,
        f"galore_adamw r={rank}": plain,
        "refresh": refresh,
        "ratio": ratio,
    }
    print("\n".join(lines), flush=True)
  if not args.skip_update:
    u = update_times(128, args.repeats)
    results["update"] = u
    lines += [
        "",
        (
            "Optimizer update alone, GPT-2 124M block matrices x 12 layers,"
            f" rank 128, median of {args.repeats}:"
        ),
        "",
        (
            "| optimizer | plain step (s) | refresh step (s) | amortised, T=200"
            " (s) | vs its framework's AdamW |"
        ),
        "|---|---|---|---|---|",
    ]
    for name, (plain, refresh) in u.items():
      base = (
          u["torch.optim.AdamW"][0] if "torch" in name else u["optax.adamw"][0]
      )
      lines.append(
          f"| {name} | {plain:.4f} | {refresh:.3f} |"
          f" {amortised(plain, refresh):.4f} |"
          f" {amortised(plain, refresh) / base:.2f}x |"
      )
  text = "\n".join(lines)
  print(text)
  out = pathlib.Path(args.out)
  out.with_suffix(".md").write_text(text + "\n")
  out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
