"""How much optimizer memory GaLore saves, against AdamW and the other GaLores.

For three parameter trees, GPT-2 124M and ViT-B/16 (our Flax models) and a
LLaMA-style 1B (the paper's: 24 layers, hidden 2048, MLP 5461, vocabulary 32000;
shapes only):

- optimizer-state bytes of optax.adamw, galore_adamw (ranks 128/256/512, every
  proj_type), fira_adamw and apollo_adamw (the same ranks, std), apollo_mini
  (rank 1), optax.contrib.galore (rank 128/256/512) and galore-torch's
  GaLoreAdamW after its first step (real tensors, so GPT-2 and ViT only), both
  on the whole tree (GaLore on the attention and MLP matrices, the paper's rule;
  Adam on the rest) and on those matrices alone;
- XLA's memory analysis of the compiled train step (argument, temporary, peak
  bytes) for the models we can compile here, for adamw, galore_adamw,
  fira_adamw, apollo_adamw and optax.contrib.galore at rank 128 and
  apollo_mini.

Sizes come from ``jax.eval_shape``: nothing is allocated except for
galore-torch.

    python -m benchmarks.memory [--skip-torch] [--skip-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax
from benchmarks.common import machine
from models import GPT2
from models import ViT
from models import gpt2
from models import vit
from train import loop
from train import optimizers as optimizers_lib
from train import parallel
from train.objectives import OBJECTIVES

RANKS = (128, 256, 512)
LLAMA_1B = dict(layers=24, hidden=2048, mlp=5461, vocab=32000)


def abstract_params(module_fn) -> dict:
  """The pure-dict parameter tree of the module ``module_fn`` builds, as
  ShapeDtypeStructs."""
  model = nnx.eval_shape(module_fn)
  return jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
      nnx.to_pure_dict(nnx.state(model)),
  )


def llama_1b_shapes() -> dict:
  """A LLaMA-style tree (no biases, RMSNorm scales, untied head) with our paths:
  GaLore targets match."""
  h, f, c = LLAMA_1B["hidden"], LLAMA_1B["mlp"], LLAMA_1B["vocab"]
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  block = {
      "attn": {name: {"kernel": s(h, h)} for name in ("q", "k", "v", "o")},
      "mlp": {
          "gate": {"kernel": s(h, f)},
          "up": {"kernel": s(h, f)},
          "down": {"kernel": s(f, h)},
      },
      "norm1": {"scale": s(h)},
      "norm2": {"scale": s(h)},
  }
  return {
      "embed": s(c, h),
      "blocks": {str(i): block for i in range(LLAMA_1B["layers"])},
      "norm": {"scale": s(h)},
      "head": {"kernel": s(h, c)},
  }


def trees() -> dict:
  return {
      "GPT-2 124M": (
          abstract_params(lambda: GPT2(gpt2.PRESETS["124m"], rngs=nnx.Rngs(0))),
          "gpt2",
      ),
      "ViT-B/16": (
          abstract_params(
              lambda: ViT(
                  dataclasses.replace(vit.PRESETS["b16"], num_classes=1000),
                  rngs=nnx.Rngs(0),
              )
          ),
          "vit",
      ),
      "LLaMA 1B (shapes)": (llama_1b_shapes(), None),
  }


# the training CLI's rule: attention and MLP matrices
targeted = optimizers_lib.galore_targets()


def only_targets(params):
  """The attention and MLP matrices alone, as a flat dict."""
  mask = targeted(params)
  return {
      path: leaf
      for path, leaf, keep in zip(
          galore_optax.targets.leaf_paths(params),
          jax.tree.leaves(params),
          jax.tree.leaves(mask),
      )
      if keep
  }


def contrib_galore(rank: int):
  return optax.contrib.galore(
      1e-3,
      rank=rank,
      weight_dimension_numbers=optimizers_lib.contrib_dimension_numbers,
  )


def optimizers() -> dict:
  out = {"optax.adamw": optax.adamw(1e-3)}
  for rank in RANKS:
    for proj_type in galore_optax.PROJ_TYPES:
      out[f"galore_adamw r={rank} {proj_type}"] = galore_optax.galore_adamw(
          1e-3, rank=rank, proj_type=proj_type, targets=targeted
      )
  for rank in RANKS:
    out[f"fira_adamw r={rank} std"] = galore_optax.fira_adamw(
        1e-3, rank=rank, targets=targeted
    )
    out[f"apollo_adamw r={rank} std"] = galore_optax.apollo_adamw(
        1e-3, rank=rank, targets=targeted
    )
  out["apollo_mini r=1"] = galore_optax.apollo_mini(1e-3, targets=targeted)
  for rank in RANKS:
    out[f"optax.contrib.galore r={rank}"] = contrib_galore(rank)
  return out


def state_bytes(tx, params) -> int:
  return sum(
      x.size * x.dtype.itemsize
      for x in jax.tree.leaves(jax.eval_shape(tx.init, params))
  )


def torch_state_bytes(params, rank: int) -> tuple[int, int]:
  """galore-torch GaLoreAdamW's state after one step (GaLore on the targets,
  AdamW elsewhere): (bytes for the whole tree, bytes for the targeted
  matrices)."""
  import torch

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdamW
  gen = torch.Generator().manual_seed(0)
  mask = jax.tree.leaves(targeted(params))
  tensors = [
      torch.nn.Parameter(torch.zeros(x.shape)) for x in jax.tree.leaves(params)
  ]
  for t in tensors:
    t.grad = torch.randn(t.shape, generator=gen)
  galore = [t for t, m in zip(tensors, mask) if m]
  rest = [t for t, m in zip(tensors, mask) if not m]
  opt = GaLoreAdamW(
      [
          {"params": rest},
          {
              "params": galore,
              "rank": rank,
              "update_proj_gap": 200,
              "scale": 0.25,
              "proj_type": "std",
          },
      ],
      lr=1e-3,
      no_deprecation_warning=True,
  )
  opt.step()

  def nbytes(state) -> int:
    total = 0
    for value in state.values():
      # the projector object holds its basis
      value = getattr(value, "ortho_matrix", value)
      if torch.is_tensor(value):
        total += value.numel() * value.element_size()
    return total

  per_tensor = [nbytes(opt.state[t]) for t in tensors]
  return sum(per_tensor), sum(b for b, m in zip(per_tensor, mask) if m)


def compiled_step_memory(task: str, params, tx) -> dict:
  """XLA's memory analysis of our jitted train step (params and state donated)
  on abstract inputs."""
  if task == "gpt2":
    model = nnx.eval_shape(lambda: GPT2(gpt2.PRESETS["124m"], rngs=nnx.Rngs(0)))
    batch = (jax.ShapeDtypeStruct((8, 256), jnp.int32),) * 2
    loss = OBJECTIVES["causal_lm"].loss
  else:
    model = nnx.eval_shape(
        lambda: ViT(
            dataclasses.replace(vit.PRESETS["b16"], num_classes=1000),
            rngs=nnx.Rngs(0),
        )
    )
    batch = (
        jax.ShapeDtypeStruct((32, 224, 224, 3), jnp.float32),
        jax.ShapeDtypeStruct((32,), jnp.int32),
    )
    loss = OBJECTIVES["image_classification"].loss
  step, _ = loop.make_steps(nnx.graphdef(model), tx, loss)
  state = jax.eval_shape(tx.init, params)
  compiled = (
      jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
  )
  return parallel.compiled_memory(compiled)


def measure(skip_torch: bool, skip_compile: bool) -> dict:
  results = {}
  for name, (params, task) in trees().items():
    blocks = only_targets(params)
    rows = {
        opt_name: (state_bytes(tx, params), state_bytes(tx, blocks))
        for opt_name, tx in optimizers().items()
    }
    if task and not skip_torch:
      for rank in RANKS:
        rows[f"galore-torch GaLoreAdamW r={rank} std"] = torch_state_bytes(
            params, rank
        )
    results[name] = {
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "block_params": sum(x.size for x in blocks.values()),
        "state_bytes": rows,
    }
    if task and not skip_compile:
      results[name]["compiled"] = {
          k: compiled_step_memory(task, params, tx)
          for k, tx in (
              ("optax.adamw", optax.adamw(1e-3)),
              (
                  "galore_adamw r=128 std",
                  galore_optax.galore_adamw(1e-3, rank=128, targets=targeted),
              ),
              (
                  "fira_adamw r=128 std",
                  galore_optax.fira_adamw(1e-3, rank=128, targets=targeted),
              ),
              (
                  "apollo_adamw r=128 std",
                  galore_optax.apollo_adamw(1e-3, rank=128, targets=targeted),
              ),
              (
                  "apollo_mini r=1",
                  galore_optax.apollo_mini(1e-3, targets=targeted),
              ),
              ("optax.contrib.galore r=128", contrib_galore(128)),
          )
      }
      results[name]["compiled_batch"] = (
          "8 x 256 tokens" if task == "gpt2" else "32 images of 224 x 224"
      )
    print(f"{name}: done", flush=True)
  return results


def render(results: dict) -> str:
  mib = lambda b: f"{b / 2**20:,.1f}"
  lines = []
  for name, r in results.items():
    rows = r["state_bytes"]
    adamw_all, adamw_blocks = rows["optax.adamw"]
    lines += [
        (
            f"### {name}: {r['params'] / 1e6:.1f}M parameters,"
            f" {r['block_params'] / 1e6:.1f}M in attention and MLP matrices"
        ),
        "",
        (
            "| optimizer | state, whole model (MiB) | vs AdamW | state on"
            " attn+MLP matrices (MiB) | vs AdamW |"
        ),
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {mib(a)} | {a / adamw_all:.3f} | {mib(b)} |"
        f" {b / adamw_blocks:.3f} |"
        for k, (a, b) in rows.items()
    ]
    lines.append("")
    if "compiled" in r:
      # Params and state are donated, so outputs alias arguments: arguments +
      # temporaries is the step's footprint. (The CPU backend's peak_memory
      # field counts arguments only.)
      total = (
          lambda m: m["argument_size_bytes"]
          + m["temp_size_bytes"]
          + m["output_size_bytes"]
          - m["alias_size_bytes"]
      )
      base = total(r["compiled"]["optax.adamw"])
      lines += [
          (
              "XLA's memory analysis of the compiled train step"
              f" ({r['compiled_batch']}, float32), MiB:"
          ),
          "",
          "| optimizer | arguments | temporaries | footprint | vs AdamW |",
          "|---|---|---|---|---|",
      ]
      lines += [
          f"| {k} | {mib(m['argument_size_bytes'])} |"
          f" {mib(m['temp_size_bytes'])} | {mib(total(m))} |"
          f" {total(m) / base:.3f} |"
          for k, m in r["compiled"].items()
      ]
      lines.append("")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--skip-compile", action="store_true")
  p.add_argument(
      "--render",
      action="store_true",
      help="only rewrite the .md from the .json of an earlier run",
  )
  p.add_argument("--out", default="benchmarks/results/memory")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.render:
    saved = json.loads(out.with_suffix(".json").read_text())
  else:
    saved = {
        "machine": machine(),
        "results": measure(args.skip_torch, args.skip_compile),
    }
    out.with_suffix(".json").write_text(json.dumps(saved, indent=2))
  text = f"`python -m benchmarks.memory` — {saved['machine']}\n\n" + render(
      saved["results"]
  )
  out.with_suffix(".md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
