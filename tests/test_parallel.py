"""Scale-out on simulated CPU devices: mesh layouts, pmap, two processes,
checkpoints across meshes.

The 4-device runs happen in one subprocess (tests/_parallel_worker.py: JAX fixes
its device count at start-up), started by conftest.py when the tests are
collected so that it runs beside the others; the 1-device reference runs here.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ENGINE
from helpers import FOLLOWUPS
from helpers import LARGE_VOCABULARIES
from helpers import LAYOUTS
from helpers import LLAMA
from helpers import QUANTIZED
from helpers import SPLIT_WIDTH
from helpers import TINY
from helpers import VIT
from helpers import flat_params
from helpers import stacked_blocks
from helpers import tiny_config

from train.__main__ import main
from train.loop import train

HERE = pathlib.Path(__file__).resolve().parent
ATOL = 2e-6  # float32: summation orders differ between layouts


def _env(devices: int) -> dict:
  return {
      **os.environ,
      "JAX_NUM_CPU_DEVICES": str(devices),
      "PYTHONPATH": str(HERE.parent),
  }


def _close(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  assert jax.device_count() == 1
  result = train(tiny_config(tmp_path_factory.mktemp("one")), verbose=False)
  return flat_params(result.params), result.summary


def _load(out: pathlib.Path, name: str) -> tuple[dict, dict]:
  with np.load(out / f"{name}.npz") as f:
    params = dict(f)
  return params, json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_trains_like_one_device(four_devices, one_device, name):
  params, summary = _load(four_devices, name)
  reference, reference_summary = one_device
  assert summary["per_device"]["devices"] == 4
  assert (
      summary["refresh"]["bases_computed"]
      == reference_summary["refresh"]["bases_computed"]
      == 3 * 8
  )
  assert _close(params, reference) < ATOL
  assert abs(summary["val_loss"] - reference_summary["val_loss"]) < 1e-5


def test_subspace_engine_options_on_a_mesh(tmp_path, four_devices):
  params, summary = _load(four_devices, "engine")
  reference = train(
      tiny_config(tmp_path, **{**ENGINE, "mesh": None}), verbose=False
  )
  # lazy refresh acted
  assert (
      summary["refresh"]["svds_saved"]
      == reference.summary["refresh"]["svds_saved"]
      > 0
  )
  # The sketch's Cholesky QR and the moment transport amplify rounding a little
  # more.
  assert _close(params, flat_params(reference.params)) < 5 * ATOL


def test_vit_on_a_mesh_trains_like_one_device(tmp_path, four_devices):
  params, summary = _load(four_devices, "vit")
  reference = train(
      tiny_config(tmp_path, **{**VIT, "mesh": None}), verbose=False
  )
  # ViT's LayerNorm scales sit near 1, where Adam's normalised steps carry the
  # layouts' rounding differences (observed up to 2.9e-6 on this machine).
  assert _close(params, flat_params(reference.params)) < 2 * ATOL
  assert abs(summary["val_accuracy"] - reference.summary["val_accuracy"]) < 1e-6


def test_llama_layerwise_on_a_mesh_trains_like_the_standard_step(
    tmp_path, four_devices
):
  # LLaMA's blocks stacked, gathered and stepped one at a time on
  # data=2,fsdp=2, against the plain step on one device
  params, summary = _load(four_devices, "llama")
  reference = train(
      tiny_config(tmp_path, **{**LLAMA, "mesh": None, "layerwise": False}),
      verbose=False,
  )
  assert _close(params, stacked_blocks(flat_params(reference.params))) < ATOL
  assert summary["val_loss"] == pytest.approx(
      reference.summary["val_loss"], abs=1e-5
  )


def test_layerwise_step_on_a_mesh_trains_like_one_device(
    four_devices, one_device
):
  # each block gathered whole for its own forward and backward pass, its
  # gradient reduce-scattered back, clipping by the global norm in two passes
  params, summary = _load(four_devices, "layerwise")
  reference, reference_summary = one_device
  assert _close(params, stacked_blocks(reference)) < ATOL
  assert (
      summary["refresh"]["bases_computed"]
      == reference_summary["refresh"]["bases_computed"]
  )


def test_a_table_split_along_its_width_trains_like_one_device(
    tmp_path, four_devices
):
  # 258 rows do not split over 4 devices: the table and its lookup, output and
  # gradient stay split along the width instead
  params, _ = _load(four_devices, "split_width")
  reference = train(
      tiny_config(tmp_path, **{**SPLIT_WIDTH, "mesh": None}), verbose=False
  )
  assert _close(params, flat_params(reference.params)) < ATOL


@pytest.mark.parametrize("vocab", LARGE_VOCABULARIES)
def test_no_device_holds_a_whole_vocabulary_table(four_devices, vocab):
  # the tiny model's table (vocab x 64, float32) is most of its weights, and
  # 4 x 8 tokens make small logits. Gathering the table and its gradient whole
  # held 4 tables in temporaries (32 MiB); split, a few shards of it
  per_device = json.loads((four_devices / f"vocab{vocab}.json").read_text())[
      "per_device"
  ]
  table = vocab * 64 * 4
  assert per_device["param_bytes"] < 0.4 * table
  assert per_device["xla_train_step"]["temp_size_bytes"] < 1.5 * table


def test_fsdp_splits_the_optimizer_state(four_devices, one_device):
  one = one_device[1]["per_device"]
  data = _load(four_devices, "data4")[1]["per_device"]
  fsdp = _load(four_devices, "fsdp4")[1]["per_device"]
  # data parallel replicates it
  assert data["optimizer_state_bytes"] == one["optimizer_state_bytes"]
  # About a quarter: only GaLore's bases on the unsharded side of their matrix,
  # and scalars, stay whole.
  assert (
      0.25
      <= fsdp["optimizer_state_bytes"] / one["optimizer_state_bytes"]
      < 0.33
  )
  assert 0.25 <= fsdp["param_bytes"] / one["param_bytes"] < 0.26
  for layout in (one, fsdp):
    assert layout["xla_train_step"]["argument_size_bytes"] > 0
    assert layout["xla_train_step"]["temp_size_bytes"] > 0
  assert (
      fsdp["xla_train_step"]["argument_size_bytes"]
      < one["xla_train_step"]["argument_size_bytes"] / 2
  )


def test_runs_on_several_cpu_devices_use_one_blas_thread(four_devices):
  # 4 simulated devices running LAPACK at once must not each start a thread per
  # core; SciPy's OpenBLAS (jaxlib's LAPACK) among them.
  threads = json.loads((four_devices / "blas.json").read_text())
  assert any("scipy" in path for path in threads), threads
  assert set(threads.values()) == {1}, threads


def test_galore_state_follows_its_parameters_on_an_explicit_mesh(four_devices):
  specs = json.loads((four_devices / "shardings.json").read_text())
  # wide (64, 192): split along its 192 columns; std projects from the left (U
  # is 64 x r).
  assert specs["params"]["wide"] == ["None", "fsdp"]
  # U's rows follow the parameter's (whole) rows
  assert specs["left"]["wide"] == [
      "None",
      "None",
  ]
  # the r x 192 moments keep the columns' split
  assert specs["mu"]["wide"] == [
      "None",
      "fsdp",
  ]
  # tall (256, 64): split along its 256 rows; std projects from the right (V^T
  # is r x 64).
  assert specs["params"]["tall"] == ["fsdp", "None"]
  assert specs["right"]["tall"] == ["None", "None"]
  assert specs["mu"]["tall"] == ["fsdp", "None"]


def test_quantized_state_is_split_with_its_parameter(four_devices):
  specs = json.loads((four_devices / "quantized.json").read_text())
  # std: the low-rank moments lie along each matrix's larger side, which fsdp
  # splits; their codes and scales keep that split, block by block.
  assert specs["params"] == {"wide": ["None", "fsdp"], "tall": ["fsdp", "None"]}
  assert specs["mu"]["wide"] == {
      "codes": ["None", "fsdp", "None"],  # (16, 4 blocks, 256)
      "absmax": ["None", "fsdp"],
  }
  assert specs["mu"]["tall"] == {
      "codes": ["fsdp", "None"],  # (1024 x 16 / 256 blocks, 256)
      "absmax": ["fsdp"],
  }
  # the bases lie on each matrix's unsplit side: whole on every device
  assert specs["left"] == ["None", "None"]
  assert specs["right"] == ["None", "None", "None"]
  assert specs["max_difference"] < 1e-3 * specs["moved"]


def test_quantized_state_trains_on_a_mesh_and_pmap_like_one_device(
    tmp_path, four_devices
):
  one = dict(QUANTIZED, mesh=None)
  reference = train(tiny_config(tmp_path / "one", **one), verbose=False)
  meshed, summary = _load(four_devices, "quantized_run")
  pmapped, _ = _load(four_devices, "quantized_pmap")
  # A code can flip where float32 sums differ in order: a looser bound (1.1e-4
  # seen on an AMD EPYC CPU).
  assert _close(meshed, flat_params(reference.params)) < 3e-4
  assert _close(pmapped, flat_params(reference.params)) < 3e-4
  per_device = summary["per_device"]["optimizer_state_bytes"]
  whole = reference.summary["per_device"]["optimizer_state_bytes"]
  assert per_device < 0.4 * whole  # codes and scales split with the params


def test_refreshes_are_spread_one_device_each(four_devices):
  owners = json.loads((four_devices / "spread.json").read_text())
  # Item k on device k mod 4 (reported as 1 + index); item 4 is not due, so it
  # is zeros.
  assert owners["mesh"] == [1, 2, 3, 4, 0, 2]
  # every device holds every result
  assert owners["pmap"] == [[owner] * 4 for owner in (1, 2, 3, 4, 0, 2)]
  # Split matrices (FSDP over either axis) reach their owner whole, with the
  # same round-robin.
  assert len(owners["gathered"]) == 3
  for layout, got in owners["gathered"].items():
    assert got["owners"] == [1, 2, 3, 4, 0, 2], layout
    assert got["whole"] == [
        True,
        True,
        True,
        True,
        False,
        True,
    ], layout  # item 4 not due: zeros


def test_resume_on_another_mesh_shape(four_devices):
  resumed, _ = _load(four_devices, "resumed")
  uninterrupted, _ = _load(four_devices, "fsdp4")
  assert _close(resumed, uninterrupted) < ATOL


@pytest.mark.parametrize("name", sorted(FOLLOWUPS))
def test_fira_and_apollo_resume_across_meshes_like_one_device(
    tmp_path, four_devices, name
):
  # Fira's residual and APOLLO's projections (drawn from the seed and the step
  # on every device) on fsdp=4, checkpointed after 3 steps and resumed on
  # data=2,fsdp=2: the parameters of one uninterrupted device
  params, summary = _load(four_devices, name)
  reference = train(tiny_config(tmp_path, **FOLLOWUPS[name]), verbose=False)
  assert _close(params, flat_params(reference.params)) < ATOL
  assert abs(summary["val_loss"] - reference.summary["val_loss"]) < 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(args, timeout: int) -> None:
  """Runs ``python *args(i)`` for processes i = 0, 1 (2 CPU devices each) at
  once, from the repository root, and checks that both succeed."""
  procs = [
      subprocess.Popen(
          [sys.executable, *args(i)],
          env=_env(2),
          cwd=HERE.parent,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], (
      outputs[0][-3000:] + outputs[1][-3000:]
  )


def test_two_processes_match_one_process_with_four_devices(
    tmp_path, four_devices
):
  flags = ["gpt2"] + [
      f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "model"
  ]
  flags += [
      "--mesh=data=2,fsdp=2",
      f"--out={tmp_path / 'run'}",
      f"--coordinator=localhost:{_free_port()}",
      "--num-processes=2",
  ]
  _two_processes(
      lambda i: ["-m", "train", *flags, f"--process-id={i}"], timeout=600
  )
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert (
      summary["per_device"]["processes"] == 2
      and summary["per_device"]["devices"] == 4
  )
  # Restore the two processes' checkpoint here, on one device: it holds the
  # final parameters.
  restored = train(tiny_config(tmp_path / "run", resume=True), verbose=False)
  assert restored.summary["steps"] == TINY["steps"]
  assert (
      _close(
          flat_params(restored.params), _load(four_devices, "data2_fsdp2")[0]
      )
      < ATOL
  )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mesh", "data=3"], "must multiply to 1"),
        (["--mesh", "model=1"], "NAME=SIZE pairs"),
        (["--mesh", "data=x"], "NAME=SIZE pairs"),
        (["--mesh-axes", "manual"], "--mesh-axes"),
        (["--parallel", "shmap"], "--parallel"),
        (["--coordinator", "localhost:1234"], "go together"),
    ],
)
def test_bad_layouts_are_refused(tmp_path, capsys, flags, message):
  assert (
      main([
          "gpt2",
          "--preset",
          "tiny",
          "--steps",
          "1",
          "--out",
          str(tmp_path),
          *flags,
      ])
      == 2
  )
  assert message in capsys.readouterr().err


def test_batch_rows_on_a_mesh_that_interleaves_two_processes(tmp_path):
  coordinator = f"localhost:{_free_port()}"
  worker = str(HERE / "_rows_worker.py")
  _two_processes(lambda i: [worker, coordinator, str(i), str(tmp_path)], 300)
  results = [
      json.loads((tmp_path / f"rows{i}.json").read_text()) for i in range(2)
  ]
  # Mesh devices p0, p1, p0, p1 each hold 2 of the 8 rows: each process's rows
  # are not contiguous.
  assert results[0]["rows"] == [0, 1, 4, 5] and results[1]["rows"] == [
      2,
      3,
      6,
      7,
  ]
  # the assembled batch is the whole batch
  assert results[0]["same"] and results[1]["same"]
