"""Files through the file server (api.md §3.9): real sockets against the devserver's /api/oss.

Upload + download round trips with a digest check, a fresh token after 401, transfers cut or stalled mid-way
(reported, no partial file left), the trust policy (no token to an untrusted host), path confinement, the download
cap, and the event loop staying free during ``upload_file_async``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.server
import logging
import os
import threading

import pytest
import requests

from agentcp.file.file_client import FileClient, confine_path, file_server_url, with_auth_query
from agentcp.utils.file_util import get_file_info

MB = 1024 * 1024


def _write(path, size: int, seed: bytes = b"x") -> str:
    block = hashlib.sha256(seed).digest() * (MB // 32)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _leftovers(folder) -> list:
    return [n for n in os.listdir(folder) if n.endswith(".part")]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def alice(agents):
    return agents("alice")


@pytest.fixture
def oss(network):
    yield network.oss
    network.oss.release()


# ------------------------------------------------------------------------------------------------ round trips

def test_upload_and_download_round_trip(alice, oss, workdir):
    src = workdir / "report.bin"
    digest = _write(src, 3 * MB + 17)
    url = alice.upload_file(str(src))
    assert url and url.startswith(oss.url + "/files/")
    stored = oss.file_for_url(url)
    assert stored.sha256 == digest and stored.owner == alice.id and stored.name == "report.bin"
    assert alice.file_client.get_uploaded_url() == url

    result = alice.download_file(url, "copy.bin")
    assert result is not None
    full_url, saved = result
    assert saved == "copy.bin"
    assert full_url.startswith(url + "?agent_id=" + alice.id + "&signature=")
    assert _digest(workdir / "copy.bin") == digest
    assert _leftovers(workdir) == []


def test_another_agent_downloads_the_shared_url(agents, oss, workdir):
    alice, bob = agents("alice"), agents("bob")
    src = workdir / "shared.txt"
    digest = _write(src, 200_000)
    url = alice.upload_file(str(src))
    assert bob.download_file(url, "from-alice.txt")[1] == "from-alice.txt"
    assert _digest(workdir / "from-alice.txt") == digest


def test_upload_file_async_leaves_the_event_loop_free(alice, oss, workdir):
    src = workdir / "async.bin"
    digest = _write(src, 2 * MB)
    oss.stall_after(MB, "upload")  # the upload pauses until a coroutine on the loop releases it
    alice.FILE_TIMEOUT = (5.0, 5.0)  # a blocking upload fails after this stall instead of waiting for the release

    async def main():
        uploads_at_release = []

        async def releaser():
            while not oss.counters["stalls"]:
                await asyncio.sleep(0.01)
            uploads_at_release.append(oss.counters["uploads"])
            oss.release()  # runs while the upload waits only if the upload does not block the loop

        task = asyncio.create_task(releaser())
        url = await asyncio.wait_for(alice.upload_file_async(str(src)), 20)
        await task
        return url, uploads_at_release

    url, uploads_at_release = asyncio.run(main())
    assert uploads_at_release == [0] and url
    assert oss.file_for_url(url).sha256 == digest


def test_upload_of_a_missing_file_fails_truthfully(alice, oss, workdir):
    assert alice.upload_file(str(workdir / "nope.bin")) is None
    assert "is not a file" in str(alice.file_client.last_error)
    assert oss.counters["uploads"] == 0


def test_0199_style_multipart_upload_is_accepted_by_the_devserver(alice, oss, workdir):
    """The fake server's streaming parser reads what requests' own multipart encoder (0.1.99's client) sends."""
    client = FileClient(alice._certs_dir(), alice.seed_password, alice.id, alice.ap, server_url=oss.url)
    token = client.get_signature()
    src = workdir / "old.bin"
    digest = _write(src, 300_000)
    with open(src, "rb") as fh:
        reply = requests.post(f"{oss.url}/upload_file", data={"agent_id": alice.id, "signature": token,
                                                              "file_name": "old.bin"},
                              files={"file": ("old.bin", fh)}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert oss.file_for_url(reply.json()["url"]).sha256 == digest
    client.close()


# ------------------------------------------------------------------------------------------------ tokens

def test_expired_token_gets_a_fresh_one_for_upload_and_download(alice, oss, workdir):
    src = workdir / "a.bin"
    digest = _write(src, MB)
    url = alice.upload_file(str(src))
    assert oss.sign_ins == 1
    oss.expire_tokens()
    url2 = alice.upload_file(str(src))
    assert url2 and oss.file_for_url(url2).sha256 == digest
    assert oss.sign_ins == 2 and oss.counters["unauthorised"] == 1
    oss.expire_tokens()
    assert alice.download_file(url, "b.bin")[1] == "b.bin"
    assert oss.sign_ins == 3 and oss.counters["unauthorised"] == 2
    assert _digest(workdir / "b.bin") == digest


def test_file_client_api(alice, oss, workdir):
    client = FileClient(alice._certs_dir(), alice.seed_password, alice.id, alice.ap, server_url=oss.url)
    assert client.get_uploaded_url() == ""
    assert client.sign_in() is True
    token = client.get_signature()
    assert token and client.get_signature() == token
    src = workdir / "f.txt"
    _write(src, 1000)
    url = client.post_file(str(src))
    assert url and client.get_uploaded_url() == url
    assert client.download_file(url, "g.txt")[1] == "g.txt"
    client.sign_out()
    assert client.auth_client.signature is None
    client.close()
    assert "token" not in repr(client) and token not in repr(client)


def test_tokens_never_reach_our_logs(alice, oss, workdir, caplog):
    caplog.set_level(logging.DEBUG, logger="agentcp")
    src = workdir / "log.bin"
    _write(src, 500_000)
    url = alice.upload_file(str(src))
    oss.drop_after(100_000, "download")
    alice.download_file(url, "x.bin")
    oss.expire_tokens()
    alice.download_file(url, "y.bin")
    tokens = [alice.file_client.auth_client.signature]
    assert all(tokens)
    # The SDK's loggers (the fake server's access log, agentcp.testing, is the server side, not the client).
    text = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith("agentcp") and not r.name.startswith("agentcp.testing"))
    assert "downloaded" in text and "dropped" in text
    for token in tokens:
        assert token not in text
    assert "signature=" not in text


# ------------------------------------------------------------------------------------------------ faults

def test_dropped_upload_is_reported_and_nothing_is_stored(alice, oss, workdir):
    src = workdir / "big.bin"
    _write(src, 4 * MB)
    oss.drop_after(MB, "upload")
    assert alice.upload_file(str(src)) is None
    error = alice.file_client.last_error
    assert "upload of big.bin" in str(error) and "dropped" in str(error)
    assert oss.counters["cut"] == 1 and oss.files() == []
    assert [n for n in os.listdir(oss.storage_dir)] == []  # the server's partial upload is gone too
    assert alice.upload_file(str(src))  # and the next one works


def test_dropped_download_is_reported_and_the_partial_file_removed(alice, oss, workdir):
    src = workdir / "big.bin"
    _write(src, 4 * MB)
    url = alice.upload_file(str(src))
    (workdir / "target.bin").write_bytes(b"previous content")
    oss.drop_after(MB + 5, "download")
    result = alice.download_file(url, "target.bin")
    assert result is not None and result[1] is None and result[0].startswith(url + "?")
    error = str(alice.file_client.last_error)
    assert "dropped" in error and "of 4194304 bytes" in error and "partial file was removed" in error
    assert _leftovers(workdir) == []
    assert (workdir / "target.bin").read_bytes() == b"previous content"  # atomic: the old file is untouched
    assert alice.download_file(url, "fresh.bin") is not None
    assert not (workdir / "fresh.bin").exists() or _digest(workdir / "fresh.bin") == _digest(src)


def test_stalled_download_times_out_and_leaves_nothing(alice, oss, workdir):
    alice.FILE_TIMEOUT = (2.0, 0.5)
    src = workdir / "s.bin"
    _write(src, 2 * MB)
    url = alice.upload_file(str(src))
    oss.stall_after(MB, "download")
    result = alice.download_file(url, "s-copy.bin")
    oss.release()
    assert result is not None and result[1] is None
    assert "stalled" in str(alice.file_client.last_error)
    assert not (workdir / "s-copy.bin").exists() and _leftovers(workdir) == []


def test_stalled_upload_times_out(alice, oss, workdir):
    alice.FILE_TIMEOUT = (0.5, 0.5)
    src = workdir / "slow.bin"
    _write(src, 8 * MB)  # more than the loopback socket buffers hold, so the sender blocks
    oss.stall_after(MB, "upload")
    assert alice.upload_file(str(src)) is None
    assert "stalled" in str(alice.file_client.last_error) or "dropped" in str(alice.file_client.last_error)
    oss.release()
    assert oss.files() == []


def test_download_cap_is_enforced(alice, oss, workdir):
    src = workdir / "cap.bin"
    _write(src, 3 * MB)
    url = alice.upload_file(str(src))
    alice.limits = dataclasses.replace(alice.limits, file_transfer_max=MB)
    result = alice.download_file(url, "cap-copy.bin")
    assert result is not None and result[1] is None
    assert "file_transfer_max" in str(alice.file_client.last_error)
    assert alice.status()["trust"]["limits_crossed"] == {"file_transfer_max": 1}
    assert not (workdir / "cap-copy.bin").exists() and _leftovers(workdir) == []


def test_file_server_unavailable(alice, oss, workdir):
    src = workdir / "u.bin"
    _write(src, 1000)
    oss.set_available(False)
    assert alice.upload_file(str(src)) is None
    assert "sign-in" in str(alice.file_client.last_error) or "503" in str(alice.file_client.last_error)
    oss.set_available(True)
    assert alice.upload_file(str(src))


# ------------------------------------------------------------------------------------------------ trust and paths

class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        body = b"attacker content"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def attacker():
    _Recorder.seen = []
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Recorder)
    except OSError:
        pytest.skip("127.0.0.2 is not available here")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _Recorder.seen
    server.shutdown()
    server.server_close()
    thread.join()


def test_untrusted_download_host_gets_no_token(alice, oss, workdir, attacker):
    server, seen = attacker
    src = workdir / "t.bin"
    _write(src, 1000)
    assert alice.upload_file(str(src))  # signed in: there is a token to steal
    evil = f"http://127.0.0.2:{server.server_address[1]}/api/oss/files/abc/t.bin"
    assert alice.download_file(evil, "stolen.bin") is None
    assert seen == []  # not one request: no sign-in, no token, no agent id
    assert not (workdir / "stolen.bin").exists()
    assert alice.status()["trust"]["refused"].get("file", 0) >= 1
    # A FileClient used on its own trusts only its file server's domain.
    client = FileClient(alice._certs_dir(), alice.seed_password, alice.id, alice.ap, server_url=oss.url)
    assert client.download_file(evil, "stolen2.bin") is None
    assert seen == [] and client.counters["refused"] == 1
    client.close()


def test_file_server_override_outside_the_trust_domain_is_refused(alice, oss, workdir, attacker, monkeypatch):
    server, seen = attacker
    monkeypatch.setenv("AGENTCP_OSS_URL", f"http://127.0.0.2:{server.server_address[1]}/api/oss")
    src = workdir / "o.bin"
    _write(src, 1000)
    assert alice.upload_file(str(src)) is None
    assert seen == []  # no sign-in challenge, no proof, no file
    assert alice.status()["trust"]["refused"].get("file", 0) >= 1
    monkeypatch.setenv("AGENTCP_TRUSTED_HOSTS", "127.0.0.2")  # the application says it is its own server
    alice.upload_file(str(src))
    assert seen and seen[0] == "/api/oss/sign_in"


def test_relative_paths_stay_inside_the_current_folder(alice, oss, workdir, tmp_path):
    src = workdir / "p.bin"
    digest = _write(src, 1000)
    url = alice.upload_file(str(src))
    assert alice.download_file(url, "../escaped.bin") is None
    assert not (tmp_path / "escaped.bin").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, workdir / "link")
    assert alice.download_file(url, "link/evil.bin") is None
    assert os.listdir(outside) == []
    assert "leads outside" in str(alice.file_client.last_error)
    # sub-folders inside are fine (created), and an absolute path is the caller's choice
    assert alice.download_file(url, "sub/dir/ok.bin")[1] == "sub/dir/ok.bin"
    assert _digest(workdir / "sub" / "dir" / "ok.bin") == digest
    absolute = str(outside / "chosen.bin")
    assert alice.download_file(url, absolute)[1] == absolute
    assert _digest(absolute) == digest


# ------------------------------------------------------------------------------------------------ pure helpers

def test_file_server_url_rules():
    assert file_server_url("agentunion.cn") == "https://oss.agentunion.cn/api/oss"
    assert file_server_url("https://acp3.agentunion.cn") == "https://oss.agentunion.cn/api/oss"
    assert file_server_url("https://oss.agentunion.cn/api/oss/files/x") == "https://oss.agentunion.cn/api/oss"
    assert file_server_url("http://127.0.0.1:8765") == "http://127.0.0.1:8765/api/oss"
    assert file_server_url("http://localhost:8765/x") == "http://localhost:8765/api/oss"


def test_with_auth_query():
    assert with_auth_query("https://h/a/b.bin", "a.b.c", "t-1") == "https://h/a/b.bin?agent_id=a.b.c&signature=t-1"
    assert with_auth_query("https://h/d?id=1#frag", "a.b.c", "x&y") == \
        "https://h/d?id=1&agent_id=a.b.c&signature=x%26y#frag"


def test_confine_path(tmp_path):
    assert confine_path("a/b.txt", str(tmp_path)) == os.path.join(os.path.realpath(tmp_path), "a", "b.txt")
    for bad in ("../x", "a/../../x", "", "."):
        with pytest.raises(ValueError):
            confine_path(bad, str(tmp_path))


def test_get_file_info(tmp_path):
    png = tmp_path / "image"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    text = tmp_path / "notes"
    text.write_text("hello ünïcode\n", encoding="utf-8")
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01\x02\xff" * 10)
    named = tmp_path / "photo.JPEG"
    named.write_bytes(b"whatever")
    assert get_file_info(str(png)) == {"file_name": "image", "file_size": 28, "file_type": "png", "exists": True,
                                       "error": ""}
    assert get_file_info(str(text))["file_type"] == "txt"
    assert get_file_info(str(blob))["file_type"] == "binary"
    assert get_file_info(str(named))["file_type"] == "jpg"
    missing = get_file_info(str(tmp_path / "missing.pdf"))
    assert missing["exists"] is False and missing["error"] and missing["file_type"] == "unknown"


# ------------------------------------------------------------------------------------------------ the example

def test_file_transfer_example_runs_unmodified_against_the_dev_network(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    try:
        src = tmp_path / "doc.bin"
        _write(src, 300_000)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCP_")}
        env["AGENTCP_AP_URL"] = access_point.url
        script = Path(__file__).resolve().parent.parent / "examples" / "file_transfer.py"
        assert "agentcp.testing" not in script.read_text(encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "data"), "--file", str(src),
                               "--out", "copy.bin"], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "uploaded: " + access_point.oss.url in proc.stdout and "identical" in proc.stdout
        assert _digest(tmp_path / "copy.bin") == _digest(src)
    finally:
        access_point.oss.close()
        server.stop()
