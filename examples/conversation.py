"""A two-agent conversation: this agent (alice) talks to the echo agent for a fixed number of exchanges.

Written exactly as an agentcp 0.1.99 user would write it. Start ``echo_agent.py`` first, then:

    python examples/conversation.py --data ./alice_data --peer echo.agentunion.cn --count 5

It creates a session, invites the peer, sends ``message 1`` .. ``message N`` with ``send_message_content`` and
waits for each ``echo: message i`` reply. Exit status 0 when every exchange completed, 1 otherwise (peer not
answering, not online), 130 when stopped by Ctrl-C/SIGTERM.
"""
import argparse
import queue
import sys
import time

from agentcp import AgentCP


def main() -> int:
    parser = argparse.ArgumentParser(description="talk to the echo agent")
    parser.add_argument("--data", default="./alice_data", help="agent data directory")
    parser.add_argument("--ap", default="agentunion.cn", help="access point domain (the AID's suffix)")
    parser.add_argument("--name", default="alice", help="agent name (the AID's first label)")
    parser.add_argument("--seed", default="alice-example", help="seed password protecting the private key")
    parser.add_argument("--peer", default="echo.agentunion.cn", help="AID of the echo agent")
    parser.add_argument("--count", type=int, default=5, help="number of exchanges")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each reply")
    parser.add_argument("--resend-after", type=float, default=2.0,
                        help="send again if no reply came after this many seconds (peer still joining)")
    args = parser.parse_args()

    acp = AgentCP(args.data, seed_password=args.seed)
    aid = acp.create_aid(args.ap, args.name)
    if aid is None:
        print(f"cannot load identity {args.name}.{args.ap}", file=sys.stderr)
        return 1

    replies: "queue.Queue[dict]" = queue.Queue()

    @aid.message_handler()
    async def on_message(msg):
        if aid.get_sender_from_message(msg) != aid.id:
            replies.put(msg)  # handlers run on worker threads: hand the message to the main thread

    acp.register_signal_handler()
    aid.online()
    try:
        if not aid.is_online_success:
            print(f"{aid.id} could not go online", file=sys.stderr)
            return 1
        session_id = aid.create_session("echo conversation", "agentcp example")
        if not session_id:
            print("could not create a session", file=sys.stderr)
            return 1
        aid.invite_member(session_id, args.peer)
        print(f"session {session_id}: {aid.id} <-> {args.peer}", flush=True)

        for i in range(1, args.count + 1):
            text = f"message {i}"
            expected = f"echo: {text}"
            started = time.monotonic()
            deadline = started + args.timeout
            next_send = started
            got = None
            while got is None and time.monotonic() < deadline:
                if acp.shutdown_flag.is_set():
                    print("interrupted", flush=True)
                    return 130
                now = time.monotonic()
                if now >= next_send:
                    aid.send_message_content(session_id, [args.peer], text)
                    next_send = now + args.resend_after
                try:
                    msg = replies.get(timeout=min(0.2, max(0.0, deadline - now)))
                except queue.Empty:
                    continue
                content = aid.get_content_from_message(msg)
                if content == expected:
                    got = content
                elif content is None:
                    error = aid.get_content_from_message(msg, "error")
                    print(f"  notice from {aid.get_sender_from_message(msg)}: {error}", flush=True)
                # anything else is a late answer to an earlier resend: ignore it
            if got is None:
                print(f"no reply to {text!r} within {args.timeout:.0f} s", file=sys.stderr)
                return 1
            print(f"{i}/{args.count}: sent {text!r}, got {got!r} in {(time.monotonic() - started) * 1000:.1f} ms",
                  flush=True)
        print(f"conversation complete: {args.count} exchanges", flush=True)
        return 0
    finally:
        aid.offline()


if __name__ == "__main__":
    sys.exit(main())
