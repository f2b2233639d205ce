"""Writes the site's benchmark pages from what the benchmarks wrote.

``BENCHMARKS.md`` (the tables and their reading) becomes ``results/index.md``
with its links moved to the site; every ``benchmarks/results/*.md`` (each
benchmark's raw output) becomes a page of its own beside it, and the plots and
ledgers are copied so that those pages can show and link them. Nothing is
retyped: a benchmark that writes a new table changes the site at the next
build.
"""

from __future__ import annotations

import pathlib
import re
import shutil

# Links in BENCHMARKS.md that point at the repository rather than the site.
_RESULTS_LINK = re.compile(r"\]\(benchmarks/results/")
_SOURCE_LINK = re.compile(
    r"\[([^\]]+)\]\(((?:train|models|galore_optax)/[^)]+)\)"
)


def write_pages(results: pathlib.Path, out: pathlib.Path) -> None:
  """Writes ``out/index.md`` and one page per raw table of ``results``."""
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  raw = sorted(results.glob("*.md"))
  for f in sorted(results.iterdir()):
    if f.suffix in (".png", ".json", ".jsonl"):
      shutil.copy2(f, out / f.name)
  for f in raw:
    text = f.read_text()
    # every raw table starts with the command that wrote it and the machine
    (out / f.name).write_text(f"# Raw results: {f.stem}\n\n{text}")
  benchmarks = (results.parents[1] / "BENCHMARKS.md").read_text()
  benchmarks = _RESULTS_LINK.sub("](", benchmarks)
  benchmarks = _SOURCE_LINK.sub(r"`\2`", benchmarks)
  toc = "\n".join(f.stem for f in raw)
  index = (
      benchmarks
      + "\n\n## Raw results\n\nEach benchmark's own output, as it wrote it.\n\n"
      + f"```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n"
  )
  (out / "index.md").write_text(index)
