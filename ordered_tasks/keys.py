"""Finding the ordering key of a task call in its arguments."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence, Union

from .exceptions import InvalidKeyError
from .partitioning import canonical_key

KeySource = Union[str, int, Callable[..., object]]


class KeySpec:
    """Where a task's ordering key lives: a parameter name, an index or a callable."""

    def __init__(self, *, name: str | None = None, index: int | None = None,
                 func: Callable[..., object] | None = None, task_name: str = "") -> None:
        self.name = name
        self.index = index
        self.func = func
        self.task_name = task_name

    @classmethod
    def for_function(cls, key: object, fun: Callable[..., Any], *, bind: bool = False) -> KeySpec:
        """Spec for ``@ordered_task(key=...)`` on ``fun``; a typo fails here, at import."""
        label = f"{fun.__module__}.{fun.__qualname__}"
        if callable(key):
            return cls(func=key, task_name=label)
        if not isinstance(key, str) or not key:
            raise InvalidKeyError(
                f"@ordered_task(key=...) on {label} got {key!r}. Pass the name of the "
                "task parameter that holds the account key, or a callable that "
                "receives the task's args and kwargs and returns it."
            )
        params = list(inspect.signature(fun).parameters.values())
        if bind and params:
            params = params[1:]
        for position, param in enumerate(params):
            if param.name != key:
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                break
            positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            return cls(name=key, index=position if positional else None, task_name=label)
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return cls(name=key, task_name=label)
        names = ", ".join(p.name for p in params) or "no parameters"
        raise InvalidKeyError(
            f"@ordered_task(key={key!r}) on {label}: the task has no parameter "
            f"{key!r} (it has {names}). Name one of its parameters."
        )

    @classmethod
    def for_route(cls, key: str | int, task_name: str) -> KeySpec:
        """Spec from ``ORDERED_TASKS["ROUTES"]``: a keyword name or a positional index."""
        if isinstance(key, int):
            return cls(index=key, task_name=task_name)
        return cls(name=key, task_name=task_name)

    def extract(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> object:
        """The raw key of one call; InvalidKeyError when it is not there."""
        args = args or ()
        kwargs = kwargs or {}
        if self.func is not None:
            try:
                return self.func(*args, **kwargs)
            except Exception as exc:
                raise InvalidKeyError(
                    f"The key function of {self.task_name} raised {exc!r} for "
                    f"args={args!r} kwargs={kwargs!r}. Make it return the account key."
                ) from exc
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name]
        if self.index is not None and self.index < len(args):
            return args[self.index]
        where = f"the keyword argument {self.name!r}" if self.name else f"positional argument {self.index}"
        raise InvalidKeyError(
            f"{self.task_name} was published without its ordering key ({where}). "
            f"Pass it, preferably by keyword (chains prepend the parent's result to args)."
        )

    def canonical(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> str:
        """The canonical key string of one call."""
        try:
            return canonical_key(self.extract(args, kwargs))
        except InvalidKeyError as exc:
            if str(exc).startswith(self.task_name):
                raise
            raise InvalidKeyError(f"{self.task_name}: {exc}") from None
