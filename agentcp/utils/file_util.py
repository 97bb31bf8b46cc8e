"""What a local file is: name, size and kind (``get_file_info``), for file blocks and file streams (api.md §10).

The kind comes from the extension when it is a known one, otherwise from the first bytes of the file: ``png``,
``jpg``, ``gif``, ``pdf``, ``zip``, ``txt``, ``binary``, or ``unknown`` when the file cannot be read. Nothing here
raises: a problem is reported in the ``error`` field.
"""
from __future__ import annotations

import os
from typing import Any, Dict

__all__ = ["get_file_info"]

_BY_EXTENSION = {
    ".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".gif": "gif", ".pdf": "pdf", ".zip": "zip", ".txt": "txt",
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"%PDF-", "pdf"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty archive
)
#: Bytes read to tell text from binary (enough for every magic number above).
_SNIFF = 512


def _sniff(head: bytes) -> str:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\x00" in head:
        return "binary"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the sniff window is still text.
        if exc.start < len(head) - 3:
            return "binary"
    return "txt"


def _detect_file_type(file_path: str) -> str:
    """The kind of ``file_path``: from a known extension, else from its first bytes; ``unknown`` if unreadable."""
    kind = _BY_EXTENSION.get(os.path.splitext(str(file_path))[1].lower())
    if kind is not None:
        return kind
    try:
        with open(file_path, "rb") as fh:
            return _sniff(fh.read(_SNIFF))
    except (OSError, TypeError, ValueError):
        return "unknown"


def get_file_info(file_path: str) -> Dict[str, Any]:
    """``{"file_name", "file_size", "file_type", "exists", "error"}`` of ``file_path``; never raises."""
    info: Dict[str, Any] = {"file_name": "", "file_size": 0, "file_type": "unknown", "exists": False, "error": ""}
    try:
        info["file_name"] = os.path.basename(file_path)
        if not os.path.isfile(file_path):
            info["error"] = "not a file" if os.path.exists(file_path) else "file does not exist"
            return info
        info["file_size"] = os.path.getsize(file_path)
        info["exists"] = True
        info["file_type"] = _detect_file_type(file_path)
    except (OSError, TypeError, ValueError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info
