"""Base clients: sign-in (:mod:`.auth_client`), retry policy (:mod:`.backoff`), logging helpers (:mod:`.log`)."""
