"""Fixtures; the helpers they use live in helpers.py."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import pytest
from helpers import small_params

HERE = pathlib.Path(__file__).resolve().parent
_WORKER = {}  # the 4-device worker's process, where this process started it

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


# The 4-device worker's output directory: one per test session, shared by
# pytest-xdist's workers (the controller makes it before they start, and they
# inherit its environment).
_FOUR_DEVICES = "GALORE_OPTAX_FOUR_DEVICES"


def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # not an xdist worker
    os.environ[_FOUR_DEVICES] = tempfile.mkdtemp(prefix="four-devices-")


def pytest_collection_modifyitems(session, config, items):
  """Starts tests/_parallel_worker.py (minutes of 4-device runs, mostly on one
  core) as soon as a selected test needs its results, so that it runs beside
  the other tests instead of before the first that waits for it. Under
  pytest-xdist every worker collects every test: only the first starts it, and
  the tests that read its results go to one worker (``--dist loadgroup``)."""
  users = [i for i in items if "four_devices" in getattr(i, "fixturenames", ())]
  for item in users:
    item.add_marker(pytest.mark.xdist_group("four_devices"))
  if not users or os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
    return
  out = pathlib.Path(os.environ[_FOUR_DEVICES])
  env = {
      **os.environ,
      "JAX_NUM_CPU_DEVICES": "4",
      "PYTHONPATH": str(HERE.parent),
  }
  # the exit status lands in a file: the worker that waits for it may not be
  # the process that started it
  worker, out_ = (
      shlex.quote(str(x)) for x in (HERE / "_parallel_worker.py", out)
  )
  _WORKER["proc"] = subprocess.Popen(
      [
          "sh",
          "-c",
          (
              f"{shlex.quote(sys.executable)} {worker} {out_} >"
              f" {out_}/worker.log 2>&1; echo $? > {out_}/exit.tmp; mv"
              f" {out_}/exit.tmp {out_}/exit"
          ),
      ],
      env=env,
      start_new_session=True,  # killed as a group, shell and worker
  )


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE, ignore_errors=True)
  if "proc" in _WORKER and _WORKER["proc"].poll() is None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
      # interrupted: its results are not needed
      os.killpg(_WORKER["proc"].pid, signal.SIGKILL)
    _WORKER["proc"].wait()  # an xdist worker waits: another may need them
  if not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ[_FOUR_DEVICES], ignore_errors=True)


@pytest.fixture(scope="session")
def four_devices():
  """The worker's output directory, once it has finished."""
  out = pathlib.Path(os.environ[_FOUR_DEVICES])
  deadline = time.monotonic() + 1800
  while not (out / "exit").exists():
    assert time.monotonic() < deadline, "the 4-device worker did not finish"
    time.sleep(0.5)
  code = (out / "exit").read_text().strip()
  assert code == "0", (out / "worker.log").read_text()[-4000:]
  return out
