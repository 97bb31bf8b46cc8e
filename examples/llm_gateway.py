"""Talk to an agent with an OpenAI client, through the local LLM gateway.

Start ``echo_agent.py`` first, then:

    python examples/llm_gateway.py --data ./gateway_data --peer echo.agentunion.cn --text "hello"

``AgentCP(..., run_proxy=True)`` runs an OpenAI-compatible endpoint on 127.0.0.1; ``aid.get_llm_url(peer)`` is the
``base_url`` and ``aid.get_llm_api_key()`` the API key. Each chat completion becomes an ACP message from this agent
to the peer, and the peer's answer (a message or a stream) comes back as an OpenAI completion. The script uses the
``openai`` package when it is installed and plain HTTP (``requests``) otherwise; it asks once without and once
with streaming. Exit status 0 when both answers came, 1 otherwise.
"""
import argparse
import json
import sys

import requests

from agentcp import AgentCP


def ask_openai(url: str, key: str, text: str, timeout: float):
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)
    done = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": text}])
    stream = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": text}],
                                            stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return done.choices[0].message.content, streamed


def ask_http(url: str, key: str, text: str, timeout: float):
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "agent", "messages": [{"role": "user", "content": text}]}
    resp = requests.post(url + "/chat/completions", json=body, headers=headers, timeout=timeout)
    resp.raise_for_status()
    answer = resp.json()["choices"][0]["message"]["content"]
    parts = []
    with requests.post(url + "/chat/completions", json=dict(body, stream=True), headers=headers, timeout=timeout,
                       stream=True) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                for choice in chunk.get("choices") or []:
                    parts.append(choice.get("delta", {}).get("content") or "")
    return answer, "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description="an OpenAI client talking to an agent through the LLM gateway")
    parser.add_argument("--data", default="./gateway_data", help="agent data directory")
    parser.add_argument("--ap", default="agentunion.cn", help="access point domain (the AID's suffix)")
    parser.add_argument("--name", default="gateway", help="agent name (the AID's first label)")
    parser.add_argument("--seed", default="gateway-example", help="seed password protecting the private key")
    parser.add_argument("--peer", default="echo.agentunion.cn", help="AID of the agent to talk to")
    parser.add_argument("--text", default="hello", help="what to say")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    parser.add_argument("--http", action="store_true", help="use plain HTTP even if openai is installed")
    args = parser.parse_args()

    with AgentCP(args.data, seed_password=args.seed, port=0, run_proxy=True) as acp:
        aid = acp.create_aid(args.ap, args.name)
        if aid is None:
            print(f"cannot load identity {args.name}.{args.ap}", file=sys.stderr)
            return 1
        aid.online()
        if not aid.is_online_success:
            print(f"{aid.id} is not online", file=sys.stderr)
            return 1
        url, key = aid.get_llm_url(args.peer), aid.get_llm_api_key()
        print(f"base_url {url}", flush=True)
        try:
            import openai  # noqa: F401
            use_openai = not args.http
        except ImportError:
            use_openai = False
        ask = ask_openai if use_openai else ask_http
        try:
            answer, streamed = ask(url, key, args.text, args.timeout)
        except Exception as exc:  # the example reports any client error and fails
            print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"client {'openai' if use_openai else 'http'}", flush=True)
        print(f"answer: {answer}", flush=True)
        print(f"streamed: {streamed}", flush=True)
    return 0 if answer and streamed else 1


if __name__ == "__main__":
    sys.exit(main())
