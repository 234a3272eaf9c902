"""Password hashes: MD5-crypt for imported legacy accounts, scrypt for new ones.

MD5-crypt (``$1$salt$hash``) is the FreeBSD/glibc algorithm the legacy PLC stored
(spec 2.2); Python 3.13 dropped ``crypt``, so it is written out here from the
algorithm's published description. New passwords are stored as
``$scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

from plc.throttle import HashGate

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MAGIC = b"$1$"


def _to64(value: int, n: int) -> str:
    out = []
    for _ in range(n):
        out.append(_ITOA64[value & 0x3F])
        value >>= 6
    return "".join(out)


def md5_crypt(password: str, salt: str) -> str:
    """crypt(3) with an MD5 ``$1$`` salt; ``salt`` may carry the $1$ prefix and hash."""
    if salt.startswith("$1$"):
        salt = salt[3:]
    salt = salt.split("$", 1)[0][:8]
    pw = password.encode("utf-8")
    sb = salt.encode("utf-8")
    alt = hashlib.md5(pw + sb + pw).digest()
    ctx = hashlib.md5(pw + _MAGIC + sb)
    n = len(pw)
    while n > 0:
        ctx.update(alt[: min(16, n)])
        n -= 16
    i = len(pw)
    while i:
        ctx.update(b"\0" if i & 1 else pw[:1])
        i >>= 1
    final = ctx.digest()
    for r in range(1000):
        c = hashlib.md5()
        c.update(pw if r & 1 else final)
        if r % 3:
            c.update(sb)
        if r % 7:
            c.update(pw)
        c.update(final if r & 1 else pw)
        final = c.digest()
    f = final
    out = ""
    for a, b, c2 in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        out += _to64((f[a] << 16) | (f[b] << 8) | f[c2], 4)
    out += _to64(f[11], 2)
    return f"$1${salt}${out}"


_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """The stored form of a new password; a value already ``$1$...`` is kept verbatim."""
    if password.startswith("$1$") and len(password) > 3:
        return password  # pre-hashed import (spec 2.2)
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, maxmem=64 * 1024 * 1024,
                            dklen=32, **_SCRYPT)
    params = ",".join(f"{k}={v}" for k, v in _SCRYPT.items())
    return f"$scrypt${params}${_b64(salt)}${_b64(digest)}"


# Verifying a hash costs milliseconds (md5-crypt) to tens of them (scrypt); a client
# polling with password auth pays it on every call. Successful verifications are
# remembered as (stored hash, keyed digest of the password), in memory only.
_CACHE_KEY = os.urandom(32)
_cache: dict[tuple[str, bytes], None] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 4096


def _cache_token(stored: str, password: str) -> tuple[str, bytes]:
    return stored, hmac.new(_CACHE_KEY, password.encode("utf-8", "surrogatepass"),
                            hashlib.sha256).digest()


def verify_password(password: str, stored: str | None, gate: HashGate | None = None) -> bool:
    """Whether ``password`` matches ``stored``; a hash that is not remembered is computed
    inside one of ``gate``'s slots (``plc.throttle.Busy`` when none is free in time)."""
    if not stored or not password:
        return False
    token = _cache_token(stored, password)
    with _cache_lock:
        if token in _cache:
            return True
    if gate is None:
        ok = _verify(password, stored)
    else:
        with gate.slot():
            ok = _verify(password, stored)
    if ok:
        with _cache_lock:
            if len(_cache) >= _CACHE_MAX:
                _cache.clear()
            _cache[token] = None
    return ok


def _verify(password: str, stored: str) -> bool:
    try:
        if stored.startswith("$1$"):
            return hmac.compare_digest(md5_crypt(password, stored[:12]), stored)
        if stored.startswith("$scrypt$"):
            _, _, params, salt, digest = stored.split("$")
            kv = dict(item.split("=") for item in params.split(","))
            got = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt),
                                 n=int(kv["n"]), r=int(kv["r"]), p=int(kv["p"]),
                                 maxmem=64 * 1024 * 1024, dklen=len(_unb64(digest)))
            return hmac.compare_digest(got, _unb64(digest))
    except (ValueError, KeyError, UnicodeError):
        return False
    return False
