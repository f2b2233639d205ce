"""The cost and quality of one subspace refresh, side by side.

Time: one optimizer step that refreshes every basis (update_proj_gap=1), on
GPT-2 124M's block matrices (12 layers of 768x2304, 768x768, 768x3072, 3072x768;
rank 128), for each ``svd`` option of galore_optax, for optax.contrib.galore and
for galore-torch's GaLoreAdamW. Quality: the fraction of the exact top-r
gradient energy ``||P_r G||^2 / sum_{i<=r} s_i^2`` each basis captures, on real
gradients of our GPT-2 (the 'cpu' preset after 200 training steps, rank 32, and
the '124m' preset at initialisation, rank 128).

    python -m benchmarks.refresh [--layers 12] [--repeats 3]
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

import galore_optax
from benchmarks.common import gpt2_124m_shapes
from benchmarks.common import machine
from benchmarks.common import median_seconds
from benchmarks.common import set_next_refresh
from galore_optax import subspace

RANK = 128
METHODS = {
    "exact": "exact",
    "randomized": "randomized",
    "randomized q=0": galore_optax.RandomizedSVD(power_iters=0),
    "gram": "gram",
}


def _random_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
  )


def time_jax(tx, params, grads, repeats, advance=False):
  """Median time of ``tx.update`` at step 0 (a refresh), or at step 1 with
  ``advance``."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  if advance:
    _, state = update(grads, state, params)
    # step 1 of a transform refreshed at step 0 with update_proj_gap 1 would
    # refresh again; push every leaf's next refresh out of reach to time the
    # plain step.
    state = set_next_refresh(state, lambda s: 2**30)
  return median_seconds(
      lambda: jax.block_until_ready(update(grads, state, params)), repeats
  )


def time_torch(params, grads, repeats, device="cpu"):
  import torch

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdamW
  tensors = [
      torch.nn.Parameter(torch.tensor(np.asarray(p), device=device))
      for p in jax.tree.leaves(params)
  ]
  grads_t = [
      torch.tensor(np.asarray(g), device=device) for g in jax.tree.leaves(grads)
  ]
  sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
  opt = GaLoreAdamW(
      [{
          "params": tensors,
          "rank": RANK,
          "update_proj_gap": 1,
          "scale": 0.25,
          "proj_type": "std",
      }],
      lr=1e-3,
      no_deprecation_warning=True,
  )

  def step():
    for p, g in zip(tensors, grads_t):
      p.grad = g
    opt.step()
    sync()

  return median_seconds(step, repeats)


def refresh_times(
    layers: int, repeats: int, torch_device: str = "cpu"
) -> dict[str, float]:
  params = _random_tree(gpt2_124m_shapes(layers), 0)
  grads = _random_tree(gpt2_124m_shapes(layers), 1)
  out = {}
  for name, svd in METHODS.items():
    out[f"galore_optax svd={name}"] = time_jax(
        galore_optax.galore_adamw(1e-3, rank=RANK, update_proj_gap=1, svd=svd),
        params,
        grads,
        repeats,
    )
  out["galore_optax, a step without refresh"] = time_jax(
      galore_optax.galore_adamw(1e-3, rank=RANK, update_proj_gap=1),
      params,
      grads,
      repeats,
      advance=True,
  )
  out["optax.adamw (no projection)"] = time_jax(
      optax.adamw(1e-3), params, grads, repeats
  )
  out["optax.contrib.galore"] = time_jax(
      optax.contrib.galore(1e-3, rank=RANK, update_proj_gap=1),
      params,
      grads,
      repeats,
  )
  out[f"galore-torch GaLoreAdamW (torch {torch_device})"] = time_torch(
      params, grads, repeats, torch_device
  )
  return {k: v for k, v in out.items() if v is not None}


def real_gradients():
  """Gradients of our GPT-2: the 'cpu' preset after 200 steps of galore_adamw,
  and '124m' at init."""
  from flax import nnx

  from train import data as data_lib
  from train.config import TrainConfig
  from train.loop import train
  from train.objectives import OBJECTIVES

  lm = OBJECTIVES["causal_lm"]

  out = {}
  cfg = TrainConfig(
      model="gpt2",
      preset="cpu",
      steps=200,
      out="/tmp/galore-bench-refresh",
      overwrite=True,
      eval_every=200,
      log_every=200,
  )
  result = train(cfg, verbose=False)
  text = data_lib.load_text("stdlib", 2 * 2**20)
  batch = data_lib.text_batch(text.train, 10_000, 16, 128, seed=1)
  graphdef, _ = nnx.split(lm.build_model(cfg, text))
  out[("cpu preset, step 200", 32)] = jax.grad(
      lambda p: lm.loss(nnx.merge(graphdef, p), batch)[0]
  )(result.params)
  big = TrainConfig(model="gpt2", preset="124m")
  model = lm.build_model(big, text)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  small_batch = data_lib.text_batch(text.train, 0, 4, 128, seed=1)
  out[("124m preset, init", 128)] = jax.grad(
      lambda p: lm.loss(nnx.merge(graphdef, p), small_batch)[0]
  )(params)
  return out


def energy_captured(g, basis, side, top_energy):
  """``||P G||^2`` over the exact top-r energy ``top_energy``."""
  b = np.asarray(basis, np.float64)
  projected = (
      b.T @ np.asarray(g, np.float64)
      if side == "left"
      else np.asarray(g, np.float64) @ b.T
  )
  return float((projected**2).sum() / top_energy)


def quality() -> dict[str, dict[str, float]]:
  """Worst and mean captured energy over the targeted matrices, per source and
  method."""
  table = {}
  for (source, rank), grads in real_gradients().items():
    plans = galore_optax.plan_leaves(
        grads,
        rank=rank,
        proj_type="std",
        targets=galore_optax.match_paths(r"/(attn|mlp)/\w+/kernel$"),
    )
    leaves = jax.tree.leaves(grads)
    top = {
        i: float(
            (
                np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)[
                    : plan.rank
                ]
                ** 2
            ).sum()
        )
        for i, (g, plan) in enumerate(zip(leaves, plans))
        if plan is not None
    }
    for method, svd in METHODS.items():
      scores = []
      for index, (g, plan) in enumerate(zip(leaves, plans)):
        if plan is None:
          continue
        options = (
            svd
            if isinstance(svd, galore_optax.RandomizedSVD)
            else galore_optax.RandomizedSVD()
        )
        left, right = subspace.compute_basis(
            g,
            plan.rank,
            plan.use_left,
            plan.use_right,
            method="randomized"
            if isinstance(svd, galore_optax.RandomizedSVD)
            else svd,
            key=jax.random.fold_in(jax.random.key(0), index),
            oversample=options.oversample,
            power_iters=options.power_iters,
        )
        scores.append(
            energy_captured(
                g,
                left if plan.use_left else right,
                "left" if plan.use_left else "right",
                top[index],
            )
        )
      table[f"{source}, rank {rank}: {method}"] = {
          "min": min(scores),
          "mean": float(np.mean(scores)),
      }
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-quality", action="store_true")
  parser.add_argument(
      "--torch-device",
      default="cpu",
      help="where galore-torch runs: cpu or cuda",
  )
  args = parser.parse_args()
  times = refresh_times(args.layers, args.repeats, args.torch_device)
  exact = times["galore_optax svd=exact"]
  print(
      f"## One refresh step, GPT-2 124M block matrices x {args.layers} layers,"
      f" rank {RANK}\n"
  )
  print(f"machine: {machine()}\n")
  print(
      "| optimizer | seconds per refresh step | speed-up of svd=randomized"
      " |\n|---|---|---|"
  )
  for name, t in times.items():
    print(
        f"| {name} | {t:.3f} |"
        f" {t / times['galore_optax svd=randomized']:.2f}x |"
    )
  results = {
      "machine": machine(),
      "layers": args.layers,
      "times": times,
      "exact": exact,
  }
  if not args.skip_quality:
    q = quality()
    print(
        "\n## Energy of the exact top-r subspace captured (real GPT-2"
        " gradients)\n"
    )
    print("| gradients, method | worst matrix | mean |\n|---|---|---|")
    for name, v in q.items():
      print(f"| {name} | {v['min']:.4%} | {v['mean']:.4%} |")
    results["quality"] = q
  out = (
      pathlib.Path(__file__).parent
      / "results"
      / f"refresh-{jax.devices()[0].platform}.json"
  )
  out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
