"""Files benchmark: a large upload and download through the devserver's file server, in constant memory.

The dev network (``start_dev_network``: access point, CA, heartbeat, message and file server) runs in a child
process, so the client's memory is measured alone; the child reports its own peak too. The client is an agent
built with the public 0.1.99 API (``AgentCP``, ``create_aid``, ``upload_file``, ``download_file``). Prints MB/s
and peak RSS (growth over the warmed-up client) beside their targets, then cuts an upload and a download half-way
and checks that each is reported and leaves no partial file. Exit status 1 if a target is missed.

    python benchmarks/files.py                # 1 GB (1024 MiB)
    python benchmarks/files.py --size-mb 64   # quicker
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, List, Optional

from messaging import Table  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

MiB = 1024 * 1024
#: Peak RSS growth allowed during a transfer, client and server (the file itself is 1 GB).
RSS_GROWTH_TARGET_MB = 64
#: Loopback throughput we expect at least (2 shared cores, Python on both ends, fsync of the download).
THROUGHPUT_TARGET = 50.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


# --- the server process ----------------------------------------------------------------------------------------
def _serve(conn: Any) -> None:
    """Child process: run the dev network and obey ``(command, *args)`` from the pipe until ``stop``."""
    logging.basicConfig(level=logging.WARNING)
    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    conn.send((access_point.url, access_point.oss.storage_dir))
    try:
        while True:
            command, *args = conn.recv()
            if command == "stop":
                break
            if command == "peak":
                conn.send(_peak_rss_mb())
            elif command == "drop_after":
                access_point.oss.drop_after(*args)
                conn.send(True)
            elif command == "counters":
                conn.send(dict(access_point.oss.counters))
    finally:
        access_point.oss.close()
        server.stop()


# --- helpers ---------------------------------------------------------------------------------------------------
def _make_file(path: str, size: int) -> str:
    """Write ``size`` pseudo-random bytes in 1 MiB blocks; their SHA-256."""
    digest = hashlib.sha256()
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as fh:
        left, n = size, 0
        while left > 0:
            block[:8] = n.to_bytes(8, "big")  # every block differs
            piece = bytes(block[: min(left, MiB)])
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
            n += 1
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parts(folder: str) -> List[str]:
    return [n for n in os.listdir(folder) if n.endswith(".part")]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024 = 1 GB)")
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the SDK at INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = args.size_mb * MiB
    work = tempfile.mkdtemp(prefix="agentcp-files-bench-", dir=args.dir)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    proc.start()
    table = Table()
    try:
        url, storage = parent.recv()
        print(f"dev network {url} (pid {proc.pid}); file server storage {storage}; work folder {work}", flush=True)
        from agentcp import AgentCP

        acp = AgentCP(os.path.join(work, "data"), seed_password="bench", run_proxy=False, ap_url=url)
        aid = acp.create_aid("bench.local", "files")
        os.chdir(work)
        # Warm up: imports, sign-in, connection pool, first buffers.
        _make_file("warm.bin", MiB)
        warm = aid.upload_file("warm.bin")
        assert warm and aid.download_file(warm, "warm-copy.bin")[1], aid.file_client.last_error

        print(f"writing a {args.size_mb} MiB source file ...", flush=True)
        source_digest = _make_file("source.bin", size)
        base_client = _peak_rss_mb()
        parent.send(("peak",))
        base_server = parent.recv()
        print(f"client RSS before the transfers: {_current_rss_mb():.1f} MB (peak so far {base_client:.1f} MB)",
              flush=True)

        started = time.monotonic()
        file_url = aid.upload_file("source.bin")
        up_s = time.monotonic() - started
        if not file_url:
            print(f"upload failed: {aid.file_client.last_error}", flush=True)
            return 1
        up_peak = _peak_rss_mb()
        table.add(f"upload {args.size_mb} MiB", f"{size / MiB / up_s:.1f} MB/s", f">= {THROUGHPUT_TARGET:g} MB/s",
                  size / MiB / up_s >= THROUGHPUT_TARGET)

        started = time.monotonic()
        result = aid.download_file(file_url, "copy.bin")
        down_s = time.monotonic() - started
        if not result or not result[1]:
            print(f"download failed: {aid.file_client.last_error}", flush=True)
            return 1
        down_peak = _peak_rss_mb()
        table.add(f"download {args.size_mb} MiB (fsync, atomic rename)", f"{size / MiB / down_s:.1f} MB/s",
                  f">= {THROUGHPUT_TARGET:g} MB/s", size / MiB / down_s >= THROUGHPUT_TARGET)
        same = _sha256("copy.bin") == source_digest
        table.add("downloaded file identical (SHA-256)", "yes" if same else "NO", "yes", same)
        os.unlink("copy.bin")

        growth_up = up_peak - base_client
        growth_down = down_peak - base_client
        table.add("client RSS before the transfers (warmed up)", f"{base_client:.1f} MB", "", None)
        table.add("client peak RSS", f"{down_peak:.1f} MB", "", None)
        table.add("client peak RSS growth during upload", f"{growth_up:.1f} MB", f"< {RSS_GROWTH_TARGET_MB} MB",
                  growth_up < RSS_GROWTH_TARGET_MB)
        table.add("client peak RSS growth during download", f"{growth_down:.1f} MB", f"< {RSS_GROWTH_TARGET_MB} MB",
                  growth_down < RSS_GROWTH_TARGET_MB)
        parent.send(("peak",))
        server_peak = parent.recv()
        table.add("devserver peak RSS growth (both transfers)", f"{server_peak - base_server:.1f} MB",
                  f"< {RSS_GROWTH_TARGET_MB} MB", server_peak - base_server < RSS_GROWTH_TARGET_MB)

        # Cut mid-transfer: reported, no partial file.
        parent.send(("drop_after", size // 2, "download"))
        parent.recv()
        workdir_before = set(os.listdir(work))
        result = aid.download_file(file_url, "cut.bin")
        error = str(aid.file_client.last_error or "")
        clean = not os.path.exists("cut.bin") and not _parts(work) and set(os.listdir(work)) == workdir_before
        ok = bool(result) and result[1] is None and "dropped" in error and clean
        table.add("download cut at 50 %: reported, partial removed", "yes" if ok else "NO", "yes", ok)
        parent.send(("drop_after", size // 2, "upload"))
        parent.recv()
        stored_before = set(os.listdir(storage))
        cut_url = aid.upload_file("source.bin")
        error = str(aid.file_client.last_error or "")
        clean = set(os.listdir(storage)) == stored_before
        ok = cut_url is None and "dropped" in error and clean
        table.add("upload cut at 50 %: reported, nothing stored", "yes" if ok else "NO", "yes", ok)
        table.add("client peak RSS growth, whole run", f"{_peak_rss_mb() - base_client:.1f} MB",
                  f"< {RSS_GROWTH_TARGET_MB} MB", _peak_rss_mb() - base_client < RSS_GROWTH_TARGET_MB)
    finally:
        try:
            parent.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        os.chdir(os.path.dirname(work))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table.render()}\n\n(file {args.size_mb} MiB; Python {sys.version.split()[0]}, {os.cpu_count()} cores)")
    if table.missed:
        print("missed: " + ", ".join(table.missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
