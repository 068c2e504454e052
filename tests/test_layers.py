"""The layers: a process that publishes, replays and shows the admin never loads the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: A web process: publish (decorated and routed by name), replay and skip, the admin pages.
WEB_PROCESS = textwrap.dedent("""
    import json, sys
    import django
    django.setup()
    from django.test.utils import setup_test_environment
    setup_test_environment()
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    import ordered_tasks
    from ordered_tasks.models import AccountState
    from tests.testapp.celery import app
    from tests.testapp.tasks import ordered_record

    ordered_record.delay(run="layers", key="k-1", seq=1)
    ordered_record.apply_async(kwargs={"run": "layers", "key": "k-1", "seq": 2})
    app.send_task("events.external_record", kwargs={"run": "layers", "key": "k-2", "seq": 1})
    state = AccountState.objects.create(key="k-1", partition=ordered_tasks.partition_for("k-1"),
                                        status="blocked")
    ordered_tasks.replay("k-1", requested_by="web")
    ordered_tasks.skip("k-1", requested_by="web")

    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    pages = {name: client.get(reverse(name, args=args)).status_code for name, args in (
        ("admin:ordered_tasks_accountstate_changelist", ()),
        ("admin:ordered_tasks_accountstate_change", (state.pk,)),
        ("admin:ordered_tasks_partitions", ()))}
    print(json.dumps({
        "pages": pages,
        "worker": sorted(m for m in sys.modules if m.startswith("ordered_tasks.worker")),
        "redis_transport": "kombu.transport.redis" in sys.modules,
    }))
""")


def test_a_web_process_never_loads_the_worker_nor_kombus_redis_transport() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "TEST_DATABASE": "sqlite",
           "TEST_BROKER_URL": "memory://", "TEST_REDIS_URL": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WEB_PROCESS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["pages"] == {"admin:ordered_tasks_accountstate_changelist": 200,
                               "admin:ordered_tasks_accountstate_change": 200,
                               "admin:ordered_tasks_partitions": 200}
    assert report["worker"] == []
    assert report["redis_transport"] is False


def test_the_import_contract_holds() -> None:
    """``lint-imports`` (import-linter) checks the layers of ``pyproject.toml``."""
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout
