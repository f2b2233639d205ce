"""What `pip install .` puts in site-packages: the library alone, with its
metadata."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_library(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "wheel",
          "-v",
          "--no-deps",
          "--no-build-isolation",
          "-w",
          str(tmp_path),
          str(ROOT),
      ],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # e.g. a TOML-table license
  assert "DeprecationWarning" not in proc.stdout + proc.stderr
  (wheel,) = tmp_path.glob("galore_optax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names}
  assert top == {
      "galore_optax",
      next(t for t in top if t.endswith(".dist-info")),
  }  # no train/, models/
  assert (
      "galore_optax/transform.py" in names
      and "galore_optax/refresh.py" in names
  )
  metadata = (
      zipfile.ZipFile(wheel)
      .read(next(n for n in names if n.endswith("METADATA")))
      .decode()
  )
  assert "License-Expression: Apache-2.0" in metadata
