"""Every importable public name of agentcp 0.1.99 (tests/api_surface_0199.json) exists here, checked strictly.

For each module of the list: the same module imports, each listed name is an attribute of it, and every function,
method (inherited members included) and constructor takes 0.1.99's parameters first, under the same names and in
the same order. Parameters this release added come only after them and are optional (they have a default, or are
``*args``/``**kwargs``), so every call written for 0.1.99 still binds the same way.

A class counts as one name plus one per listed member; a function counts as one name: 594 names in all.

``python tests/test_api_surface.py`` prints the count and every failure without pytest.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "api_surface_0199.json"), encoding="utf-8") as _fh:
    SURFACE: Dict[str, Dict[str, dict]] = json.load(_fh)["modules"]

TOTAL_NAMES = 594

# Entries built on other branches, checked by test_pending (xfail, not strict) until those branches are merged. Keys
# are "module", "module:Name" or "module:Class.member"; a module key covers every entry in it. Empty: the file client
# and the local LLM gateway are in.
PENDING: frozenset = frozenset()

Entry = Tuple[str, str, Optional[str]]  # (module, name, member or None)


def _key(entry: Entry) -> str:
    module, name, member = entry
    return f"{module}:{name}.{member}" if member else f"{module}:{name}"


def _is_pending(entry: Entry) -> bool:
    module, name, _member = entry
    return module in PENDING or f"{module}:{name}" in PENDING or _key(entry) in PENDING


def entries(module: str) -> Iterator[Entry]:
    """Every counted name of one module: functions, classes and each listed class member."""
    for name, spec in SURFACE[module].items():
        yield (module, name, None)
        if spec["kind"] == "class":
            for member in spec["members"]:
                yield (module, name, member)


def _expected(entry: Entry) -> Optional[List[str]]:
    module, name, member = entry
    spec = SURFACE[module][name]
    if member is not None:
        return spec["members"][member]
    if spec["kind"] == "function":
        return spec["params"]
    return None  # the class itself: it must exist and be a class


def _member_function(cls: type, member: str):
    """What ``Class.member`` gives, as a function with the parameters the list records (self/cls included)."""
    try:
        raw = inspect.getattr_static(cls, member)
    except AttributeError:
        raise AttributeError(f"{cls.__qualname__} has no member {member!r}") from None
    if isinstance(raw, classmethod):
        return raw.__func__  # the list records cls
    if isinstance(raw, property):
        raise TypeError(f"{cls.__qualname__}.{member} is a property, 0.1.99 had a method")
    return getattr(cls, member)  # plain and static functions; descriptors as the class sees them


def _signature_problem(where: str, func, expected: List[str]) -> Optional[str]:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as exc:
        return f"{where}: no signature ({exc})"
    names = [p.name for p in params]
    # *args/**kwargs of 0.1.99 are matched by name and by kind
    if names[: len(expected)] != expected:
        return f"{where}: parameters {names}, 0.1.99 had {expected}"
    for p in params[len(expected):]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return f"{where}: added parameter {p.name!r} has no default"
    return None


def check(entry: Entry) -> Optional[str]:
    """None when the entry is there exactly as 0.1.99 had it, otherwise what is wrong."""
    module, name, member = entry
    where = _key(entry)
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure is a missing module to the user  # noqa: BLE001
        return f"{module}: module does not import ({type(exc).__name__}: {exc})"
    if not hasattr(mod, name):
        return f"{module}:{name}: name is absent"
    obj = getattr(mod, name)
    kind = SURFACE[module][name]["kind"]
    if member is None:
        if kind == "class" and not inspect.isclass(obj):
            return f"{where}: is {type(obj).__name__}, 0.1.99 had a class"
        if kind == "function" and not callable(obj):
            return f"{where}: is not callable, 0.1.99 had a function"
        if kind == "class":
            return None
        return _signature_problem(where, obj, _expected(entry))
    if not inspect.isclass(obj):
        return f"{where}: {name} is not a class"
    try:
        func = _member_function(obj, member)
    except (AttributeError, TypeError) as exc:
        return f"{where}: {exc}"
    return _signature_problem(where, func, _expected(entry))


def all_entries() -> List[Entry]:
    return [e for module in SURFACE for e in entries(module)]


def summary() -> Tuple[int, List[str], List[str]]:
    """(passing count, failures outside PENDING, failures inside PENDING)."""
    passed, failed, pending = 0, [], []
    for entry in all_entries():
        problem = check(entry)
        if problem is None:
            passed += 1
        elif _is_pending(entry):
            pending.append(problem)
        else:
            failed.append(problem)
    return passed, failed, pending


def test_surface_copy_is_current():
    shared = "/work/shared/protocol/api_surface_0199.json"
    if not os.path.exists(shared):
        pytest.skip("shared surface list not present on this machine")
    with open(shared, encoding="utf-8") as fh:
        assert json.load(fh)["modules"] == SURFACE


def test_surface_counts_594_names():
    assert len(all_entries()) == TOTAL_NAMES
    assert len(SURFACE) == 55


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_module(module):
    """Every non-pending entry of one module, all problems listed at once."""
    mine = [e for e in entries(module) if not _is_pending(e)]
    if module in PENDING:
        pytest.skip(f"{module} is PENDING (built on another branch)")
    if not mine:
        importlib.import_module(module)  # a module with no names must still import
        return
    problems = [p for p in (check(e) for e in mine) if p is not None]
    assert not problems, f"{module}: {len(problems)} of {len(mine)} names differ from 0.1.99:\n  " + "\n  ".join(
        problems
    )


PENDING_ENTRIES = [e for e in all_entries() if _is_pending(e)]
PENDING_EMPTY_MODULES = sorted(m for m in PENDING if ":" not in m and not SURFACE.get(m))


@pytest.mark.xfail(strict=False, reason="built on another branch")
@pytest.mark.parametrize("entry", PENDING_ENTRIES, ids=_key)
def test_pending(entry):
    problem = check(entry)
    assert problem is None, problem


@pytest.mark.xfail(strict=False, reason="built on another branch")
@pytest.mark.parametrize("module", PENDING_EMPTY_MODULES)
def test_pending_module_imports(module):
    importlib.import_module(module)


def test_summary(capsys):
    """All 594 names minus PENDING pass; the count is printed (pytest -s, or python tests/test_api_surface.py)."""
    passed, failed, pending = summary()
    with capsys.disabled():
        print(f"\napi surface 0.1.99: {passed} of {TOTAL_NAMES} names pass; {len(pending)} pending on other branches")
    assert not failed, f"{len(failed)} names differ from 0.1.99:\n  " + "\n  ".join(failed)
    assert passed + len(pending) == TOTAL_NAMES


if __name__ == "__main__":
    _passed, _failed, _pending = summary()
    print(f"{_passed} of {TOTAL_NAMES} names pass ({100 * _passed // TOTAL_NAMES} %); {len(_failed)} fail; "
          f"{len(_pending)} pending on other branches")
    for _label, _problems in (("FAIL    ", _failed), ("PENDING ", _pending)):
        for _p in dict.fromkeys(_problems):  # a missing module once, not once per name
            print(_label, _p)
