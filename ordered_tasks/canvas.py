"""Publish-time checks of the ordered tasks a message carries for later: chain steps, links, errbacks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery

from .exceptions import InvalidKeyError, UnsafeOptionError
from .options import check_publish_options
from .routing import key_spec_for


class _ParentResult:
    """Stands for the result Celery prepends to a mutable signature's arguments when it runs."""

    def __repr__(self) -> str:
        return "<the previous task's result>"


_PARENT_RESULT = _ParentResult()


def check_canvas(app: Celery, name: str, embed: Mapping[str, Any] | None) -> None:
    """Refuse a message whose chain, links or errbacks hold an ordered task that would fail later.

    Without this, an unsafe option (``countdown``, ``queue`` ...) or a key
    that is not there on a later step surfaces only in the worker, after the
    first task ran: the first task is marked failed although it succeeded
    and the rest of the chain is dropped.
    """
    if not embed:
        return
    steps: list[Any] = [*(embed.get("chain") or ()), *(embed.get("callbacks") or ()),
                        *(embed.get("errbacks") or ())]
    for step in _flatten(steps):
        _check_step(app, name, step)


def _flatten(steps: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    """Every task signature in ``steps``, with those of groups and chains inside them."""
    for step in steps:
        if not isinstance(step, Mapping):
            continue
        inner = (step.get("kwargs") or {}).get("tasks") if step.get("subtask_type") else None
        if isinstance(inner, (list, tuple)):
            yield from _flatten(inner)
        elif not step.get("subtask_type"):
            yield step


def _check_step(app: Celery, first: str, step: Mapping[str, Any]) -> None:
    name = step.get("task")
    if not isinstance(name, str):
        return
    spec = key_spec_for(app, name)
    if spec is None:
        return
    where = f"{name}, a later step of a message of {first}"
    check_publish_options(where, step.get("options") or {})
    args = list(step.get("args") or ())
    kwargs = step.get("kwargs") or {}
    mutable = not step.get("immutable")
    if mutable:
        args.insert(0, _PARENT_RESULT)
    how = ("Pass the key by keyword (.s(account_id=...)) or make the signature immutable "
           "(.si(...)): Celery prepends the previous result to a mutable signature's "
           "positional arguments.")
    if mutable and spec.func is None and (spec.name is None or spec.name not in kwargs):
        raise UnsafeOptionError(f"{where} takes its ordering key by position, which the previous "
                                f"task's result shifts. {how}")
    if mutable and spec.func is not None:
        return  # a key function may read the key from the previous result: known only then
    try:
        spec.canonical(args, kwargs)
    except InvalidKeyError as exc:
        raise UnsafeOptionError(f"{where} would run without a usable ordering key: {exc} {how}") from None
