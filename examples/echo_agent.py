"""Echo agent: answers every message it receives with ``echo: <text>``.

Written exactly as an agentcp 0.1.99 user would write it; it runs unchanged on 0.1.99 and on this package.

    python examples/echo_agent.py --data ./echo_data             # identity echo.agentunion.cn

Against the local dev network (see examples/README.md) export the line ``python -m agentcp devserver`` prints
first. Stop it with Ctrl-C or SIGTERM.
"""
import argparse
import sys

from agentcp import AgentCP


def main() -> int:
    parser = argparse.ArgumentParser(description="ACP echo agent")
    parser.add_argument("--data", default="./echo_data", help="agent data directory (identity and history)")
    parser.add_argument("--ap", default="agentunion.cn", help="access point domain (the AID's suffix)")
    parser.add_argument("--name", default="echo", help="agent name (the AID's first label)")
    parser.add_argument("--seed", default="echo-example", help="seed password protecting the private key")
    args = parser.parse_args()

    acp = AgentCP(args.data, seed_password=args.seed)
    aid = acp.create_aid(args.ap, args.name)  # loads the identity if it exists already
    if aid is None:
        print(f"cannot load identity {args.name}.{args.ap}", file=sys.stderr)
        return 1

    @aid.message_handler()
    async def on_message(msg):
        if aid.get_sender_from_message(msg) == aid.id:
            return  # our own message, if the server relays it back
        text = aid.get_content_from_message(msg)
        if text is None:
            return  # no text block (e.g. an error notice)
        print(f"{aid.get_sender_from_message(msg)} says {text!r}", flush=True)
        aid.reply_message(msg, f"echo: {text}")

    acp.register_signal_handler()  # Ctrl-C and SIGTERM end serve_forever()
    aid.online()
    print(f"ready {aid.id} online={aid.is_online_success}", flush=True)
    try:
        acp.serve_forever()
    finally:
        aid.offline()
    print("echo agent stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
