"""Methods 0.1.99 declared without ``self``.

0.1.99 defined e.g. ``DBManager.save_message(message)`` with no ``self``: called on the class it did nothing,
called on an instance it raised ``TypeError``. :func:`selfless` keeps the 0.1.99 signature on the class and makes
the instance call the real method.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, cast

__all__ = ["selfless"]

log = logging.getLogger("agentcp.legacy")


class selfless:  # noqa: N801 - used as a decorator
    """Decorator: ``obj.name(...)`` is the decorated method; ``Class.name(...)`` (0.1.99's only working form) has
    the method's parameters without ``self``, logs a warning that nothing was done, and returns ``False``."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(cast(Any, self), func)  # a descriptor, not a callable: copy the metadata anyway
        self._on_class = self._make_class_call(func)

    @staticmethod
    def _make_class_call(func: Callable[..., Any]) -> Callable[..., Any]:
        import inspect

        sig = inspect.signature(func)
        params = list(sig.parameters.values())[1:]  # without self

        @functools.wraps(func)
        def on_class(*args: Any, **kwargs: Any) -> bool:
            log.warning("%s called on the class, not on an instance: nothing was done (0.1.99 did nothing "
                        "either); call it on an instance", func.__qualname__)
            return False

        on_class.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return on_class

    def __get__(self, obj: Any, objtype: Any = None) -> Callable[..., Any]:
        if obj is None:
            return self._on_class
        return self.func.__get__(obj, objtype)
