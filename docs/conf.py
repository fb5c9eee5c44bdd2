"""Sphinx configuration: the Markdown pages of docs/ (MyST) and an API reference from the
docstrings (autodoc, Google style through napoleon). Built by ``nox -s docs`` with warnings as
errors."""

from __future__ import annotations

project = "selfupgrade"
author = "selfupgrade developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "selfupgrade"
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
