"""The documentation cannot go stale: the README's and the site's Python blocks
run as written, every docstring example runs, and every public name of
galore_optax has an entry in the API pages."""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import galore_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [
    p for p in PAGES if "_build" not in p.parts and "results" not in p.parts
]
MODULES = [
    importlib.import_module(f"galore_optax.{m.name}")
    for m in pkgutil.iter_modules(galore_optax.__path__)
]


def _python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if _python_blocks(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_python_blocks_of_the_page_run_in_order(page, capsys):
  blocks = _python_blocks(page)
  namespace = {}
  for block in blocks:
    exec(compile(block, str(page), "exec"), namespace)
  if page.name == "README.md":
    # the quick start; the README's other example (inject_hyperparams) moved
    # to docs/guides/training-loop.md, whose blocks this test runs too
    assert blocks
    assert "of AdamW's" in capsys.readouterr().out  # the memory table
    assert namespace["state"] is not None


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, optionflags=flags, verbose=False)
  assert result.failed == 0


def test_every_public_alias_has_an_example():
  aliases = importlib.import_module("galore_optax.alias")
  public = [
      name
      for name, fn in inspect.getmembers(aliases, inspect.isfunction)
      if fn.__module__ == aliases.__name__ and not name.startswith("_")
  ]
  assert len(public) == 10
  missing = [n for n in public if ">>>" not in (getattr(aliases, n).__doc__)]
  assert not missing, f"aliases without a runnable example: {missing}"


def test_every_public_name_has_an_api_entry():
  text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
  documented = set(
      re.findall(r"\.\. (?:auto\w+|py:\w+):: (?:galore_optax\.)?(\w+)", text)
  )
  missing = sorted(set(galore_optax.__all__) - documented)
  assert not missing, f"public names without an API entry: {missing}"
  assert sorted(galore_optax.__all__) == sorted(
      name
      for name in dir(galore_optax)
      if not name.startswith("_")
      and not inspect.ismodule(getattr(galore_optax, name))
  )
