"""Tokens never appear in logs (trust.md rule 6, issue 7 item 14), other libraries' loggers included.

With root logging at DEBUG, urllib3's connection pool logs every request line, query string included: the stream
pull carries the message-server token there, the access point's ``download_file`` the access-point token.
"""
from __future__ import annotations

import asyncio
import logging
import os

import pytest
from conftest import until

from agentcp.base.log import RedactSecrets


class _Grab(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def debug_logs():
    root = logging.getLogger()
    grab, level = _Grab(), root.level
    root.addHandler(grab)
    root.setLevel(logging.DEBUG)
    try:
        yield grab.records
    finally:
        root.removeHandler(grab)
        root.setLevel(level)


def test_no_token_in_any_log_record_at_debug(agents, network, debug_logs):
    a, b = agents("alice"), agents("bob")
    a.online()
    b.online()
    sid = a.create_session("chat", "")
    assert a.invite_member(sid, b.id)
    until(lambda: b.session_manager.get(sid) is not None)
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    pulled = []
    b.add_message_handler(lambda msg: pulled.append(b.fetch_stream_message(msg)))
    assert asyncio.run(a.send_stream_message(sid, [b.id], ["se", "cret"]))       # pull: token in the query
    until(lambda: pulled)
    assert pulled == ["secret"]
    with open(os.path.join(a.public_data_path, "card.txt"), "w") as fh:
        fh.write("hello")
    assert a.sync_public_files()                                                 # upload
    assert a.ap_client._download(a.public_data_path, "card.txt")                 # download: token in the query

    secrets = []
    for aid in (a, b):
        secrets.append(aid.ap_client.auth_client.signature)
        secrets.append(aid.heartbeat_client.auth_client.signature)
        secrets.append(aid.session_manager.message_client.auth_client.signature)
        secrets.append(str(aid.heartbeat_client.sign_cookie))     # the heartbeat's sign cookie
    secrets = [s for s in secrets if s and s != "0"]
    assert len(secrets) == 8
    texts = [r.getMessage() for r in debug_logs]
    leaks = [(r.name, t) for r, t in zip(debug_logs, texts) if any(s in t for s in secrets)]
    assert leaks == []
    # the connection pool did log those requests, redacted
    pool = [t for r, t in zip(debug_logs, texts) if r.name == "urllib3.connectionpool"]
    assert any("stream/pull" in t and "signature=***" in t for t in pool), pool
    assert any("download_file" in t and "signature=***" in t for t in pool), pool


@pytest.mark.parametrize("text,expected", [
    ('"GET /pull?agent_id=a&signature=abc.DEF-1 HTTP/1.1" 200', '"GET /pull?agent_id=a&signature=*** HTTP/1.1" 200'),
    ("x?token=t0k&cookie=42#f", "x?token=***&cookie=***#f"),
    ("sign_cookie=99 access_token=zz", "sign_cookie=*** access_token=***"),
    ("SIGNATURE=Q", "SIGNATURE=***"),
    ("no secrets here", "no secrets here"),
])
def test_redaction_filter(text, expected):
    record = logging.LogRecord("urllib3.connectionpool", logging.DEBUG, __file__, 1, "%s", (text,), None)
    assert RedactSecrets().filter(record) is True
    assert record.getMessage() == expected


def test_filter_is_installed_on_the_connection_pool_logger_once():
    import agentcp  # noqa: F401
    from agentcp.base.log import install_redaction

    install_redaction()
    install_redaction()
    filters = [f for f in logging.getLogger("urllib3.connectionpool").filters if isinstance(f, RedactSecrets)]
    assert len(filters) == 1
