"""Identity store and certificate authority client (``CAClient``, ``CARoot``)."""
from .ca_client import CAClient
from .ca_root import CARoot

__all__ = ["CAClient", "CARoot"]
