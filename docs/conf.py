"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``.

The pages are Markdown (MyST); the API reference comes from the docstrings
(reStructuredText with ``:param:`` and ``:ivar:``) through autodoc.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

project = "txcolombe"
author = "the txcolombe authors"
copyright = "the txcolombe authors"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Twisted's modules are imported, not mocked: the reference shows real signatures.

html_theme = "alabaster"
html_title = "txcolombe"
html_theme_options = {"description": "Send email from Twisted", "fixed_sidebar": True}
