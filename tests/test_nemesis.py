"""A short seeded nemesis run per broker: random workload and faults, then the checker over the history.

``NEMESIS_SEED`` replays a seed (default: a random one, printed; a fixed one in CI). ``NEMESIS_PROFILE=long``
runs the long plan; ``NEMESIS_ENABLE`` / ``NEMESIS_DISABLE`` take comma-separated switches
(``all`` enables every switch but the disruptive ones). ``python -m tests.nemesis`` loops seeds.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import redis
from celery import Celery

from tests.nemesis.runner import plan, run
from tests.services import in_ci

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


#: The seed of CI runs, where a red run must mean a regression: random seeds explore in the
#: long run (``python -m tests.nemesis``) and in local runs. It draws threads x 4 and WINDOW 16,
#: so that hot keys spill.
CI_SEED = 7


def test_nemesis(app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    chosen = os.environ.get("NEMESIS_SEED") or (CI_SEED if in_ci() else None)
    seed = int(chosen) if chosen is not None else random.SystemRandom().randrange(1_000_000)
    name = "redis" if broker.startswith("redis") else "rabbitmq"
    print(f"nemesis seed {seed} on {name} (replay with NEMESIS_SEED={seed})")
    the_plan = plan(os.environ.get("NEMESIS_PROFILE", "ci"), name, os.environ.get("NEMESIS_ENABLE", ""),
                    os.environ.get("NEMESIS_DISABLE", ""))
    outcome = run(app, name, start_workers, results, seed, the_plan)
    print(outcome.report())
    assert not outcome.violations, outcome.report()
