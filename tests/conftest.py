"""Fixtures; the helpers they use live in helpers.py."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest
from helpers import small_params

HERE = pathlib.Path(__file__).resolve().parent
_WORKER = {}  # the 4-device worker: its process and output directory

# Many tests compile the same small programs (a train step per run, resumed
# runs compile it again): a compilation cache for this session, shared with
# the subprocesses the tests start, compiles each once. It starts empty, so
# nothing outlives the session.
_CACHE = tempfile.mkdtemp(prefix="jax-cache-")
for name, value in (
    ("jax_compilation_cache_dir", _CACHE),
    ("jax_persistent_cache_min_compile_time_secs", 0),
    ("jax_persistent_cache_min_entry_size_bytes", 0),
):
  jax.config.update(name, value)
  os.environ[name.upper()] = str(value)


@pytest.fixture
def params():
  return small_params()


def pytest_collection_modifyitems(session, config, items):
  """Starts tests/_parallel_worker.py (minutes of 4-device runs, mostly on one
  core) as soon as a selected test needs its results, so that it runs beside
  the other tests instead of before the first that waits for it."""
  if not any("four_devices" in getattr(i, "fixturenames", ()) for i in items):
    return
  out = pathlib.Path(tempfile.mkdtemp(prefix="four-devices-"))
  env = {
      **os.environ,
      "JAX_NUM_CPU_DEVICES": "4",
      "PYTHONPATH": str(HERE.parent),
  }
  log = (out / "worker.log").open("w")
  _WORKER.update(
      out=out,
      log=log,
      proc=subprocess.Popen(
          [sys.executable, str(HERE / "_parallel_worker.py"), str(out)],
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
      ),
  )


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE, ignore_errors=True)
  if _WORKER:
    if _WORKER["proc"].poll() is None:
      _WORKER["proc"].kill()
    _WORKER["proc"].wait()
    _WORKER["log"].close()
    shutil.rmtree(_WORKER["out"], ignore_errors=True)


@pytest.fixture(scope="session")
def four_devices():
  """The worker's output directory, once it has finished."""
  try:
    code = _WORKER["proc"].wait(timeout=1800)
  except subprocess.TimeoutExpired:
    _WORKER["proc"].kill()
    raise
  _WORKER["log"].flush()
  output = (_WORKER["out"] / "worker.log").read_text()
  assert code == 0, output[-4000:]
  return _WORKER["out"]
