"""Environment variables read by the SDK."""
from __future__ import annotations

import os
from enum import Enum


class Environ(Enum):
    ENTRY_SERVER = "ENTRY_SERVER"
    LOG_LEVEL = "LOG_LEVEL"
    CA_SERVER = "CA_SERVER"

    def __str__(self) -> str:
        return self.value

    def get(self, default=None):
        return os.environ.get(self.value, default)
