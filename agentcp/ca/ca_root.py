"""The AgentUnion root certificate (built-in trust anchor) and the optional ``Certs/root`` override directory."""
from __future__ import annotations

import os
import threading
from typing import List, Optional

#: Built-in trust anchor: ``O=AgentUnion, CN=Root CA``, EC P-521, valid 2025-05-08 .. 2045-05-08
#: (SHA-256 of the DER: 32b9d974cb7faf5c12e14eb21fe69977dc090cd6c3bf68de34ce487ea2924564).
AGENTUNION_ROOT_CA_PEM = """-----BEGIN CERTIFICATE-----
MIICJjCCAYigAwIBAgIQf2zjuigigLrW8Su0I+2AiTAKBggqhkjOPQQDBDAnMRMw
EQYDVQQKEwpBZ2VudFVuaW9uMRAwDgYDVQQDEwdSb290IENBMB4XDTI1MDUwODA3
MDE1OFoXDTQ1MDUwODA3MDE1OFowJzETMBEGA1UEChMKQWdlbnRVbmlvbjEQMA4G
A1UEAxMHUm9vdCBDQTCBmzAQBgcqhkjOPQIBBgUrgQQAIwOBhgAEAUuDc4dMcjXI
GVxem8HStonZlyfyqtujfpTz8WP4ZcMUCTlrvnxZRjzNarmzSc2Yx2COcK1VEuzP
TcyQGE/Pw9i4AP9qGtX0j3dwLw+i2+TzEOmgoulm+t+fyjxhLsmqyWrIUdTv6T5C
IYVkSnX1mM0UPVQYxZi/2Uuyw8FOcPzIq7eWo1MwUTAOBgNVHQ8BAf8EBAMCAf4w
DwYDVR0lBAgwBgYEVR0lADAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDgQWBBQhkljB
FddnHb7Y0j6YEZ7wtYReNzAKBggqhkjOPQQDBAOBiwAwgYcCQWKjy52NZwqJZ1FN
1n1BRPAIy6nFDTke+HbM/JFWGyFrNSx4ceVSurpa+Uy9TWmwNUuog82MHRDXnlYp
e1KpOe6qAkIBGGII4Yfzoc5x+ZC0le7kyAYTJJl1XVLCdwECPRfzk/uZHonFA4tV
nHMwnEqFoMdsj2GgOqoRqAw/miMQwo2T0hA=
-----END CERTIFICATE-----
"""


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
        with open(files[index], "r", encoding="utf-8") as fh:
            return fh.read()
