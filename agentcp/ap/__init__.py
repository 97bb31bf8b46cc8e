"""Access point client (``ApClient``)."""
from .ap_client import ApClient

__all__ = ["ApClient"]
