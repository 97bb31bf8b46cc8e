"""Local paths stay inside their folders (issue 7, item 13; trust.md rule 5), and the smaller item 15 fixes:
a truncated key file, ``load_aid(None)``, TLS failures that name ``AGENTCP_TLS_VERIFY``.

Names are checked by the small pure module :mod:`agentcp.base.names` (unit tests first), then the public APIs are
attacked over real sockets with the fake network.
"""
from __future__ import annotations

import logging
import os
import time

import pytest

from agentcp import AgentCP
from agentcp.base.credentials import hash_seed, pem_damage
from agentcp.base.names import InvalidNameError, check_aid, check_host, check_port, resolve_inside
from agentcp.ca.ca_client import CAClient, CAError
from agentcp.ca.identity_store import IdentityStore
from agentcp.context.exceptions import CredentialError

# --- the pure module -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "alice.example.com", "a.b.example.com", "a-1.x9.cn", "guest-12ab.acp.local", "x" * 63 + ".example.com",
])
def test_valid_aids(name):
    assert check_aid(name) == name
    assert check_aid(name, strict=True) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x.example.com", "a/../../b.example.com", "/etc/passwd", "a\\b.example.com", "a\x00.b.c",
    ".hidden.example.com", "trailing.dot.", "-a.example.com", "a-.example.com", "a..b.com", "a b.example.com",
    "x" * 64 + ".example.com", ("a" * 60 + ".") * 5 + "com", "ä.example.com", "a:b.example.com",
])
def test_invalid_aids(name):
    with pytest.raises(InvalidNameError):
        check_aid(name)
    with pytest.raises(ValueError):
        check_aid(name, strict=True)


def test_stored_names_of_0199_keep_working_but_new_ones_are_strict():
    # 0.1.99 stored any name verbatim: upper case and '_' are accepted for identities on disk...
    assert check_aid("Alice_Bot.example.com") == "Alice_Bot.example.com"
    # ...a new identity follows trust.md exactly: case folded, '_' refused
    assert check_aid("Alice.example.com", strict=True) == "alice.example.com"
    with pytest.raises(InvalidNameError, match="agent_name"):
        check_aid("my_bot", field="agent_name", strict=True)


def test_non_strings_are_a_type_error():
    for value in (None, 1, b"alice.example.com"):
        with pytest.raises(TypeError, match="must be a string"):
            check_aid(value)


def test_resolve_inside(tmp_path):
    root = tmp_path / "public"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.key").write_text("k")
    os.symlink(tmp_path / "secret.key", root / "link.key")
    os.symlink(tmp_path, root / "up")
    assert resolve_inside(str(root), "a.txt") == str(root / "a.txt")
    assert resolve_inside(str(root), "sub/../b.txt") == str(root / "b.txt")
    assert resolve_inside(str(root), str(root / "c.txt")) == str(root / "c.txt")
    for bad in ("../secret.key", "link.key", "up/secret.key", str(tmp_path / "secret.key"), "", ".", "a\x00b"):
        with pytest.raises(InvalidNameError):
            resolve_inside(str(root), bad)


def test_ports_and_hosts():
    assert check_port(443) == 443 and check_port("8080") == 8080
    for bad in (1.9, True, False, "1.9", "", " 80", "80x", 0, 65536, -1, None, "١٢"):
        with pytest.raises(InvalidNameError, match="port"):
            check_port(bad)
    assert check_host("127.0.0.1") == "127.0.0.1" and check_host("hb.example.com") == "hb.example.com"
    assert check_host("::1") == "::1"
    for bad in ("", "127.0.0.1\x00evil", "a b", "host:80", "host/x", "user@host", None, 7, "x" * 300):
        with pytest.raises(InvalidNameError, match="server_ip"):
            check_host(bad)


# --- identities ------------------------------------------------------------------------------------------------


@pytest.fixture
def acp(tmp_path, network):
    return AgentCP(str(tmp_path / "data"), seed_password="s", run_proxy=False, ap_url=network.url)


@pytest.mark.parametrize("name", ["", "../../escape", "/tmp/abs", "a/b", "..", "x\x00y", "bad_name"])
def test_create_aid_refuses_names_that_are_not_dns_names(acp, network, tmp_path, name):
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError):
        acp.create_aid("example.com", name)
    assert network.counters["certs_issued"] == 0  # refused before any traffic
    assert set(os.listdir(tmp_path)) == before  # nothing written outside the data folder
    assert acp.get_aid_list() == []


def test_create_aid_folds_case_for_a_new_identity(acp, network):
    aid = acp.create_aid("example.com", "Alice")
    assert aid.id == "alice.example.com"
    assert acp.get_aid_list() == ["alice.example.com"]


def test_an_identity_stored_by_0199_with_upper_case_still_loads(acp, acp_server):
    name = "Legacy_Bot.example.com"
    acp_server.issue_identity(name, IdentityStore(acp.aid_path).certs_dir(name), "s")
    agent = acp.load_aid(name)
    assert agent is not None and agent.id == name
    assert name in acp.get_aid_list()
    assert acp.create_aid("example.com", "Legacy_Bot").id == name  # create_aid finds it too


@pytest.mark.parametrize("name", ["../x.example.com", "/abs/x.example.com", "a\\b.example.com"])
def test_load_aid_and_the_identity_store_refuse_paths(acp, name):
    with pytest.raises(ValueError):
        acp.load_aid(name)
    with pytest.raises(ValueError):
        IdentityStore(acp.aid_path).key_path(name)


def test_load_aid_none_is_a_clear_type_error(acp):
    with pytest.raises(TypeError, match="agent_id must be a string"):
        acp.load_aid(None)


def test_a_guest_aid_from_the_ca_that_is_a_path_is_refused(tmp_path):
    store = IdentityStore(str(tmp_path))
    with pytest.raises(ValueError):
        store.save_identity("../../evil.example.com", None, "", "")
    assert os.listdir(tmp_path) == []


# --- file APIs -------------------------------------------------------------------------------------------------


def test_delete_public_file_cannot_reach_the_agents_key(acp, network):
    aid = acp.create_aid("example.com", "alice")
    key = os.path.join(acp.aid_path, aid.id, "private", "certs", f"{aid.id}.key")
    assert os.path.exists(key)
    with pytest.raises(ValueError, match="outside"):
        aid.delete_public_file(f"../private/certs/{aid.id}.key")
    os.symlink(key, os.path.join(aid.public_data_path, "innocent.txt"))
    with pytest.raises(ValueError, match="outside"):
        aid.delete_public_file("innocent.txt")
    with pytest.raises(ValueError, match="outside"):
        aid.delete_public_file(key)
    assert os.path.exists(key)  # the attacker did not get the key deleted
    ok = os.path.join(aid.public_data_path, "old.txt")
    open(ok, "w").close()
    aid.delete_public_file("old.txt")
    assert not os.path.exists(ok)
    aid.offline()


def test_sync_public_files_refuses_server_names_outside_the_folder(acp, network):
    aid = acp.create_aid("example.com", "alice")
    aid.online()
    try:
        assert aid.is_online_success
        outside = os.path.join(os.path.dirname(aid.public_data_path), "planted.txt")
        ap = aid.ap_client
        assert ap._download(aid.public_data_path, "../planted.txt") is False
        assert ap._download(aid.public_data_path, outside) is False
        assert not os.path.exists(outside)  # no file outside the folder
    finally:
        aid.offline()


# --- item 15 ---------------------------------------------------------------------------------------------------


def test_a_truncated_key_file_is_reported_as_damaged_not_as_a_wrong_password(acp, network):
    aid = acp.create_aid("example.com", "alice")
    aid.offline()
    key = os.path.join(acp.aid_path, aid.id, "private", "certs", f"{aid.id}.key")
    with open(key, "rb") as fh:
        whole = fh.read()
    assert pem_damage(whole) is None
    for damaged in (whole[: len(whole) // 2], whole.replace(whole[100:140], whole[100:136])):
        with open(key, "wb") as fh:
            fh.write(damaged)
        with pytest.raises(CredentialError) as info:
            acp.load_aid(aid.id)
        text = str(info.value)
        assert "damaged or truncated" in text and "wrong seed password" not in text
    with open(key, "wb") as fh:
        fh.write(whole)
    acp.set_seed_password("not the seed")
    with pytest.raises(CredentialError, match="wrong seed password"):  # a real wrong password still says so
        acp.load_aid(aid.id)


def test_ca_tls_failure_names_the_knob(acp_server_factory, tmp_path, monkeypatch):
    from agentcp.testing.access_point import AccessPoint

    monkeypatch.delenv("AGENTCP_TLS_VERIFY", raising=False)
    srv = acp_server_factory(tls=True)
    AccessPoint(srv).install()
    ca = CAClient(srv.heartbeat_url, str(tmp_path), hash_seed(""))
    with pytest.raises(CAError) as info:
        ca.create_identity("carol.example.com")
    text = str(info.value)
    assert "AGENTCP_TLS_VERIFY" in text and "unreachable" not in text


def test_websocket_tls_failure_names_the_knob(acp_server_factory, tmp_path, caplog, monkeypatch):
    from agentcp.base.auth_client import AuthClient
    from agentcp.msg.message_client import MessageClient, MessageClientConfig
    from agentcp.testing.message_server import MessageServer

    monkeypatch.delenv("AGENTCP_TLS_VERIFY", raising=False)
    caplog.set_level(logging.DEBUG, logger="agentcp")
    srv = acp_server_factory(tls=True)
    messages = MessageServer(srv).install()
    aid = "dave.example.com"
    certs = str(tmp_path / aid)
    srv.issue_identity(aid, certs, "")
    # HTTPS sign-in trusts the test CA; the WebSocket follows the default (verify with the system CAs) and fails.
    auth = AuthClient(aid, messages.url, certs, hash_seed(""), verify=srv.tls_cert_path)
    client = MessageClient(aid, messages.url, certs, hash_seed(""), cache_auth_client=auth,
                           config=MessageClientConfig(verify=True))
    try:
        client.start()
        deadline = time.monotonic() + 5
        while "AGENTCP_TLS_VERIFY" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.stop_websocket_client()
    assert "could not be verified" in caplog.text and "AGENTCP_TLS_VERIFY" in caplog.text


def test_connect_error_text_names_the_knob_for_a_real_certificate_failure(acp_server_factory, monkeypatch):
    """The text the message and stream clients report for a failed connect (one helper for both)."""
    import websocket

    from agentcp.base.http import connect_error_text

    monkeypatch.delenv("AGENTCP_TLS_VERIFY", raising=False)
    srv = acp_server_factory(tls=True)
    url = srv.heartbeat_url.replace("https://", "wss://") + "/stream/session"
    with pytest.raises(Exception) as info:
        websocket.create_connection(url, timeout=5)
    text = connect_error_text(info.value, url)
    assert "could not be verified" in text and "AGENTCP_TLS_VERIFY=0" in text
    assert connect_error_text(ConnectionRefusedError("refused"), url) == "ConnectionRefusedError: refused"
