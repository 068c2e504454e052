"""Sphinx configuration of the ordered_tasks documentation."""

from __future__ import annotations

import sys
from pathlib import Path

import django
from django.conf import settings

# Make the package importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# autodoc imports ordered_tasks, which needs configured Django settings.
if not settings.configured:
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "ordered_tasks",
        ],
        DATABASES={},
        USE_TZ=True,
    )
django.setup()

import ordered_tasks  # noqa: E402

project = "ordered_tasks"
release = ordered_tasks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
html_title = f"ordered_tasks {release}"
html_static_path = ["_static"]
