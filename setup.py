"""Packaging of ordered_tasks."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="django-ordered-tasks",
    version="0.1.0",
    description="Per-key ordered execution of Celery tasks for Django projects.",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["ordered_tasks", "ordered_tasks.*"]),
    package_data={"ordered_tasks": ["py.typed", "templates/admin/ordered_tasks/*.html",
                                    "templates/admin/ordered_tasks/*/*.html"]},
    python_requires=">=3.10",
    install_requires=[
        "Django>=4.2,!=5.0.*,!=5.1.*,<7",
        "celery[redis]>=5.5,<5.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-django>=4.8",
            "psycopg[binary]>=3.1",
            "django-celery-results>=2.5",
            "selenium>=4.20",
            "import-linter>=2.1",
            "prometheus_client>=0.17",
            "PyYAML>=6",
            "matplotlib>=3.7",
        ],
        "demo": ["django-celery-results>=2.5", "matplotlib>=3.7"],
        "bench": ["psycopg[binary]>=3.1", "matplotlib>=3.7"],
        "lint": ["ruff>=0.6", "mypy>=1.10", "django-stubs>=5.0", "celery-types>=0.22", "import-linter>=2.1"],
        "docs": ["sphinx>=7"],
        # Prometheus metrics of the ordered workers (ORDERED_TASKS["METRICS_PORT"]).
        "metrics": ["prometheus_client>=0.17"],
    },
    classifiers=[
        "Framework :: Django",
        "Framework :: Celery",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)
