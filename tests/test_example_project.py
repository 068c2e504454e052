"""The README's demo: plain Celery against ordered_tasks on the example project."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import REDIS_URL, require

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_demo_leaves_no_inconsistent_account_under_ordered_tasks(tmp_path: Path) -> None:
    require(REDIS_URL, 6379, "redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TEST_"))}
    env.update(CELERY_BROKER_URL=REDIS_URL.rsplit("/", 1)[0] + "/13",
               EXAMPLE_SQLITE_PATH=str(tmp_path / "demo.sqlite3"),
               ORDERED_QUEUE_PREFIX=f"demo.{os.getpid()}")
    out = subprocess.run(
        [sys.executable, "example_project/manage.py", "demo", "--accounts", "30", "--workers", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("accounts left inconsistent"))
    _plain, ordered = re.findall(r"(\d+)/30", line)
    assert ordered == "0", out.stdout
    events = next(x for x in out.stdout.splitlines() if x.startswith("events run out of order"))
    assert events.split()[-1] == "0", out.stdout
