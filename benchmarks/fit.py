"""What fits: the per-device footprint of the compiled GPT-2 train step, from
XLA's memory analysis of ``python -m train gpt2 --dry-run``, and what the
layer-wise step costs in time.

``table``: GPT-2 124M / 350M / 774M / 1.5B and ``7b`` (vocabulary 50257) at
batch 1 x 256 and 8 x 256, for each row of :data:`SETUPS`. Footprint is XLA's
argument + temporary + output - alias bytes of the compiled step (what it holds
at once). Cells are kept in ``benchmarks/results/fit.json`` as they finish, so
an interrupted run resumes.

``llama``: the LLaMA presets of the GaLore repository (350m, 1b, 7b;
vocabulary 32000) at batch 1 x 256, as the paper's 7B-on-24-GB claim is made:
AdamW, 8-bit Adam, and GaLore layer-wise in bf16 with 8-bit moments at rank
d/4 (1024 for 7b, the paper's), each beside the others.

``fsdp``: GPT-2 124M at 8 x 256 on fsdp=1, 4 and 8 simulated CPU devices
(one process each, ``JAX_NUM_CPU_DEVICES``), the per-device footprint of
AdamW, GaLore and layer-wise GaLore, against the target of at most 1.3 / F of
the one-device figure plus one block's gathered weights.

``time``: the median train step of the standard and the layer-wise step (with
and without global-norm clipping, which costs the layer-wise step a second
backward pass), trained for real one after the other (``python -m train``'s own
timing) on the main job (``cpu`` preset, 16 x 128 tokens, byte vocabulary, 40
steps) and on GPT-2 124M (8 x 256 tokens, vocabulary 50257, 6 steps).

    python -m benchmarks.fit table
    python -m benchmarks.fit llama
    python -m benchmarks.fit fsdp
    python -m benchmarks.fit time
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from benchmarks.common import machine
from train.config import TrainConfig
from train.loop import train

RESULTS = pathlib.Path("benchmarks/results")
PRESETS = ("124m", "350m", "774m", "1.5b", "7b")
BATCHES = (1, 8)  # sequences of 256 tokens
BF16 = dict(param_dtype="bfloat16", compute_dtype="bfloat16")
SETUPS = {  # row -> TrainConfig fields
    "AdamW": dict(optimizer="adamw"),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "AdamW + remat": dict(optimizer="adamw", remat="block"),
    "AdamW + remat + bf16": dict(optimizer="adamw", remat="block", **BF16),
    "AdamW + layer-wise + remat + bf16": dict(
        optimizer="adamw", layerwise=True, **BF16
    ),
    "GaLore": dict(optimizer="galore_adamw"),
    "GaLore + layer-wise + remat + bf16": dict(
        optimizer="galore_adamw", layerwise=True, **BF16
    ),
    "GaLore + layer-wise + remat + bf16 + 8-bit": dict(
        optimizer="galore_adamw", layerwise=True, moment_bits=8, **BF16
    ),
}
LLAMA_PRESETS = ("350m", "1b", "7b")
LLAMA_SETUPS = {
    "AdamW": dict(optimizer="adamw"),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "AdamW + layer-wise + remat + bf16": dict(
        optimizer="adamw", layerwise=True, **BF16
    ),
    "adamw8bit + layer-wise + remat + bf16": dict(
        optimizer="adamw8bit", layerwise=True, **BF16
    ),
    "GaLore + layer-wise + remat + bf16 + 8-bit": dict(
        optimizer="galore_adamw", layerwise=True, moment_bits=8, **BF16
    ),
}
GIB = 2**30
VOCABULARY = {"gpt2": 50257, "llama": 32000}


def dry_run(preset: str, batch: int, model: str = "gpt2", **fields) -> dict:
  """The dry run's summary for ``model`` ``preset`` (rank d/4, the model's
  real vocabulary)."""
  with tempfile.TemporaryDirectory() as out:
    cfg = TrainConfig(
        model=model,
        preset=preset,
        vocab_size=VOCABULARY[model],
        batch_size=batch,
        seq_len=256,
        dry_run=True,
        out=out,
        **fields,
    )
    return train(cfg, verbose=False).summary


def footprint(summary: dict) -> int:
  return summary["per_device"]["xla_train_step"]["footprint_bytes"]


def _cell(summary: dict) -> str:
  gib = footprint(summary) / GIB
  mark = " ✓24" if gib <= 24 else " ✓80" if gib <= 80 else ""
  return f"{gib:.2f}{mark}"


def table() -> None:
  path = RESULTS / "fit.json"
  done = json.loads(path.read_text()) if path.exists() else {}
  for preset in PRESETS:
    for batch in BATCHES:
      for name, fields in SETUPS.items():
        key = f"{preset} {batch}x256 {name}"
        if key in done:
          continue
        summary = dry_run(preset, batch, **fields)
        done[key] = summary
        print(
            f"{key}: {_cell(summary)} GiB (compiled in"
            f" {summary['compile_s']:.0f}s)",
            flush=True,
        )
        path.write_text(json.dumps(done, indent=1))
  columns = [f"{p} {b}x256" for p in PRESETS for b in BATCHES]
  lines = [
      (
          "Per-device footprint of the GPT-2 train step, GiB (XLA memory"
          f" analysis; ✓24 fits 24 GiB, ✓80 fits 80 GiB). {machine()}"
      ),
      "",
      "| setup | " + " | ".join(columns) + " |",
      "|---" * (len(columns) + 1) + "|",
  ]
  for name in SETUPS:
    cells = [_cell(done[f"{c} {name}"]) for c in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  base = lambda key: footprint(done[key])
  lw = "124m 8x256 GaLore + layer-wise + remat + bf16"
  fp32_key = "124m 8x256 GaLore + layer-wise + remat (float32)"
  if fp32_key not in done:
    done[fp32_key] = dry_run(
        "124m", 8, optimizer="galore_adamw", layerwise=True
    )
    path.write_text(json.dumps(done, indent=1))
  fp32 = base(fp32_key)
  lines += [
      "",
      (
          "GPT-2 124M, 8 x 256, float32, layer-wise GaLore (remat):"
          f" {fp32 / GIB:.2f} GiB = {fp32 / base('124m 8x256 AdamW'):.3f} of"
          " AdamW's standard step,"
          f" {fp32 / base('124m 8x256 AdamW + remat'):.3f} of AdamW's with"
          f" remat; in bf16 {base(lw) / base('124m 8x256 AdamW'):.3f} and"
          f" {base(lw) / base('124m 8x256 AdamW + remat'):.3f}."
      ),
  ]
  text = "\n".join(lines)
  (RESULTS / "fit.md").write_text(text + "\n")
  print(text)


def llama_table() -> None:
  path = RESULTS / "fit-llama.json"
  done = json.loads(path.read_text()) if path.exists() else {}
  for preset in LLAMA_PRESETS:
    for name, fields in LLAMA_SETUPS.items():
      key = f"{preset} 1x256 {name}"
      if key not in done:
        done[key] = dry_run(preset, 1, model="llama", **fields)
        print(f"{key}: {_cell(done[key])} GiB", flush=True)
        path.write_text(json.dumps(done, indent=1))
  lines = [
      (
          "Per-device footprint of the LLaMA train step at batch 1 x 256, GiB"
          " (XLA memory analysis; ✓24 fits 24 GiB, ✓80 fits 80 GiB; the"
          " ratio to AdamW's). GaLore's rank is d/4: 256, 512, 1024."
          f" {machine()}"
      ),
      "",
      "| setup | " + " | ".join(LLAMA_PRESETS) + " |",
      "|---" * (len(LLAMA_PRESETS) + 1) + "|",
  ]
  cell = lambda p, name: done[f"{p} 1x256 {name}"]
  for name in LLAMA_SETUPS:
    cells = [
        f"{_cell(cell(p, name))}"
        f" ({footprint(cell(p, name)) / footprint(cell(p, 'AdamW')):.2f})"
        for p in LLAMA_PRESETS
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  (RESULTS / "fit-llama.md").write_text(text + "\n")
  print(text)


FSDP = (1, 4, 8)
FSDP_SETUPS = {
    "AdamW": dict(optimizer="adamw"),
    "GaLore": dict(optimizer="galore_adamw"),
    "GaLore + layer-wise + remat": dict(
        optimizer="galore_adamw", layerwise=True
    ),
}


def fsdp_cell(devices: int, name: str) -> dict:
  """One dry run on ``devices`` simulated devices, in a process of its own
  (the device count is fixed when JAX starts)."""
  import os
  import subprocess
  import sys

  code = (
      "import json, sys; from benchmarks import fit;"
      f" s = fit.dry_run('124m', 8, mesh='fsdp={devices}',"
      f" **fit.FSDP_SETUPS[{name!r}]);"
      " print(json.dumps(s['per_device']))"
  )
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def fsdp_table() -> None:
  path = RESULTS / "fit-fsdp.json"
  done = json.loads(path.read_text()) if path.exists() else {}
  for devices in FSDP:
    for name in FSDP_SETUPS:
      key = f"fsdp={devices} {name}"
      if key not in done:
        done[key] = fsdp_cell(devices, name)
        path.write_text(json.dumps(done, indent=1))
        gib = done[key]["xla_train_step"]["footprint_bytes"] / GIB
        print(f"{key}: {gib:.2f} GiB", flush=True)
  # one block's weights, float32, gathered whole on each device
  d = 768
  block = (4 * d * d + 2 * 4 * d * d + 13 * d) * 4
  lines = [
      (
          "Per-device footprint of GPT-2 124M's train step at 8 x 256"
          " (vocabulary 50257), GiB, on fsdp=F simulated CPU devices (XLA"
          " memory analysis); in parentheses the target, 1.3 / F of the"
          " one-device figure plus one block's gathered weights"
          f" ({block / 2**20:.0f} MiB). {machine()}"
      ),
      "",
      "| setup | " + " | ".join(f"fsdp={f}" for f in FSDP) + " |",
      "|---" * (len(FSDP) + 1) + "|",
  ]
  size = lambda f, name: (
      done[f"fsdp={f} {name}"]["xla_train_step"]["footprint_bytes"]
  )
  for name in FSDP_SETUPS:
    one = size(1, name)
    cells = [
        f"{size(f, name) / GIB:.2f}"
        + ("" if f == 1 else f" ({(1.3 * one / f + block) / GIB:.2f})")
        for f in FSDP
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  (RESULTS / "fit-fsdp.md").write_text(text + "\n")
  print(text)


TIMED = {  # column -> TrainConfig fields; clipping at 1.0 unless --clip 0
    "standard": dict(),
    "standard + remat": dict(remat="block"),
    "layer-wise": dict(layerwise=True),
    "standard, --clip 0": dict(clip=0.0),
    "layer-wise, --clip 0": dict(layerwise=True, clip=0.0),
}
JOBS = {  # row -> (TrainConfig fields, steps)
    "main job (cpu preset, 16 x 128)": (dict(preset="cpu"), 40),
    "GPT-2 124M (8 x 256)": (
        dict(preset="124m", vocab_size=50257, batch_size=8, seq_len=256),
        6,
    ),
}


def time_steps() -> None:
  lines = [
      (
          "Median train step, ms, and its ratio to the standard step"
          " (galore_adamw; the steps after the first; refreshes every 200"
          f" steps, so none timed). {machine()}"
      ),
      "",
      "| job | " + " | ".join(TIMED) + " |",
      "|---" * (len(TIMED) + 1) + "|",
  ]
  for job, (fields, steps) in JOBS.items():
    ms = {}
    for name, extra in TIMED.items():
      with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model="gpt2",
            steps=steps,
            update_proj_gap=200,
            eval_every=10**6,
            eval_batches=1,
            checkpoint_every=10**6,
            out=out,
            **fields,
            **extra,
        )
        ms[name] = train(cfg, verbose=False).summary["median_step_ms"]
      print(f"{job}, {name}: {ms[name]:.1f} ms", flush=True)
    base = ms["standard"]
    lines.append(
        f"| {job} | "
        + " | ".join(f"{v:.1f} ({v / base:.2f}x)" for v in ms.values())
        + " |"
    )
  text = "\n".join(lines)
  (RESULTS / "fit-time.md").write_text(text + "\n")
  print(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parts = {
      "table": table,
      "llama": llama_table,
      "fsdp": fsdp_table,
      "time": time_steps,
  }
  parser.add_argument("part", choices=parts)
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  parts[args.part]()


if __name__ == "__main__":
  main()
