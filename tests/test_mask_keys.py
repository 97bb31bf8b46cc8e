"""WebSocket masking keys: fresh random bytes per frame, without a system call per frame."""
from __future__ import annotations

import os
import threading

from agentcp.msg import mask
from agentcp.msg.mask import MaskKeys


def test_keys_come_from_urandom_in_chunks_and_never_repeat(monkeypatch):
    calls = []
    real = os.urandom

    def counting(n):
        calls.append(n)
        return real(n)

    monkeypatch.setattr(mask.os, "urandom", counting)
    keys = MaskKeys()
    got = [keys(4) for _ in range(2048)]
    assert all(len(k) == 4 for k in got)
    assert len(calls) == 2  # 4 KiB per call: 1,024 frames each
    assert len(set(got)) > 2040  # consecutive slices of random bytes, not one key reused


def test_longer_requests_and_threads():
    keys = MaskKeys(chunk=16)
    assert len(keys(40)) == 40
    out = []
    lock = threading.Lock()

    def take():
        mine = [keys(4) for _ in range(500)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2000 and all(len(k) == 4 for k in out)
