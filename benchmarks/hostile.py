"""What a hostile network gets: every attack of the trust-boundaries work, run against a local dev network.

Each attack plays the attacker over real localhost sockets (a forged datagram, a relay server, a peer's stream
announce, a WebSocket message that never ends, a trickling access point, ...) and reports what the attacker
obtained, the client's peak memory growth, and how long the agent took to be fully working again. The attacks live
in ``benchmarks/hostile_*.py`` (one module per area, each with ``attacks() -> [(name, callable)]``); every callable
returns a dict with the keys of :data:`COLUMNS`.

    python benchmarks/hostile.py               # every attack (about a minute)
    python benchmarks/hostile.py --only invite # attacks whose name contains "invite"
    python benchmarks/hostile.py --markdown    # the table only, as Markdown (for the README)

Run one attack per process (``--isolate``, the default) so the memory figure of one is not inflated by another.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("attack", "attacker got", "peak memory MB", "recovery s")
TARGETS = {"attacker got": "nothing", "peak memory MB": "< 64", "recovery s": "bounded"}


def _modules() -> List[str]:
    return sorted(glob.glob(os.path.join(HERE, "hostile_*.py")))


def _load(path: str):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def all_attacks() -> List[Tuple[str, str, Callable[[], Dict[str, Any]]]]:
    """``(module path, attack name, callable)`` for every attack of every ``hostile_*.py``."""
    found = []
    for path in _modules():
        for name, fn in _load(path).attacks():
            found.append((path, name, fn))
    return found


def _run_one(path: str, name: str) -> Dict[str, Any]:
    for attack_name, fn in _load(path).attacks():
        if attack_name == name:
            started = time.monotonic()
            result = dict(fn())
            result.setdefault("attack", name)
            result.setdefault("wall s", round(time.monotonic() - started, 2))
            return result
    raise SystemExit(f"no attack {name!r} in {path}")


def _run_isolated(path: str, name: str, timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"attack": name, "attacker got": "?", "peak memory MB": "?", "recovery s": f"> {timeout:.0f} (hung)"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"attack": name, "attacker got": "?", "peak memory MB": "?", "recovery s": f"error: {tail[0][:80]}"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in COLUMNS) + " |")
    lines.append("| *target* | " + " | ".join(TARGETS[c] for c in COLUMNS[1:]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the attacks whose name contains this text")
    parser.add_argument("--in-process", action="store_true", help="run every attack in this process")
    parser.add_argument("--markdown", action="store_true", help="print only the Markdown table")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one attack may take")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_run_one(*args.child), default=str), flush=True)
        return 0
    results = []
    for path, name, _fn in all_attacks():
        if args.only and args.only not in name:
            continue
        if not args.markdown:
            print(f"  running {name} ...", flush=True)
        result = _run_one(path, name) if args.in_process else _run_isolated(path, name, args.timeout)
        results.append(result)
        if not args.markdown:
            print("    " + ", ".join(f"{k}: {_fmt(v)}" for k, v in result.items()), flush=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
