"""What a large tree costs before the first step: trace, lower and compile times
and XLA's temporaries of the optimizer update, against optax.adamw and
optax.contrib.galore, side by side in one process.

Trees (abstract shapes; nothing is allocated):

- ``llama-1b``: :func:`benchmarks.memory.llama_1b_shapes`, 24 unstacked layers
  of q/k/v/o (2048 x 2048) and gate/up/down (2048 x 5461, 5461 x 2048) as
  separate leaves, 168 targeted matrices, rank 256;
- ``gpt2-124m``: GPT-2 124M's whole jitted train step (model, loss, clipping,
  update; batch 8 x 256), rank 128.

    python -m benchmarks.compile [--trees llama-1b gpt2-124m] [--rows ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax
from benchmarks import memory
from benchmarks.common import machine
from models import GPT2
from models import gpt2
from train import loop
from train import parallel
from train.objectives import OBJECTIVES

RANKS = {"llama-1b": 256, "gpt2-124m": 128}


def optimizers(rank: int) -> dict:
  targets = memory.targeted
  galore = lambda **kw: galore_optax.galore_adamw(
      1e-3, rank=rank, targets=targets, **kw
  )
  return {
      "optax.adamw": optax.adamw(1e-3),
      "optax.contrib.galore": memory.contrib_galore(rank),
      "galore_adamw, svd exact": galore(svd="exact"),
      "galore_adamw, svd randomized": galore(svd="randomized"),
      "galore_adamw, svd gram": galore(svd="gram"),
      # each leaf traced apart (the randomized refresh: no group loop)
      "galore_adamw, svd exact, leaf by leaf": galore(
          svd="exact", group_leaves=False
      ),
      "galore_adamw, svd randomized, leaf by leaf": galore(
          svd="randomized", group_leaves=False
      ),
      "fira_adamw": galore_optax.fira_adamw(1e-3, rank=rank, targets=targets),
      "apollo_adamw": galore_optax.apollo_adamw(
          1e-3, rank=rank, targets=targets
      ),
  }


def _update_program(tx, params):
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update), (params, state, params)


def _train_step_program(tx, params):
  model = nnx.eval_shape(lambda: GPT2(gpt2.PRESETS["124m"], rngs=nnx.Rngs(0)))
  step, _ = loop.make_steps(
      nnx.graphdef(model), tx, OBJECTIVES["causal_lm"].loss
  )
  batch = (jax.ShapeDtypeStruct((8, 256), jnp.int32),) * 2
  state = jax.eval_shape(tx.init, params)
  return jax.jit(step, donate_argnums=(0, 1)), (params, state, batch)


# An instruction of the compiled program that yields a scalar: s32[], pred[]...
_SCALAR = re.compile(r"^\s*(?:ROOT )?%\S+ = \w+\[\] ", re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = ", re.M)


def measure(tx, program, params) -> dict:
  """Seconds to trace and lower, seconds to compile, XLA's temporaries, the
  state's leaves and the compiled program's instructions (all, and those that
  yield a scalar: bookkeeping such as refresh schedules and flags)."""
  fn, args = program(tx, params)
  start = time.perf_counter()
  lowered = fn.lower(*args)
  traced = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compiled_s = time.perf_counter() - start
  text = compiled.as_text()
  return dict(
      trace_lower_s=traced,
      compile_s=compiled_s,
      temp_bytes=parallel.compiled_memory(compiled)["temp_size_bytes"],
      hlo_chars=len(lowered.as_text()),
      state_leaves=len(jax.tree.leaves(args[1])),
      instructions=len(_INSTRUCTION.findall(text)),
      scalar_instructions=len(_SCALAR.findall(text)),
  )


def trees() -> dict:
  return {
      "llama-1b": (memory.llama_1b_shapes(), _update_program),
      "gpt2-124m": (
          memory.abstract_params(
              lambda: GPT2(gpt2.PRESETS["124m"], rngs=nnx.Rngs(0))
          ),
          _train_step_program,
      ),
  }


def render(results: dict) -> str:
  lines = []
  for tree, rows in results.items():
    base = rows["optax.adamw"]
    what = "update" if tree == "llama-1b" else "train step"
    lines += [
        "",
        f"{tree}, the {what} at rank {RANKS[tree]}:",
        "",
        (
            "| optimizer | trace + lower (s) | compile (s) | total vs adamw |"
            " XLA temporaries (MiB) | StableHLO (kchars) | state leaves |"
            " compiled instructions (scalar) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
      total = r["trace_lower_s"] + r["compile_s"]
      ratio = total / (base["trace_lower_s"] + base["compile_s"])
      # rows of earlier results files lack the census
      census = (
          f" {r['state_leaves']:,} | {r['instructions']:,}"
          f" ({r['scalar_instructions']:,}) |"
          if "state_leaves" in r
          else " - | - |"
      )
      lines.append(
          f"| {name} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} |"
          f" {ratio:.2f}x | {r['temp_bytes'] / 2**20:,.0f} |"
          f" {r['hlo_chars'] / 1000:,.0f} |"
          + census
      )
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--trees", nargs="+", default=list(RANKS), choices=RANKS)
  p.add_argument("--rows", nargs="+", default=None, metavar="ROW")
  p.add_argument("--out", default="benchmarks/results/compile")
  args = p.parse_args(argv)
  results = {}
  for tree in args.trees:
    params, program = trees()[tree]
    rows = optimizers(RANKS[tree])
    results[tree] = {}
    for name, tx in rows.items():
      if args.rows and name not in args.rows and name != "optax.adamw":
        continue
      results[tree][name] = measure(tx, program, params)
      print(tree, name, results[tree][name], flush=True)
  command = "python -m benchmarks.compile" + "".join(
      f" --{k} {' '.join(map(shlex.quote, v))}"
      for k, v in (("trees", args.trees), ("rows", args.rows))
      if v and v != p.get_default(k)
  )
  text = f"`{command}` — {machine()}\n" + render(results)
  print(text)
  out = pathlib.Path(args.out)
  out.with_suffix(".md").write_text(text + "\n")
  out.with_suffix(".json").write_text(
      json.dumps(dict(machine=machine(), results=results), indent=2)
  )


if __name__ == "__main__":
  main()
