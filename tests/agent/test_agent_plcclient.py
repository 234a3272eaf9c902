"""HMAC node authentication exactly as plcapi spec §2.4 gives it."""

from __future__ import annotations

from agent.plcclient import hmac_auth, hmac_message

KEY = "0123456789abcdef"


def test_spec_vectors() -> None:
    assert hmac_message(()) == "[]"
    assert hmac_auth(1, KEY, ())["value"] == "37710044f29784c98c2fc05253bac2c76a013009"
    args = ({"boot_state": "boot", "ssh_rsa_key": "abc"},)
    assert hmac_message(args) == "[abcboot]"
    assert hmac_auth(1, KEY, args)["value"] == "ebeba14926a44579cf2a62d5b10e684a0a50df8f"
    assert hmac_message((42, [1, 2])) == "[1242]"
    assert hmac_auth(1, KEY, (42, [1, 2]))["value"] == "1821962b1dd6de650a2c6b975f063477b1064409"


def test_auth_struct() -> None:
    auth = hmac_auth(9, KEY, ())
    assert auth["AuthMethod"] == "hmac" and auth["node_id"] == 9


def test_flatten_nested_and_types() -> None:
    assert hmac_message(([True, None, 1.5], {"k": [3, "x"]})) == "[1.53NoneTruex]"
