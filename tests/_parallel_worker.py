"""Trains the tiny GPT-2 of tests/test_parallel.py in one process with 4
simulated CPU devices.

``python tests/_parallel_worker.py OUT``: for each layout, writes
``OUT/<name>.npz`` (the final parameters, keyed by path) and ``OUT/<name>.json``
(the run's summary; ``layerwise`` is the layer-wise step's; ``vocab<N>`` a
dry run's), plus
``OUT/shardings.json`` (the specs that galore_adamw's state takes under an
explicit mesh), ``OUT/quantized.json`` (the same for quantized state, and its
distance to one device), ``OUT/spread.json`` (which device computed which
refresh) and ``OUT/blas.json`` (the BLAS thread counts before the runs).
"""

import json
import os
import pathlib
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jax
import jax.numpy as jnp
import numpy as np
from helpers import ENGINE
from helpers import FOLLOWUPS
from helpers import LARGE_VOCABULARIES
from helpers import LAYERWISE
from helpers import LAYOUTS
from helpers import LLAMA
from helpers import QUANTIZED
from helpers import RESUMED
from helpers import SPLIT_WIDTH
from helpers import VIT
from helpers import flat_params
from helpers import tiny_config
from jax.sharding import NamedSharding

import galore_optax
import galore_optax.sharding
from train import parallel
from train.loop import train
from train.parallel import MeshPlacement


def save(out: pathlib.Path, name: str, result) -> None:
  np.savez(out / f"{name}.npz", **flat_params(result.params))
  (out / f"{name}.json").write_text(json.dumps(result.summary))


def state_specs(out: pathlib.Path) -> None:
  """The spec of every GaLore state leaf of a (64, 192) and a (256, 64) matrix
  under fsdp=4."""
  placement = MeshPlacement.create("data=1,fsdp=4", "explicit")
  params = placement.put_params({
      "wide": np.ones((64, 192), np.float32),
      "tall": np.ones((256, 64), np.float32),
  })
  tx = galore_optax.galore_adamw(1e-3, rank=8)
  state = placement.init_state(tx.init, params)
  galore = state[0]
  spec = (
      lambda x: [str(a) for a in x.sharding.spec]
      if isinstance(x.sharding, NamedSharding)
      else None
  )
  specs = {
      "params": jax.tree.map(spec, params),
      "left": jax.tree.map(spec, galore.projector.left),
      "right": jax.tree.map(spec, galore.projector.right),
      "mu": jax.tree.map(spec, galore.inner_state.mu),
  }
  (out / "shardings.json").write_text(json.dumps(specs))


def quantized_specs(out: pathlib.Path) -> None:
  """Where 8-bit moments and INT4 bases of a (256, 1024) and a (1024, 256)
  matrix live under fsdp=4, and how far three jitted steps there are from the
  same steps on one device."""
  placement = MeshPlacement.create("data=1,fsdp=4", "explicit")
  rng = np.random.default_rng(0)
  host = {
      "wide": rng.standard_normal((256, 1024)).astype(np.float32),
      "tall": rng.standard_normal((1024, 256)).astype(np.float32),
  }
  grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape), host)] * 3
  tx = galore_optax.galore_adamw(
      1e-2, rank=16, update_proj_gap=2, moment_bits=8, projector_bits=4
  )

  def steps(params, state, put):
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for g in grads:
      updates, state = step(params, state, put(g))
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state

  params = placement.put_params(host)
  state = placement.init_state(tx.init, params)
  with jax.set_mesh(placement.mesh):
    meshed, state = steps(params, state, placement.put_params)
  single, _ = steps(host, tx.init(host), lambda g: g)
  spec = lambda x: [str(a) for a in x.sharding.spec]
  galore = state[0]
  specs = {
      "params": jax.tree.map(spec, params),
      "mu": {
          k: {"codes": spec(q.codes), "absmax": spec(q.absmax)}
          for k, q in galore.inner_state.mu.items()
      },
      "left": spec(galore.projector.left["wide"].codes),
      "right": spec(galore.projector.right["tall"].codes),
      "max_difference": max(
          float(np.max(np.abs(np.asarray(meshed[k]) - single[k]))) for k in host
      ),
      "moved": min(float(np.max(np.abs(single[k] - host[k]))) for k in host),
  }
  (out / "quantized.json").write_text(json.dumps(specs))


def spread_owners(out: pathlib.Path) -> None:
  """Which device computed each of 6 items spread over a 4-device mesh (and over
  a pmap axis).

  Each item's function returns 1 + the index of the device running it; the
  spread result is the sum over devices, so it names the owner only if no other
  device computed the item.
  """
  fns = [lambda m, e: m + 1 + jax.lax.axis_index(("data", "fsdp"))] * 6
  args = [jnp.zeros((), jnp.int32)] * 6
  active = [jnp.bool_(i != 4) for i in range(6)]  # item 4 is not due: zeros
  with jax.set_mesh(MeshPlacement.create("data=2,fsdp=2", "explicit").mesh):
    mesh_owners = jax.jit(
        lambda a: galore_optax.sharding.spread(fns, a, [None] * 6, active)
    )(args)
  pmap_fns = [lambda m, e: m + 1 + jax.lax.axis_index("i")] * 6
  pmapped = jax.pmap(
      lambda a: galore_optax.sharding.spread(
          pmap_fns, [a] * 6, [None] * 6, active, axis_name="i"
      ),
      axis_name="i",
  )(jnp.zeros(4, jnp.int32))
  # Matrices split over one mesh axis travel whole to their owner only.
  gathered = {}
  for mesh_text, spec in (
      ("fsdp=4", ("None", "fsdp")),
      ("data=2,fsdp=2", ("fsdp", "None")),
      ("data=2,fsdp=2", ("None", "data")),
  ):
    mesh = MeshPlacement.create(mesh_text, "explicit").mesh
    sharding = NamedSharding(
        mesh, jax.P(*(None if a == "None" else a for a in spec))
    )
    mats = [
        jax.device_put(
            np.arange(128, dtype=np.float32).reshape(8, 16) * (k + 1), sharding
        )
        for k in range(6)
    ]
    whole = [lambda m, e: (m, 1 + jax.lax.axis_index(("data", "fsdp")))] * 6
    with jax.set_mesh(mesh):
      results = jax.jit(
          lambda m, whole=whole: galore_optax.sharding.spread(
              whole, m, [None] * 6, active
          )
      )(mats)
    gathered[f"{mesh_text} {spec}"] = {
        "owners": [int(owner) for _, owner in results],
        "whole": [
            bool(np.array_equal(np.asarray(r), np.asarray(m)))
            for (r, _), m in zip(results, mats)
        ],
    }
  (out / "spread.json").write_text(
      json.dumps({
          "mesh": [int(x) for x in mesh_owners],
          "pmap": [[int(v) for v in x] for x in pmapped],
          "gathered": gathered,
      })
  )


def blas_threads(out: pathlib.Path) -> None:
  """The thread counts of the BLAS libraries after the first training run's
  set-up and an SVD, in this fresh process."""
  import threadpoolctl

  parallel.limit_blas_threads()  # what train() does first
  jnp.linalg.svd(jnp.ones((8, 8))).S.block_until_ready()  # LAPACK in use now
  info = threadpoolctl.threadpool_info()
  blas = {
      i["filepath"]: i["num_threads"] for i in info if i["user_api"] == "blas"
  }
  (out / "blas.json").write_text(json.dumps(blas))


def main(out: pathlib.Path) -> None:
  assert jax.device_count() == 4, jax.devices()
  blas_threads(out)
  state_specs(out)
  quantized_specs(out)
  spread_owners(out)
  for name, layout in LAYOUTS.items():
    save(
        out,
        name,
        train(tiny_config(out / "runs" / name, **layout), verbose=False),
    )
  save(
      out,
      "engine",
      train(tiny_config(out / "runs" / "engine", **ENGINE), verbose=False),
  )
  save(
      out, "vit", train(tiny_config(out / "runs" / "vit", **VIT), verbose=False)
  )
  for name, layout in (
      ("layerwise", LAYERWISE),
      ("llama", LLAMA),
      ("quantized_run", QUANTIZED),
      ("quantized_pmap", dict(QUANTIZED, mesh=None, parallel="pmap")),
      ("split_width", SPLIT_WIDTH),
  ):
    save(
        out,
        name,
        train(tiny_config(out / "runs" / name, **layout), verbose=False),
    )
  for vocab in LARGE_VOCABULARIES:
    name = f"vocab{vocab}"
    cfg = tiny_config(
        out / "runs" / name,
        **{**SPLIT_WIDTH, "vocab_size": vocab},
        batch_size=4,
        seq_len=8,
        dry_run=True,
    )
    summary = train(cfg, verbose=False).summary
    (out / f"{name}.json").write_text(json.dumps(summary))
  # Checkpoint under fsdp=4, resume under data=2,fsdp=2.
  first, second = RESUMED
  for name, options in FOLLOWUPS.items():
    runs = out / "runs" / name
    train(tiny_config(runs, **first, **options), stop_after=3, verbose=False)
    save(
        out,
        name,
        train(
            tiny_config(runs, resume=True, **second, **options), verbose=False
        ),
    )
  cfg = tiny_config(out / "runs" / "resumed", **first)
  train(cfg, stop_after=3, verbose=False)
  save(
      out,
      "resumed",
      train(
          tiny_config(out / "runs" / "resumed", resume=True, **second),
          verbose=False,
      ),
  )


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
