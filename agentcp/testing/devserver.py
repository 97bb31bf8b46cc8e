"""A local ACP network in one process: FakeACPServer (heartbeat) + AccessPoint (access point, CA, message server).

Run ``python -m agentcp.testing.devserver`` (or ``python -m agentcp devserver``), export the printed
``AGENTCP_AP_URL`` and run an unmodified agent script: ``create_aid``/``load_aid``/``online()`` go to this server.
Stops cleanly on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

__all__ = ["main", "DEFAULT_PORT", "start_dev_network"]

#: The fixed default port, so the exported URL stays the same between runs.
DEFAULT_PORT = 8765


def start_dev_network(host: str = "127.0.0.1", port: int = DEFAULT_PORT, next_beat_ms: int = 5000,
                      message_server: Optional[str] = None, signed: bool = False, open_network: bool = True):
    """Start and return ``(server, access_point)``; ``port=0`` picks a free port.

    ``signed=False`` (default): sign-in challenges carry no server signature, so agents in other processes need
    no extra trust root (the client logs that the server did not prove its identity). ``signed=True`` signs them;
    then export ``AGENTCP_CA_ROOT`` pointing at the root certificate (see :func:`main`).
    ``open_network=True`` (default): agent certificates from any issuer are accepted (dates and proof of
    possession still checked), so existing identities go online too.
    """
    from .access_point import AccessPoint, accept_any_issuer
    from .fake_server import FakeACPServer

    server = FakeACPServer(host=host, next_beat_ms=next_beat_ms, server_auth="signed" if signed else "none",
                           http_port=port)
    if open_network:
        accept_any_issuer(server)
    server.start()
    access_point = AccessPoint(server, message_server=message_server, accept_any_issuer=open_network).install()
    return server, access_point


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentcp devserver",
        description="Run a local ACP network (access point, CA, heartbeat and message server) for development.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"HTTP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--next-beat-ms", type=int, default=5000, help="heartbeat interval the server asks for")
    parser.add_argument("--signed", action="store_true",
                        help="sign sign-in challenges (agents must then trust the printed AGENTCP_CA_ROOT)")
    parser.add_argument("--strict-issuer", action="store_true",
                        help="accept only agent certificates issued by this server's CA")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        server, access_point = start_dev_network(args.host, args.port, args.next_beat_ms, signed=args.signed,
                                                 open_network=not args.strict_issuer)
    except OSError as exc:
        print(f"devserver: cannot start on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    previous = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):  # not the main thread
            pass
    root_file = None
    try:
        print(f"export AGENTCP_AP_URL={access_point.url}", flush=True)
        if args.signed:
            import tempfile

            fd, root_file = tempfile.mkstemp(prefix="agentcp-devserver-root-", suffix=".crt")
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(server.root_ca_pem)
            print(f"export AGENTCP_CA_ROOT={root_file}", flush=True)
        print(f"# access point {access_point.url}/api/accesspoint, heartbeat UDP {server.udp_address[0]}:"
              f"{server.udp_address[1]}, message server {access_point.message_server}, file server "
              f"{access_point.oss.url}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if root_file:
            try:
                os.unlink(root_file)
            except OSError:
                pass
        for sig, handler in previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
    print("devserver stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
