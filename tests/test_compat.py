"""The private Celery and kombu names ordered_tasks relies on still exist with the expected shape."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from kombu.utils.imports import symbol_by_name

from ordered_tasks.compat import PRIVATE_NAMES, Private

PACKAGE = Path(__file__).resolve().parent.parent / "ordered_tasks"


def _assigned_in_source(owner: Any, name: str) -> bool:
    """Whether a class (or one of its bases) assigns ``self.<name>`` or defines ``name``."""
    for cls in inspect.getmro(owner):
        if name in vars(cls):
            return True
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*(:[^=]*)?=", source):
            return True
    return False


@pytest.mark.parametrize("private", PRIVATE_NAMES, ids=lambda p: f"{p.owner}.{p.name}")
def test_each_private_name_still_exists_with_its_shape(private: Private) -> None:
    owner = symbol_by_name(private.owner)
    if private.since is not None:
        version = importlib.metadata.version(private.owner.split(".")[0])
        if tuple(int(part) for part in version.split(".")[:2]) < private.since:
            pytest.skip(f"{private.name} is new in {private.owner.split('.')[0]} {private.since}")
    if private.parameters is None:
        found = hasattr(owner, private.name) or (inspect.isclass(owner) and _assigned_in_source(owner, private.name))
        assert found, f"{private.owner} no longer has {private.name}: see ordered_tasks.compat"
        return
    member = getattr(owner, private.name, None)
    assert callable(member), f"{private.owner}.{private.name} is no longer a method: see ordered_tasks.compat"
    parameters = list(inspect.signature(member).parameters)
    if inspect.isclass(owner):
        parameters = parameters[1:]  # self
    missing = [p for p in private.parameters if p not in parameters]
    assert not missing, f"{private.owner}.{private.name} lost its parameters {missing}: see ordered_tasks.compat"


def test_a_removed_name_fails_the_check() -> None:
    with pytest.raises(AssertionError, match="no longer has"):
        test_each_private_name_still_exists_with_its_shape(Private("kombu.transport.redis:Channel", "_gone"))
    with pytest.raises(AssertionError, match="lost its parameters"):
        test_each_private_name_still_exists_with_its_shape(
            Private("kombu.transport.redis:Channel", "_brpop_start", ("deadline",)))


def test_no_class_swap_or_bound_method_patch_outside_the_compatibility_module() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py" and path.parent == PACKAGE:
            continue
        text = path.read_text()
        for pattern in (r"\.__class__\s*=", r"\bMethodType\("):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(PACKAGE)}: {pattern}")
    assert offenders == []


def test_every_private_name_used_by_the_package_is_listed() -> None:
    """Celery and kombu names with a leading underscore that the package reads are all in the list."""
    listed = {p.name for p in PRIVATE_NAMES}
    own = set()
    used = set()
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        text = path.read_text()
        own |= set(re.findall(r"(?:def|class)\s+(_\w+)", text))
        own |= set(re.findall(r"^\s*(_\w+)\s*[:=]", text, flags=re.M))
        own |= set(re.findall(r"self\.(_\w+)\s*(?::[^=\n]*)?=", text))
        used |= set(re.findall(r"\b(?:channel|qos|hub|raw|state|app|step|transport|connection|_state)\.(_[a-z]\w*)",
                               text))
    unlisted = sorted(used - listed - own - {"_meta"})
    assert unlisted == [], f"private names used but not listed in ordered_tasks.compat: {unlisted}"
