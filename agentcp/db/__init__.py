"""Local SQLite history (``agentcp.db.db_mananger.DBManager``; the module name keeps 0.1.99's spelling)."""
from __future__ import annotations

from .db_mananger import DBManager

__all__ = ["DBManager"]
