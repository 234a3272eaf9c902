"""Authentication (spec 2): hmac worked values, password (md5-crypt and new hashes),
sessions and their expiry, node sessions, anonymous, maintenance account."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

import pytest

from plc.auth import hmac_message, hmac_value
from plc.passwords import hash_password, md5_crypt, verify_password
from tests.plc.world import NODE_KEY, PASSWORD, hmac_of


def fault(fn: Any, *args: Any) -> xmlrpc.client.Fault:
    try:
        result = fn(*args)
    except xmlrpc.client.Fault as f:
        return f
    pytest.fail(f"expected a fault, got {result!r}")


def test_hmac_worked_values_of_the_spec() -> None:
    k = "0123456789abcdef"
    assert hmac_message(()) == "[]"
    assert hmac_value(k, ()) == "37710044f29784c98c2fc05253bac2c76a013009"
    args = ({"boot_state": "boot", "ssh_rsa_key": "abc"},)
    assert hmac_message(args) == "[abcboot]"
    assert hmac_value(k, args) == "ebeba14926a44579cf2a62d5b10e684a0a50df8f"
    assert hmac_message((42, [1, 2])) == "[1242]"
    assert hmac_value(k, (42, [1, 2])) == "1821962b1dd6de650a2c6b975f063477b1064409"
    assert hmac_message((True, None, 1.5, {"a": ["x", {"b": "y"}]})) == "[1.5NoneTruexy]"


def test_md5_crypt_matches_openssl_and_glibc() -> None:
    # `openssl passwd -1 -salt saltsalt password`
    assert md5_crypt("password", "$1$saltsalt") == "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/"
    assert md5_crypt("héllo wörld long password here", "ab12") == \
        "$1$ab12$3Wl0I2R7EmfT3Jp.NPYfK."
    stored = "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/"
    assert verify_password("password", stored)
    assert not verify_password("Password", stored)


def test_new_passwords_get_a_modern_hash() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$scrypt$") and "s3cret" not in h
    assert verify_password("s3cret", h) and not verify_password("s3cret!", h)
    assert hash_password("$1$abcdefgh$xyz") == "$1$abcdefgh$xyz"  # pre-hashed import
    assert not verify_password("nopass", "nopass") and not verify_password("", h)


def _set_password(plc: Any, person_id: int, stored: str) -> None:
    conn = plc.store.connect()
    try:
        conn.execute("UPDATE persons SET password = ? WHERE person_id = ?", [stored, person_id])
    finally:
        conn.close()


def test_password_auth(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    # an imported md5-crypt account logs in
    _set_password(plc, w.user, md5_crypt("legacy-pw", "$1$Zz9.aB3c"))
    auth = {"AuthMethod": "password", "Username": "USER@tu.example.org",
            "AuthString": "legacy-pw", "Role": "user", "anything": [1, 2]}
    assert api.AuthCheck(auth) == 1
    assert fault(api.AuthCheck, {**auth, "AuthString": "wrong"}).faultString.endswith(
        "PasswordAuth: Password verification failed")
    assert fault(api.AuthCheck, {**auth, "Username": "nobody@x.org"}).faultCode == 103
    # role mismatch under password auth is 103 (spec 2.2)
    f = fault(api.AddSite, auth, {})
    assert f.faultCode == 103 and "missing role" in f.faultString
    # disabled accounts cannot log in
    api.UpdatePerson(w.A.admin, w.user, {"enabled": False})
    assert fault(api.AuthCheck, auth).faultString.endswith("No such account")
    # a password set through the API is stored hashed and works
    api.UpdatePerson(w.A.admin, w.user, {"enabled": True, "password": "fresh-pw"})
    conn = plc.store.connect()
    try:
        stored = conn.scalar("SELECT password FROM persons WHERE person_id = ?", [w.user])
    finally:
        conn.close()
    assert stored.startswith("$scrypt$")
    assert api.AuthCheck({**auth, "AuthString": "fresh-pw"}) == 1


def test_bad_auth_structs(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    f = fault(api.AuthCheck, {"AuthMethod": "kerberos"})
    assert f.faultCode == 102 and "AuthMethod" in f.faultString
    assert fault(api.AuthCheck, {"AuthMethod": "password", "Username": "x"}).faultCode == 102
    assert fault(api.AuthCheck, {"AuthMethod": "hmac", "node_id": "1", "value": "x"}).faultCode \
        == 102
    assert fault(api.AuthCheck, {"AuthMethod": "gpg", "name": "x", "signature": "y"}).faultCode \
        == 103
    f = fault(api.AuthCheck, [])
    assert f.faultCode == 102 and f.faultString.startswith(": AuthCheck: ")


def test_maintenance_account(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    maint = {"AuthMethod": "password", "Username": "maint@localhost.localdomain",
             "AuthString": "maint-pw"}
    assert api.AuthCheck(maint) == 1
    assert api.GetSites(maint, "tu", ["login_base"]) == [{"login_base": "tu"}]
    assert fault(api.AuthCheck, {**maint, "AuthString": "nopass"}).faultCode == 103


def test_anonymous(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    assert api.GetNodes(w.A.anon, w.node, ["hostname"]) == [{"hostname": "n1.tu.example.org"}]
    f = fault(api.AuthCheck, w.A.anon)
    assert f.faultCode == 103 and "cannot be called anonymously" in f.faultString


def test_person_sessions(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    sid = api.GetSession(w.A.pi)
    session = {"AuthMethod": "session", "session": sid}
    assert api.GetSession(session) == sid  # a session struct gets its own session back
    assert api.GetSites(session, "tu", ["login_base"]) == [{"login_base": "tu"}]
    # role mismatch under session auth is 108 and keeps the session
    assert fault(api.AddSite, session, {}).faultCode == 108
    assert api.AuthCheck(session) == 1
    # an expired session fails (103) and is deleted
    conn = plc.store.connect()
    try:
        conn.execute("UPDATE sessions SET expires = 1 WHERE session_id = ?", [sid])
    finally:
        conn.close()
    assert fault(api.AuthCheck, session).faultString.endswith("SessionAuth: Invalid session")
    assert fault(api.AuthCheck, session).faultString.endswith("SessionAuth: No such session")
    # DeleteSession ends a session
    sid2 = api.GetSession(w.A.user)
    assert api.DeleteSession({"AuthMethod": "session", "session": sid2}) == 1
    assert fault(api.AuthCheck, {"AuthMethod": "session", "session": sid2}).faultCode == 103


def test_node_hmac_and_sessions(world: Any) -> None:
    plc, w = world
    api = plc.proxy()
    hmac_auth = {"AuthMethod": "hmac", "node_id": w.node, "value": hmac_of(NODE_KEY),
                 "node_ip": "10.1.0.10"}
    assert api.AuthCheck(hmac_auth) == 1
    # the hmac covers every argument after the auth struct
    signed = {**hmac_auth, "value": hmac_of(NODE_KEY, w.node)}
    assert api.GetSlivers(signed, w.node)["node_id"] == w.node
    assert fault(api.GetSlivers, hmac_auth, w.node).faultString.endswith(
        "BootAuth: Call could not be authenticated")
    # hmac only for methods that allow the node role
    f = fault(api.GetSessions, {**hmac_auth})
    assert f.faultCode == 103 and "missing 'node' role" in f.faultString
    f = fault(api.AuthCheck, {"AuthMethod": "hmac", "node_id": w.other_node, "value": "x"})
    assert f.faultString.endswith("BootAuth: No node key")
    # node sessions never expire; a new one replaces the old one
    s1 = api.GetSession(hmac_auth)
    s2 = api.GetSession(hmac_auth)
    assert api.AuthCheck({"AuthMethod": "session", "session": s2}) == 1
    assert fault(api.AuthCheck, {"AuthMethod": "session", "session": s1}).faultCode == 103
    conn = plc.store.connect()
    try:
        assert conn.scalar("SELECT expires FROM sessions WHERE session_id = ?", [s2]) is None
    finally:
        conn.close()
    # [quirk] DeleteSession cannot find a node session: fault 111
    assert fault(api.DeleteSession, {"AuthMethod": "session", "session": s2}).faultCode == 111
    # a node session is refused (108) by a method without the node role
    assert fault(api.GetSessions, {"AuthMethod": "session", "session": s2}).faultCode == 108


def test_password_never_logged_or_recorded(world: Any, caplog: pytest.LogCaptureFixture) -> None:
    plc, w = world
    api = plc.proxy()
    secret = "Very-Secret-Pw-123"
    with caplog.at_level("DEBUG"):
        api.UpdatePerson(w.A.admin, w.user, {"password": secret})
        fault(api.AuthCheck, {"AuthMethod": "password", "Username": "user@tu.example.org",
                              "AuthString": "wrong-" + secret})
    assert secret not in caplog.text
    events = api.GetEvents(w.A.admin, {"call_name": "UpdatePerson"}, ["call"])
    assert events and all(secret not in e["call"] and PASSWORD not in e["call"] for e in events)


BAD_AUTHS = [
    ({"AuthMethod": "password", "Username": "nobody@example.org", "AuthString": "x"}, 103),
    ({"AuthMethod": "session", "session": "no-such-session"}, 103),
    ({"AuthMethod": "hmac", "node_id": 999999, "value": "00"}, 103),
    ({"AuthMethod": "password", "Username": 5}, 102),        # malformed: its own 102
    ({"AuthMethod": "telepathy"}, 102),
]


@pytest.mark.parametrize("auth,code", BAD_AUTHS)
def test_authentication_comes_before_argument_types(plc: Any, auth: dict[str, Any],
                                                    code: int) -> None:
    """Legacy order (spec 1.2): argument count (101), then authentication, then the
    other arguments' types (102): a caller that cannot authenticate gets the
    authentication fault, not one describing the arguments it sent."""
    api = plc.proxy()
    cases = [(api.AddSite, [{"login_base": ["not", "a", "string"]}]),
             (api.GetNodes, [3.5]),
             (api.DeleteSlice, [{"not": "an id or name"}]),
             (api.AddNodeTag, ["x", "y", "z"])]
    for method, args in cases:
        f = fault(method, auth, *args)
        assert f.faultCode == code, f.faultString
        if code == 102:  # the auth struct is named, not the other argument
            assert "login_base" not in f.faultString and "node_filter" not in f.faultString
    # the count still comes first
    assert fault(api.AddSite, auth).faultCode == 101
    # and with good credentials the same arguments get their type fault
    assert fault(api.AddSite, plc.admin, {"login_base": ["x"]}).faultCode == 102
