"""Sphinx configuration of the galore-optax site: ``sphinx-build -W docs
docs/_build/html`` (offline).

Sphinx rather than MkDocs: the docstrings are written as optax's are, with
reStructuredText roles (``:func:``, double-backquoted literals) that autodoc
and napoleon render and mkdocstrings would print as they are. Guides are
Markdown (MyST).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's galore_optax, and docs.results

import galore_optax  # noqa: E402
from docs import results  # noqa: E402

project = "galore-optax"
author = "the galore-optax authors"
release = version = galore_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# The raw result pages keep the headings their benchmarks wrote.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"galore-optax {version}"

# The benchmark pages are written from benchmarks/results at every build, so
# they show what the benchmarks wrote, never a retyped copy.
results.write_pages(ROOT / "benchmarks" / "results", ROOT / "docs" / "results")
