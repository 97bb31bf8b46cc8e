"""A child process run until it prints a ready line, then stopped (shared by the README and editable-install tests)."""
from __future__ import annotations

import queue
import signal
import subprocess
import threading
from typing import Callable, List, Optional, Sequence, Tuple


def run_until_ready(args: Sequence[str], cwd: str, env: dict, ready: Callable[[str], bool] = lambda line: True,
                    within: float = 30.0, then: float = 0.0, stop: int = signal.SIGTERM) -> Tuple[bool, str, str]:
    """Start ``args``; wait up to ``within`` s for a stdout line that is ``ready``, then ``then`` s more.

    Returns ``(still_running, stdout, stderr)``; the process is stopped (``stop`` signal, then killed) before
    returning, and its output readers are joined.
    """
    proc = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    out: List[str] = []
    err: List[str] = []

    def pump(stream, sink: List[str], notify: bool) -> None:
        for line in stream:
            sink.append(line)
            if notify:
                lines.put(line)
        if notify:
            lines.put(None)

    readers = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        try:
            while True:
                line = lines.get(timeout=within)
                if line is None or ready(line):
                    break
        except queue.Empty:
            pass
        if then > 0:
            try:
                proc.wait(then)
            except subprocess.TimeoutExpired:
                pass
        running = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for reader in readers:
            reader.join(5)
    return running, "".join(out), "".join(err)
