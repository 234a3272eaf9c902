"""Slice tickets signed with Ed25519 (docs/tickets.md): PLC's key pair and the wire form.

A ticket is one ASCII string a legacy client carries like the old GPG blob:

    PLTICKET1.<base64url(payload)>.<base64url(signature)>

`payload` is the canonical JSON (sorted keys, no spaces, ASCII) of the ticket's
content; the signature is Ed25519 over ``DOMAIN + payload`` (the domain string keeps a
ticket signature from ever being valid for anything else signed with the key). A
verifier checks the signature over the exact payload bytes before parsing them.

The private key is a PEM (PKCS#8) file, 0600, made once by `plc init` and never
overwritten; its path is plc.toml [tickets] key (empty: ticket-ed25519.pem beside the
SQLite database [db] path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PREFIX = "PLTICKET1"
DOMAIN = b"planetlab-slice-ticket-v1\0"
KEY_FILE = "ticket-ed25519.pem"


class TicketKeyError(Exception):
    """The signing key is missing or unusable; the message names the file."""


def key_path(cfg: Any) -> Path:
    """Where PLC's ticket signing key lives ([tickets] key, else beside [db] path)."""
    if cfg.tickets_key:
        return Path(cfg.tickets_key)
    return Path(cfg.db_path).resolve().parent / KEY_FILE


def ensure_key(path: Path) -> bool:
    """Make the key pair at `path` (0600, whatever the umask) unless a file is there:
    an existing key is never overwritten. True if a key was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(pem)
    return True


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TicketKeyError(f"ticket signing key missing: no file {path} (`plc init` makes "
                             "it; or `plc ticket-key --create`)") from None
    except OSError as exc:
        raise TicketKeyError(f"ticket signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TicketKeyError(f"ticket signing key {path}: not an unencrypted PEM key "
                             f"({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TicketKeyError(f"ticket signing key {path}: not an Ed25519 key")
    return key


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def public_b64(key: Ed25519PrivateKey) -> str:
    """The public key as the agent's `plc_ticket_key` takes it: base64 of 32 raw bytes."""
    return base64.b64encode(public_raw(key)).decode()


def key_id(public: bytes) -> str:
    """A short name of a public key, carried in each ticket (the first 16 hex digits of
    its SHA-256), so a node can tell "signed by another key" from "forged"."""
    return hashlib.sha256(public).hexdigest()[:16]


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign(key: Ed25519PrivateKey, content: dict[str, Any]) -> str:
    """The ticket string of `content` (a dict of JSON values)."""
    payload = canonical(content)
    return f"{PREFIX}.{_b64(payload)}.{_b64(key.sign(DOMAIN + payload))}"
