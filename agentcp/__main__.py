"""Command line: ``python -m agentcp demo`` and ``python -m agentcp devserver``."""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

USAGE = """usage: python -m agentcp COMMAND [options]

commands:
  demo        run a fake ACP server, bring a client online, inject faults and show how it heals
  devserver   run a local ACP network (access point, CA, heartbeat) for unmodified agent scripts
"""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "demo":
        from agentcp.demo import main as demo_main

        return demo_main(rest)
    if command == "devserver":
        try:
            from agentcp.testing.devserver import main as devserver_main
        except ImportError:
            sys.stderr.write("devserver is not available in this build\n")
            return 2
        return devserver_main(rest)
    sys.stderr.write(f"unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
