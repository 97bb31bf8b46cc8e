"""Names and values that become local paths or network addresses, checked before use (trust.md rule 5).

Pure functions, no I/O except :func:`resolve_inside` (which resolves symlinks on disk):

* :func:`check_aid` — an AID (or a guest AID from the CA) is a DNS name, so it can never name a path outside the
  identity folder: labels of letters, digits and ``-``, 1-63 characters, no leading or trailing ``-``, at most 253
  characters in all; no ``/``, ``\\``, NUL, empty labels (so no ``..``), no absolute paths.
  ``strict=True`` (new identities) follows trust.md exactly: lower case only, upper case is folded (DNS names are
  case-insensitive). Without it (identities already on disk) upper case and ``_`` are accepted verbatim, because
  agentcp 0.1.99 stored whatever name it was given and the directories of such identities must keep loading.
* :func:`resolve_inside` — a file name given to a file API, resolved (symlinks included) and refused unless it
  stays inside its folder.
* :func:`check_port` / :func:`check_host` — a port and a server address from a server reply, strictly typed.
"""
from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

__all__ = ["InvalidNameError", "check_aid", "is_valid_aid", "resolve_inside", "check_port", "check_host"]

MAX_NAME = 253
_STRICT_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Stored 0.1.99 identities may carry upper case or '_' (it never validated names); still no path syntax.
_STORED_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DIGITS = re.compile(r"[0-9]{1,5}")


class InvalidNameError(ValueError):
    """A name or value that is not allowed where it was used; the message names the field and the rule."""


def _rule(strict: bool) -> str:
    chars = "a-z, 0-9 and '-'" if strict else "letters, digits, '_' and '-'"
    return (f"a DNS name: dot-separated labels of {chars}, 1-63 characters each, not starting or ending with '-', "
            f"at most {MAX_NAME} characters")


def check_aid(value: Any, *, field: str = "AID", strict: bool = False) -> str:
    """``value`` if it is a valid AID (lower-cased when ``strict``); :class:`InvalidNameError` (a ValueError) naming
    ``field`` otherwise, and TypeError for a non-string."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string like 'alice.example.com', got {type(value).__name__}")
    name = value.lower() if strict else value
    if not name:
        raise InvalidNameError(f"{field} must not be empty; it must be {_rule(strict)}")
    if len(name) > MAX_NAME:
        raise InvalidNameError(f"{field} is {len(name)} characters long; it must be {_rule(strict)}")
    label = _STRICT_LABEL if strict else _STORED_LABEL
    for part in name.split("."):
        if not label.fullmatch(part):
            raise InvalidNameError(f"invalid {field} {value!r}: label {part!r} is not allowed; it must be "
                                   f"{_rule(strict)}")
    return name


def is_valid_aid(name: Any) -> bool:
    """True if :func:`check_aid` (not strict) accepts ``name``: e.g. to skip directories that are not identities."""
    try:
        check_aid(name)
        return True
    except (TypeError, ValueError):
        return False


def resolve_inside(root: str, name: Any, *, field: str = "file name") -> str:
    """The real path of ``name`` (relative to ``root``, or absolute) if it lies inside ``root`` once every symlink
    is resolved; :class:`InvalidNameError` naming ``field`` otherwise (``..``, an absolute path elsewhere, a symlink
    pointing out, NUL)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"{field} must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise InvalidNameError(f"{field} {name!r} contains a NUL character")
    real_root = os.path.realpath(root)
    candidate = name if os.path.isabs(name) else os.path.join(real_root, name)
    real = os.path.realpath(candidate)
    try:
        inside = os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # different drives (Windows)
        inside = False
    if not inside or real == real_root:
        raise InvalidNameError(f"{field} {name!r} leads outside the folder {root} (after resolving '..' and "
                               "symlinks); refused")
    return real


def check_port(value: Any, *, field: str = "port") -> int:
    """A TCP/UDP port from a server: an int in 1..65535 or a string of decimal digits. ``True``, ``1.9`` or
    ``"80x"`` are refused (:class:`InvalidNameError` naming ``field``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidNameError(f"{field} must be an integer 1-65535, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise InvalidNameError(f"{field} must be an integer 1-65535, got {value[:20]!r}")
        value = int(value)
    if not 0 < value < 65536:
        raise InvalidNameError(f"{field} must be an integer 1-65535, got {value}")
    return value


def check_host(value: Any, *, field: str = "server_ip") -> str:
    """A host from a server reply: an IP address or a DNS host name, nothing else (no NUL, spaces, ports, paths,
    user info). Returned unchanged; :class:`InvalidNameError` naming ``field`` otherwise."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError(f"{field} must be a non-empty host name or IP address, got {value!r}")
    if len(value) > MAX_NAME:
        raise InvalidNameError(f"{field} is {len(value)} characters long; a host name has at most {MAX_NAME}")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    from agentcp.base.trust import url_host

    try:
        _scheme, host = url_host(f"http://{value}")
    except ValueError as exc:
        raise InvalidNameError(f"{field} {value[:80]!r} is not a host name or IP address ({exc})") from None
    if host != value.lower().rstrip("."):
        raise InvalidNameError(f"{field} {value[:80]!r} is not a bare host name or IP address")
    return value
