"""Sphinx configuration: MyST for prose, autodoc + autosummary for the API (as optax and flax).

Builds offline (no intersphinx): `make docs` = `sphinx-build -W --keep-going docs docs/_build/html`.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import galore_jax  # noqa: E402

project = "galore-jax"
author = "galore-jax authors"
copyright = "the galore-jax authors, Apache-2.0"  # noqa: A001 (Sphinx's name)
version = release = galore_jax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# The included repository pages (BENCHMARKS.md, the results files) start at any heading level.
suppress_warnings = ["myst.header"]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # NamedTuple "Attributes:" as fields, not a second copy of each member
# Annotations stay as written (`from __future__ import annotations`: strings, not resolved).
autodoc_typehints = "signature"

html_theme = "furo"
html_title = f"galore-jax {release}"


def _results_pages(app) -> None:
  """docs/benchmarks/results/<x>.md, one page per results file, so that BENCHMARKS.md's links
  (`benchmarks/results/<x>.md`) resolve inside the site as they do on the repository."""
  out = Path(app.srcdir) / "benchmarks" / "results"
  out.mkdir(parents=True, exist_ok=True)
  for f in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
    page = out / f.name
    text = f"```{{include}} ../../../benchmarks/results/{f.name}\n```\n"
    if not page.exists() or page.read_text() != text:  # unchanged pages are not rebuilt
      page.write_text(text)
  for f in sorted((ROOT / "benchmarks" / "results").glob("*.png")):  # their plots, beside them
    if not (out / f.name).exists() or (out / f.name).read_bytes() != f.read_bytes():
      shutil.copyfile(f, out / f.name)


def setup(app):
  app.connect("builder-inited", _results_pages)
