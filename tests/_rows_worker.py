"""One of two processes (2 CPU devices each) on a mesh whose device order
interleaves them.

``python tests/_rows_worker.py COORDINATOR PROCESS_ID OUT``: builds the batch
rows of its own devices, assembles the global batch, and writes
``OUT/rows<id>.json``: the rows it built and whether the global batch, gathered
on every process, equals the batch built whole.
"""

import json
import os
import pathlib
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType

from train import data as data_lib
from train.parallel import MeshPlacement
from train.parallel import initialize_processes


def main(coordinator: str, process_id: int, out: pathlib.Path) -> None:
  initialize_processes(coordinator, 2, process_id, auto=False)
  by_process = [
      [d for d in jax.devices() if d.process_index == p] for p in (0, 1)
  ]
  interleaved = [d for pair in zip(*by_process) for d in pair]  # p0, p1, p0, p1
  mesh = jax.sharding.Mesh(
      np.array(interleaved).reshape(2, 2),
      ("data", "fsdp"),
      axis_types=(AxisType.Explicit,) * 2,
  )
  placement = MeshPlacement(mesh)
  tokens = np.arange(10_000, dtype=np.uint8)
  rows = placement.local_rows(8)
  local = data_lib.text_batch(tokens, 3, 8, 16, seed=0, rows=rows)
  batch = placement.put_batch(local, 8)
  gathered = multihost_utils.process_allgather(batch, tiled=True)
  whole = data_lib.text_batch(tokens, 3, 8, 16, seed=0)
  same = all(np.array_equal(a, b) for a, b in zip(gathered, whole))
  (out / f"rows{process_id}.json").write_text(
      json.dumps({"rows": rows.tolist(), "same": same})
  )


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3]))
