"""The AgentUnion root certificate (built-in trust anchor) and the optional ``Certs/root`` override directory."""
from __future__ import annotations

import os
import threading
from typing import List, Optional

# The built-in trust anchor (O=AgentUnion, CN=Root CA, EC P-521) lives with the server-authentication code.
from agentcp.base.server_auth import AGENTUNION_ROOT_CA_PEM  # re-exported here, where 0.1.99 had it


class CARoot:
    """Process-wide holder of the root certificate(s).

    ``CARoot()`` always returns the same object. Unlike 0.1.99 (D-I4) constructing it again does not forget a
    directory configured with :meth:`set_ca_root_crt`. With no directory, or a directory without ``*.crt`` files,
    the built-in AgentUnion root is used.
    """

    _instance: Optional["CARoot"] = None
    _lock = threading.Lock()

    def __new__(cls, *args, **kwargs):
        with cls._lock:
            if cls._instance is None:
                inst = super().__new__(cls)
                inst._ca_root_path = None
                cls._instance = inst
            return cls._instance

    def __init__(self) -> None:  # state lives in __new__ so repeated construction keeps it
        pass

    def set_ca_root_crt(self, ca_root_path: Optional[str]) -> None:
        """Use the ``*.crt`` files of ``ca_root_path`` (sorted by name) instead of the built-in root."""
        self._ca_root_path = ca_root_path or None

    def _override_files(self) -> List[str]:
        path = self._ca_root_path
        if not path or not os.path.isdir(path):
            return []
        return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".crt")]

    def get_ca_root_crt_number(self) -> int:
        return max(1, len(self._override_files()))

    def get_ca_root_crt(self, index: int = 0) -> str:
        """The PEM text of root number ``index`` (the built-in root when no override is configured)."""
        files = self._override_files()
        if not files:
            return AGENTUNION_ROOT_CA_PEM
        with open(files[index], encoding="utf-8") as fh:
            return fh.read()
