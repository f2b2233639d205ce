"""GaLore on a device mesh: the refresh spread over devices, and optimizer state
per device.

Time: one jitted optimizer step of galore_adamw (rank 128, exact SVD) on GPT-2
124M block matrices placed with FSDP over ``--devices`` simulated CPU devices
(explicit mesh axes), when every basis is refreshed (``update_proj_gap=1``):

- spread: galore_optax's default under ``jax.set_mesh``, each device computes
  ~1/D of the SVDs;
- every device: the same step with spreading turned off, so each device computes
  all SVDs (what a replicated refresh costs);
- one device: the same step on a 1-device mesh, for scale;
- a step without refresh, and optax.contrib.galore under the same mesh.

Refresh temporaries: XLA's temporary bytes per device of a refresh step under
fsdp=D, on D matrices of 512 x 2048, with each due gradient brought whole only
to the device that computes its basis (the default) and, for comparison,
gathered onto every device (as before).

Memory: optimizer-state bytes per device for the full GPT-2 124M parameter tree
(shapes only) under fsdp = 1, 2, ..., D, for optax.adamw and galore_adamw (rank
128, the paper's targets).

    python -m benchmarks.parallel [--devices 4] [--layers 4] [--repeats 3]

Simulated devices share this machine's cores (and run LAPACK single-threaded
here, see ``main``), so the ratios transfer to real hardware better than the
absolute seconds do.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/parallel-cpu")
  args = p.parse_args(argv)
  os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)  # before JAX starts
  # Simulated devices are threads of one process: LAPACK's own thread pool in
  # each of them oversubscribes the cores (measured here: 4 concurrent SVDs ran
  # 20x slower than one). One LAPACK thread per device is what separate devices
  # have.
  for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")
  if "jax" in sys.modules and sys.modules["jax"].device_count() != args.devices:
    raise SystemExit(
        "run as python -m benchmarks.parallel: JAX must start after --devices"
        " is read"
    )
  _run(args)


def _run(args) -> None:
  import json
  import pathlib

  import jax
  import numpy as np
  import optax
  from flax import nnx

  import galore_optax
  from benchmarks.common import gpt2_124m_shapes
  from benchmarks.common import machine
  from benchmarks.common import median_seconds
  from benchmarks.memory import abstract_params
  from galore_optax import sharding
  from models import GPT2
  from models import gpt2
  from train.optimizers import galore_targets
  from train.parallel import MeshPlacement
  from train.parallel import bytes_per_device
  from train.parallel import compiled_memory

  rank = 128
  shapes = gpt2_124m_shapes(args.layers)
  rng = np.random.default_rng(0)
  host = jax.tree.map(
      lambda s: rng.standard_normal(s).astype(np.float32),
      shapes,
      is_leaf=lambda x: isinstance(x, tuple),
  )

  def step_time(placement, tx, refresh=True) -> float:
    params = placement.put_params(host)
    grads = placement.put_params(jax.tree.map(lambda x: 0.01 * x, host))
    state = placement.init_state(tx.init, params)
    with jax.set_mesh(placement.mesh):
      update = jax.jit(tx.update)
      if not refresh:
        # step 0 refreshes; with a large T, step 1 does not
        _, state = update(grads, state, params)
      return median_seconds(
          lambda: jax.block_until_ready(update(grads, state, params)),
          args.repeats,
      )

  galore = lambda gap: galore_optax.galore_adamw(
      1e-3, rank=rank, update_proj_gap=gap
  )
  mesh = MeshPlacement.create(f"fsdp={args.devices}", "explicit")
  one = MeshPlacement(
      jax.make_mesh(
          (1, 1),
          ("data", "fsdp"),
          devices=jax.devices()[:1],
          axis_types=(jax.sharding.AxisType.Explicit,) * 2,
      )
  )
  rows = {"spread": step_time(mesh, galore(1))}
  # spreading off: every device computes every SVD
  sharding.SPREAD_OVER_MESH = False
  try:
    rows["every device"] = step_time(mesh, galore(1))
  finally:
    sharding.SPREAD_OVER_MESH = True
  rows["one device"] = step_time(one, galore(1))
  rows["no refresh"] = step_time(mesh, galore(10**6), refresh=False)
  try:
    step_time(mesh, optax.contrib.galore(1e-3, rank=rank, update_proj_gap=1))
    contrib = "runs"
  except Exception as e:  # noqa: BLE001 - the failure is the finding
    contrib = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"

  wide = {
      f"w{i}": rng.standard_normal((512, 2048)).astype(np.float32)
      for i in range(args.devices)
  }

  def refresh_step(to_owner: bool) -> tuple[int, float]:
    """(temporary bytes per device, seconds) of a refresh step on ``wide`` under
    fsdp."""
    sharding.GATHER_TO_OWNER = to_owner
    try:
      # a new transform: the switch is read when the update is traced
      tx = galore(1)
      params = mesh.put_params(wide)
      state = mesh.init_state(tx.init, params)
      with jax.set_mesh(mesh.mesh):
        update = jax.jit(tx.update).lower(params, state, params).compile()
        seconds = median_seconds(
            lambda: jax.block_until_ready(update(params, state, params)),
            args.repeats,
        )
      return compiled_memory(update)["temp_size_bytes"], seconds
    finally:
      sharding.GATHER_TO_OWNER = True

  temps = {
      "whole to the owner only": refresh_step(True),
      "whole to every device": refresh_step(False),
  }

  params = abstract_params(lambda: GPT2(gpt2.PRESETS["124m"], rngs=nnx.Rngs(0)))
  optimizers = {
      "optax.adamw": optax.adamw(1e-3),
      "galore_adamw r=128": galore_optax.galore_adamw(
          1e-3, rank=rank, targets=galore_targets()
      ),
  }
  memory = {}
  fsdp = 1
  while fsdp <= args.devices:
    placement = MeshPlacement.create(
        f"data={args.devices // fsdp},fsdp={fsdp}", "explicit"
    )
    for name, tx in optimizers.items():
      state_sh = placement.state_shardings(tx.init, params)
      state = jax.eval_shape(tx.init, params)
      memory[(name, fsdp)] = bytes_per_device(
          jax.tree.map(
              lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
              state,
              state_sh,
          )
      )
    fsdp *= 2

  when = machine()
  lines = [
      (
          f"`python -m benchmarks.parallel --devices {args.devices} --layers"
          f" {args.layers} --repeats {args.repeats}` — {when}, {args.devices}"
          " simulated devices"
      ),
      "",
      (
          f"GPT-2 124M block matrices x {args.layers} layers, rank {rank},"
          f" exact SVD, fsdp={args.devices}:"
      ),
      "",
      "| galore_adamw step | seconds | x spread |",
      "|---|---|---|",
  ]
  lines += [
      f"| {name} | {t:.3f} | {t / rows['spread']:.2f} |"
      for name, t in rows.items()
  ]
  lines += [
      "",
      (
          f"Refresh step on {args.devices} matrices of 512 x 2048 (4 MiB each,"
          f" float32), fsdp={args.devices}, rank {rank}: XLA's temporaries per"
          " device (each device's share of the gradients: 4 MiB)"
      ),
      "",
      "| due gradients travel | temp MiB per device | x owner only | seconds |",
      "|---|---|---|---|",
  ]
  owner_bytes = temps["whole to the owner only"][0]
  lines += [
      f"| {name} | {b / 2**20:.1f} | {b / owner_bytes:.2f} | {t:.3f} |"
      for name, (b, t) in temps.items()
  ]
  lines += [
      "",
      f"optax.contrib.galore under the same explicit mesh: {contrib}",
      "",
      "GPT-2 124M (124.4M params), optimizer state per device:",
      "",
      "| optimizer | "
      + " | ".join(f"fsdp={f}" for f in sorted({f for _, f in memory}))
      + " |",
      "|---" * (1 + len({f for _, f in memory})) + "|",
  ]
  for name in optimizers:
    base = memory[(name, 1)]
    lines.append(
        f"| {name} | "
        + " | ".join(
            f"{memory[(name, f)] / 2**20:.1f} MiB"
            f" ({memory[(name, f)] / base:.3f})"
            for f in sorted({f for _, f in memory})
            if (name, f) in memory
        )
        + " |"
    )
  text = "\n".join(lines)
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text(text + "\n")
  out.with_suffix(".json").write_text(
      json.dumps(
          {
              "machine": when,
              "devices": args.devices,
              "layers": args.layers,
              "step_seconds": rows,
              "contrib": contrib,
              "refresh_temp_bytes_and_seconds": temps,
              "state_bytes_per_device": {
                  f"{n} fsdp={f}": b for (n, f), b in memory.items()
              },
          },
          indent=2,
      )
  )


if __name__ == "__main__":
  main()
