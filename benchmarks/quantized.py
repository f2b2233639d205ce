"""Quantized optimizer state: what 8-bit moments and INT8 / INT4 bases cost in
loss and time, and save in memory.

``quality``: the main job (GPT-2 ``cpu`` preset, 800 steps, the recipe of
benchmarks/quality.py) over ``--seeds`` for galore_adamw with float32 state,
with 8-bit moments, with 8-bit moments and an INT4 projector, and for
optax.adamw against adamw_8bit; final validation loss, mean and spread.

``time``: the jitted, donated GPT-2 train step of each of those optimizers,
interleaved in one process (benchmarks/step_time.py's method), on the main
job's model and batch and on GPT-2 124M (8 x 256 tokens); GaLore's refresh
amortised over T = 200; ratios against the float32 baseline.

``memory``: optimizer-state bytes without allocating (``memory_report``) for
GPT-2 124M, ViT-B/16 and a LLaMA-1B-shaped tree at rank 128 (LLaMA: 512), as
fractions of float32 AdamW's, beside galore-torch's ``GaLoreAdamW8bit`` state
bytes measured on GPT-2 124M's block shapes; and the projection error an INT8
or INT4 basis adds on gradient-like matrices.

    python -m benchmarks.quantized quality [--seeds 0 1 2] [--steps 800]
    python -m benchmarks.quantized memory
    python -m benchmarks.quantized time [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import galore_optax
from benchmarks.common import machine
from train import optimizers

RESULTS = pathlib.Path("benchmarks/results")

# GaLore at the settings the recorded table was measured at (the CLI's defaults
# then: lr 1e-2, the paper's scale 0.25)
GALORE = dict(optimizer="galore_adamw", lr=1e-2, scale=0.25)
QUALITY = {  # name -> (TrainConfig overrides, the baseline it is compared to)
    "galore_adamw": (GALORE, None),
    "galore_adamw, 8-bit moments": (
        dict(GALORE, moment_bits=8),
        "galore_adamw",
    ),
    "galore_adamw, 8-bit moments, INT4 bases": (
        dict(GALORE, moment_bits=8, projector_bits=4),
        "galore_adamw",
    ),
    "optax.adamw": (dict(optimizer="adamw"), None),
    "adamw_8bit": (dict(optimizer="adamw8bit"), "optax.adamw"),
    "adamw_8bit, min_size 40000": (
        dict(optimizer="adamw8bit_min40k"),
        "optax.adamw",
    ),
}
# adamw_8bit leaving the leaves under 40,000 elements in float32: on this model
# the token and position embeddings (256 x 128) and the attention output
# matrices (128 x 128). bitsandbytes' recipe keeps the embeddings' state in 32
# bits (its StableEmbedding); this asks what that is worth here.
optimizers.register(
    "adamw8bit_min40k",
    dataclasses.replace(
        optimizers.OPTIMIZERS["adamw8bit"],
        factory=lambda lr, **kw: galore_optax.adamw_8bit(
            lr, min_size=40_000, **kw
        ),
    ),
)


def quality(args) -> None:
  from train.config import TrainConfig
  from train.loop import train

  finals = {}
  for name, (overrides, _) in QUALITY.items():
    for seed in args.seeds:
      out = pathlib.Path(args.runs) / f"{name}-seed{seed}".replace(" ", "_")
      cfg = TrainConfig(
          model="gpt2",
          steps=args.steps,
          seed=seed,
          out=str(out),
          overwrite=True,
          checkpoint_every=10**9,
          **overrides,
      )
      finals.setdefault(name, []).append(
          train(cfg, verbose=False).summary["val_loss"]
      )
  command = (
      f"python -m benchmarks.quantized quality --steps {args.steps} --seeds"
      f" {' '.join(map(str, args.seeds))}"
  )
  lines = [
      f"`{command}` — {machine()}",
      "",
      (
          f"GPT-2 `cpu` preset, {args.steps} steps, final validation loss over"
          f" seeds {args.seeds}:"
      ),
      "",
      "| optimizer | per seed | mean | std | vs its float32 baseline |",
      "|---|---|---|---|---|",
  ]
  for name, (_, base) in QUALITY.items():
    mean, std = statistics.mean(finals[name]), statistics.stdev(finals[name])
    versus = (
        "baseline"
        if base is None
        else f"{mean / statistics.mean(finals[base]) - 1:+.2%}"
    )
    seeds = ", ".join(f"{v:.4f}" for v in finals[name])
    lines.append(f"| {name} | {seeds} | {mean:.4f} | {std:.4f} | {versus} |")
  _write("quantized-quality", lines, dict(finals=finals))


def time_steps(args) -> None:
  import optax

  from benchmarks.step_time import GAP
  from benchmarks.step_time import amortised
  from benchmarks.step_time import galore
  from benchmarks.step_time import train_step_times
  from models import gpt2

  cases = {"cpu": (16, 128), "124m": (8, 256)}  # the main job's batch; 124M's
  lines = [
      (
          f"`python -m benchmarks.quantized time --repeats {args.repeats}` —"
          f" {machine()}"
      ),
      "",
      (
          "Jitted, donated GPT-2 train step, median of"
          f" {args.repeats} interleaved steps; GaLore's refresh amortised over"
          f" T = {GAP}; ratios against the float32 optimizer it quantizes:"
      ),
      "",
      "| preset (batch) | optimizer | step (s) | amortised (s) | vs float32 |",
      "|---|---|---|---|---|",
  ]
  data = {}
  for preset, (batch, seq_len) in cases.items():
    rank = 128 if preset == "124m" else gpt2.PRESETS[preset].d_model // 4
    optimizers = {
        "optax.adamw": optax.adamw(1e-3),
        "adamw_8bit": galore_optax.adamw_8bit(1e-3),
        "galore_adamw": galore(rank),
        "galore_adamw, 8-bit moments": galore(rank, moment_bits=8),
        "galore_adamw, 8-bit moments, INT4 bases": galore(
            rank, moment_bits=8, projector_bits=4
        ),
    }
    t = train_step_times(preset, batch, seq_len, optimizers, args.repeats)
    cost = {
        name: (
            v["plain"]
            if v["refresh"] is None
            else amortised(v["plain"], v["refresh"])
        )
        for name, v in t.items()
    }
    for name, v in t.items():
      base = "galore_adamw" if "galore" in name else "optax.adamw"
      versus = "baseline" if name == base else f"{cost[name] / cost[base]:.3f}x"
      lines.append(
          f"| {preset} ({batch} x {seq_len}) | {name} | {v['plain']:.4f} |"
          f" {cost[name]:.4f} | {versus} |"
      )
    data[preset] = {"steps": t, "amortised": cost}
    print("\n".join(lines), flush=True)
  _write("quantized-time", lines, data)


def _state_ratio(params, optimizer, baseline) -> tuple[int, float]:
  report = galore_optax.memory_report(params, optimizer, baseline)
  return report.state_bytes, report.state_ratio


def _galore_torch_8bit_bytes(shapes, rank: int) -> int:
  """State bytes galore-torch's GaLoreAdamW8bit holds for ``shapes`` (out x
  in), by its layout: a float32 basis on the smaller side ('std') and
  bitsandbytes' block-wise 8-bit Adam on the low-rank gradient (uint8 codes
  plus a float32 scale per 256 elements, two moments).

  Computed, not measured: its ``step`` calls ``torch.cuda.synchronize()``,
  so it does not run on a CPU-only machine.
  """
  total = 0
  for m, n in shapes:
    low = max(m, n) * rank
    total += 4 * min(m, n) * rank  # the basis
    total += 2 * (low + 4 * -(-low // 256))  # two 8-bit moments
  return total


def _projection_error(bits: int, m=768, n=3072, rank=128) -> dict:
  """Relative error that an INT``bits`` basis adds to ``P^T G`` and to the
  back-projection ``P P^T G`` of a matrix with a decaying spectrum."""
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, m)))
  g = (u * (1.0 / np.arange(1, m + 1))) @ v.T  # singular values 1/k
  basis = np.linalg.svd(g, full_matrices=False)[0][:, :rank]
  q = galore_optax.quantize(jnp.asarray(basis, jnp.float32), f"linear{bits}")
  qb = np.asarray(galore_optax.dequantize(q), np.float64)
  exact_r, quant_r = basis.T @ g, qb.T @ g
  exact_back, quant_back = basis @ exact_r, qb @ quant_r
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  return {
      "basis": rel(qb, basis),
      "projection": rel(quant_r, exact_r),
      "back_projection": rel(quant_back, exact_back),
      "orthonormality": float(np.max(np.abs(qb.T @ qb - np.eye(rank)))),
  }


def memory(args) -> None:
  import optax

  from benchmarks.memory import only_targets
  from benchmarks.memory import targeted
  from benchmarks.memory import trees

  baseline = optax.adamw(1e-3)
  variants = {
      "adamw_8bit": dict(),
      "galore_adamw": dict(galore=True),
      "galore, 8-bit moments": dict(galore=True, moment_bits=8),
      "galore, 8-bit moments, INT8 bases": dict(
          galore=True, moment_bits=8, projector_bits=8
      ),
      "galore, 8-bit moments, INT4 bases": dict(
          galore=True, moment_bits=8, projector_bits=4
      ),
  }

  def make(rank, targets, galore=False, **bits):
    if not galore:
      return galore_optax.adamw_8bit(1e-3)
    return galore_optax.galore_adamw(1e-3, rank=rank, targets=targets, **bits)

  rows, data = [], {}
  for tree_name, (params, _) in trees().items():
    rank = 512 if tree_name.startswith("LLaMA") else 128
    matrices = only_targets(params)
    for name, options in variants.items():
      whole = _state_ratio(params, make(rank, targeted, **options), baseline)
      part = _state_ratio(
          matrices,
          make(rank, lambda p: jax.tree.map(lambda _: True, p), **options),
          baseline,
      )
      rows.append(
          f"| {tree_name} (r={rank}) | {name} | {whole[1]:.3f} |"
          f" {part[1]:.3f} |"
      )
      data[f"{tree_name}/{name}"] = dict(
          whole_bytes=whole[0],
          whole_ratio=whole[1],
          matrices_bytes=part[0],
          matrices_ratio=part[1],
      )
  # one GPT-2 124M block's matrices (torch Linear layout, out x in)
  block = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
  torch_bytes = _galore_torch_8bit_bytes(block, 128)
  one_block = {
      f"m{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(block)
  }
  everything = lambda p: jax.tree.map(lambda _: True, p)
  ours = galore_optax.memory_report(
      one_block,
      galore_optax.galore_adamw(
          1e-3, rank=128, targets=everything, moment_bits=8
      ),
  )
  ours_int4 = galore_optax.memory_report(
      one_block,
      galore_optax.galore_adamw(
          1e-3, rank=128, targets=everything, moment_bits=8, projector_bits=4
      ),
  )
  errors = {bits: _projection_error(bits) for bits in (8, 4)}
  lines = [
      f"`python -m benchmarks.quantized memory` — {machine()}",
      "",
      (
          "Optimizer state as a fraction of float32 optax.adamw's (whole model,"
          " and the attention and MLP matrices alone):"
      ),
      "",
      "| model | optimizer | whole model | attention + MLP |",
      "|---|---|---|---|",
      *rows,
      "",
      (
          "One GPT-2 124M block's four matrices at rank 128 (the same shapes in"
          " torch's out x in layout for galore-torch):"
      ),
      "",
      "| implementation | state bytes |",
      "|---|---|",
      (
          "| galore-torch GaLoreAdamW8bit (float32 basis; by its layout, it"
          f" needs CUDA) | {torch_bytes:,} |"
      ),
      f"| galore_adamw, moment_bits=8 | {ours.state_bytes:,} |",
      (
          "| galore_adamw, moment_bits=8, projector_bits=4 |"
          f" {ours_int4.state_bytes:,} |"
      ),
      "",
      (
          "What a quantized basis adds (768 x 3072 matrix with singular values"
          " 1/k, rank 128; relative Frobenius errors against the float64"
          " basis):"
      ),
      "",
      "| basis | basis error | P^T G | P P^T G | max abs(P^T P - I) |",
      "|---|---|---|---|---|",
  ]
  for bits, e in errors.items():
    lines.append(
        f"| INT{bits} | {e['basis']:.2e} | {e['projection']:.2e} |"
        f" {e['back_projection']:.2e} | {e['orthonormality']:.2e} |"
    )
  _write(
      "quantized-memory",
      lines,
      dict(
          ratios=data,
          galore_torch_8bit_block_bytes=torch_bytes,
          ours_block_bytes=ours.state_bytes,
          ours_int4_block_bytes=ours_int4.state_bytes,
          projection_error=errors,
      ),
  )


def _write(name: str, lines: list[str], data: dict) -> None:
  text = "\n".join(lines)
  print(text)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{name}.md").write_text(text + "\n")
  (RESULTS / f"{name}.json").write_text(
      json.dumps({"machine": machine(), **data}, indent=2)
  )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("part", choices=["quality", "memory", "time"])
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--runs", default="runs/benchmarks/quantized")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  {"quality": quality, "memory": memory, "time": time_steps}[args.part](args)


if __name__ == "__main__":
  main()
