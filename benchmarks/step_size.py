"""How large each optimizer's update is on real gradients, against AdamW's.

The gradients of one AdamW training run of the main job's model (GPT-2 ``cpu``
preset, the embedded corpus, 16 x 128 tokens a step, AdamW at its tuned 5e-3)
are fed, step for step, to every optimizer below at learning rate 1, so each
update is the optimizer's direction alone. For the matrices GaLore targets
(attention and MLP) the table gives the RMS of that update over AdamW's on the
same gradient: 1 means a learning rate tuned for AdamW moves them as AdamW
would. Every untargeted leaf gets AdamW's own update in every row.

    python -m benchmarks.step_size [--steps 200] [--rank 32]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_optax
from benchmarks.common import machine
from train import optimizers as optimizers_lib
from train.config import TrainConfig
from train.objectives import OBJECTIVES

OUT = pathlib.Path("benchmarks/results/step_size")


def rows(rank: int, gap: int) -> dict:
  """name -> an optimizer at learning rate 1 (eps as galore-torch's)."""
  kw = dict(
      rank=rank, update_proj_gap=gap, targets=optimizers_lib.galore_targets()
  )
  return {
      "galore_adamw, scale 0.25 (paper)": galore_optax.galore_adamw(
          1.0, scale=0.25, **kw
      ),
      "galore_adamw, rule (rms)": galore_optax.galore_adamw(
          1.0, scale="rms", **kw
      ),
      "galore_adamw, full, rule": galore_optax.galore_adamw(
          1.0, scale="rms", proj_type="full", **kw
      ),
      "fira_adamw, scale 0.25 (paper)": galore_optax.fira_adamw(
          1.0, scale=0.25, **kw
      ),
      "fira_adamw, scale 1": galore_optax.fira_adamw(1.0, scale=1.0, **kw),
      "fira_adamw, rule (rms)": galore_optax.fira_adamw(1.0, scale="rms", **kw),
      "apollo_adamw, scale 1 (paper)": galore_optax.apollo_adamw(
          1.0, scale=1.0, **kw
      ),
      "apollo_adamw, rule (k / r)": galore_optax.apollo_adamw(
          1.0, scale="rms", **kw
      ),
      "apollo_mini, scale 128 = rule": galore_optax.apollo_mini(
          1.0, update_proj_gap=gap, targets=optimizers_lib.galore_targets()
      ),
  }


def measure(steps: int, rank: int, gap: int) -> dict:
  cfg = TrainConfig(model="gpt2", preset="cpu", steps=steps, out=None)
  task = OBJECTIVES[cfg.objective]
  data = task.load_data(cfg)
  graphdef, params = nnx.split(task.build_model(cfg, data))
  params = nnx.to_pure_dict(params)
  targeted = [
      p is not None
      for p in galore_optax.plan_leaves(
          params,
          rank=rank,
          proj_type="std",
          targets=optimizers_lib.galore_targets(),
      )
  ]

  @jax.jit
  def gradient(params, batch):
    return jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), batch)[0])(
        params
    )

  def matrix_rms(updates) -> jax.Array:
    leaves = [u for u, t in zip(jax.tree.leaves(updates), targeted) if t]
    total = sum(jnp.sum(jnp.square(u)) for u in leaves)
    return jnp.sqrt(total / sum(u.size for u in leaves))

  trainer = optax.adamw(5e-3, weight_decay=0.0)
  reference = optax.adamw(1.0, weight_decay=0.0)
  optimizers = {"optax.adamw": reference, **rows(rank, gap)}
  states = {n: tx.init(params) for n, tx in optimizers.items()}
  updates = {
      n: jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
      for n, tx in optimizers.items()
  }
  train_state = trainer.init(params)
  ratios = {n: [] for n in optimizers}
  for step in range(steps):
    grads = gradient(params, task.batch(cfg, data, step, slice(None)))
    sizes = {}
    for name in optimizers:
      u, states[name] = updates[name](grads, states[name], params)
      sizes[name] = float(matrix_rms(u))
    for name in optimizers:
      ratios[name].append(sizes[name] / sizes["optax.adamw"])
    step_update, train_state = trainer.update(grads, train_state, params)
    params = optax.apply_updates(params, step_update)
  return {n: r for n, r in ratios.items() if n != "optax.adamw"}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--update-proj-gap", type=int, default=50)
  args = p.parse_args(argv)
  ratios = measure(args.steps, args.rank, args.update_proj_gap)
  quarter = args.steps // 4
  lines = [
      f"`python -m benchmarks.step_size` — {machine()}",
      "",
      (
          f"GPT-2 `cpu` preset (d_model 128), rank {args.rank}, T ="
          f" {args.update_proj_gap}: RMS of each update of the attention and"
          " MLP matrices over AdamW's on the same gradient, over the"
          f" {args.steps} steps of an AdamW run (lr 5e-3):"
      ),
      "",
      (
          "| optimizer | step 1 | mean, steps 2 to "
          f"{quarter} | mean, steps {quarter + 1} to {args.steps} | min | max |"
      ),
      "|---|---|---|---|---|---|",
  ]
  for name, r in ratios.items():
    r = np.asarray(r)
    lines.append(
        f"| {name} | {r[0]:.3f} | {r[1:quarter].mean():.3f} |"
        f" {r[quarter:].mean():.3f} | {r.min():.3f} | {r.max():.3f} |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.with_suffix(".md").write_text(text)
  OUT.with_suffix(".json").write_text(
      json.dumps(dict(machine=machine(), args=vars(args), ratios=ratios))
  )


if __name__ == "__main__":
  main()
