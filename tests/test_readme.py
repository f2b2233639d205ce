"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(capsys):
  blocks = _python_blocks()
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  assert "of AdamW's" in capsys.readouterr().out
  assert namespace["state"] is not None
