"""Outgoing mail for PLC: to a configured SMTP host, or to a spool directory (default).

Used by the methods that notify people (NotifyPersons, NotifySupport, BootNotifyOwners,
ResetPassword, VerifyPerson, UpdatePerson's "account enabled" mail). The legacy server
piped messages to sendmail and raised Fault 111 when that failed (spec section 3); here a
failure raises :class:`MailError`, which the method layer turns into that fault.

The spool is a Maildir-like directory: a message is written to ``tmp/`` and renamed into
``new/``, so a reader never sees half a message. Messages are plain RFC 5322 files.
"""

from __future__ import annotations

import os
import secrets
import smtplib
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

DEFAULT_SPOOL_DIR = Path("/var/spool/plc/mail")

#: Longest header or address we accept; anything longer is surely not an address.
_MAX_ADDRESS = 254


class MailError(Exception):
    """A message could not be built, spooled or handed to the SMTP host."""


@dataclass(frozen=True)
class MailConfig:
    """Where mail goes.

    ``smtp_host`` unset means "write to ``spool_dir``". ``enabled`` false drops every
    message (the legacy ``PLC_MAIL_ENABLED=false``), which callers see as success.
    """

    enabled: bool = True
    smtp_host: str | None = None
    smtp_port: int = 25
    spool_dir: Path = DEFAULT_SPOOL_DIR
    sender: str = "PlanetLab Support <support@localhost>"
    support_address: str = "support@localhost"
    boot_address: str = "boot@localhost"
    timeout: float = 10.0
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "mail") -> MailConfig:
        """Build from a config table (e.g. the ``[mail]`` table of plc.toml).

        A bad key or value raises ``ValueError`` naming ``source``, the key and what is
        allowed.
        """
        allowed: dict[str, tuple[type, ...]] = {
            "enabled": (bool,),
            "smtp_host": (str,),
            "smtp_port": (int,),
            "spool_dir": (str,),
            "sender": (str,),
            "support_address": (str,),
            "boot_address": (str,),
            "timeout": (int, float),
        }
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in allowed:
                raise ValueError(
                    f"{source}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}"
                )
            types = allowed[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise ValueError(f"{source}: {key} must be {names}, got {value!r}")
            kwargs[key] = value
        if "smtp_port" in kwargs and not 0 < kwargs["smtp_port"] < 65536:
            raise ValueError(f"{source}: smtp_port must be 1..65535, got {kwargs['smtp_port']}")
        if "timeout" in kwargs and kwargs["timeout"] <= 0:
            raise ValueError(f"{source}: timeout must be > 0, got {kwargs['timeout']}")
        if kwargs.get("smtp_host") == "":
            kwargs["smtp_host"] = None
        if "spool_dir" in kwargs:
            if not kwargs["spool_dir"]:
                raise ValueError(f"{source}: spool_dir must be a non-empty path")
            kwargs["spool_dir"] = Path(kwargs["spool_dir"])
        for key in ("sender", "support_address", "boot_address"):
            if key in kwargs:
                try:
                    _check_address(kwargs[key])
                except MailError as exc:
                    raise ValueError(f"{source}: {key}: {exc}") from None
        return cls(**kwargs)


    @classmethod
    def from_plc_config(cls, cfg: Any) -> MailConfig:
        """From plc.toml's ``[mail]`` table (``cfg.get(section, name)`` as plc.config gives).

        ``smtp_host`` is ``host`` or ``host:port``; empty means the spool directory.
        """
        where = f"{getattr(cfg, 'source', 'plc.toml')}: [mail]"
        host_port = cfg.get("mail", "smtp_host") or ""
        host, port = None, 25
        if host_port:
            host, sep, port_text = host_port.rpartition(":")
            if not sep or host.endswith(":") or not host:  # no port, or a bare IPv6 address
                host, port_text = host_port, "25"
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"{where} smtp_host = {host_port!r}: port must be 1..65535")
            host, port = host.strip("[]"), int(port_text)
        support = cfg.get("mail", "support_address")
        return cls(
            enabled=bool(cfg.get("mail", "enabled")),
            smtp_host=host,
            smtp_port=port,
            spool_dir=Path(cfg.get("mail", "spool_dir")
                           or Path(cfg.get("db", "path")).parent / "mail"),
            sender=support,
            support_address=support,
            boot_address=cfg.get("mail", "boot_address"),
        )


def _check_address(address: str) -> str:
    """Refuse what could inject headers or is obviously not an address."""
    if not isinstance(address, str) or not address.strip():
        raise MailError(f"invalid mail address {address!r}: empty")
    if len(address) > _MAX_ADDRESS:
        raise MailError(f"invalid mail address {address[:40]!r}...: longer than {_MAX_ADDRESS}")
    if any(c in address for c in "\r\n\0"):
        raise MailError(f"invalid mail address {address!r}: contains a line break or NUL")
    if "@" not in address:
        raise MailError(f"invalid mail address {address!r}: no '@'")
    return address


def _check_header(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise MailError(f"invalid mail {name} {value[:60]!r}: contains a line break or NUL")
    return value


def build_message(
    sender: str,
    to: Sequence[str],
    subject: str,
    body: str,
    cc: Sequence[str] = (),
    extra_headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """A complete UTF-8 message; raises MailError on a bad address or header."""
    recipients = [_check_address(a) for a in to]
    copies = [_check_address(a) for a in cc]
    if not recipients and not copies:
        raise MailError("message has no recipient")
    msg = EmailMessage()
    msg["From"] = _check_address(sender)
    if recipients:
        msg["To"] = ", ".join(recipients)
    if copies:
        msg["Cc"] = ", ".join(copies)
    msg["Subject"] = _check_header("subject", subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain="plc.localhost")
    for name, value in (extra_headers or {}).items():
        msg[_check_header("header name", name)] = _check_header(name, value)
    msg.set_content(body, charset="utf-8")
    return msg


def _unique_name() -> str:
    # Maildir naming: time, unique part, host. Unique across processes and calls.
    return f"{time.time_ns()}.P{os.getpid()}R{secrets.token_hex(6)}.{socket.gethostname()}"


def spool(message: EmailMessage, spool_dir: Path) -> Path:
    """Write ``message`` into ``spool_dir/new`` atomically; returns the file's path."""
    tmp_dir, new_dir = spool_dir / "tmp", spool_dir / "new"
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        new_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = _unique_name()
        tmp_path = tmp_dir / name
        data = message.as_bytes()
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        final = new_dir / name
        os.rename(tmp_path, final)
        return final
    except OSError as exc:
        raise MailError(f"cannot spool mail to {spool_dir}: {exc.strerror or exc}") from exc


def smtp_send(message: EmailMessage, host: str, port: int, timeout: float) -> None:
    """Hand ``message`` to the SMTP server at host:port (no auth, no TLS: a local relay)."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            refused = smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(f"cannot send mail through SMTP {host}:{port}: {exc}") from exc
    if refused:
        raise MailError(
            f"SMTP {host}:{port} refused recipient(s) {', '.join(sorted(refused))}"
        )


def send(
    config: MailConfig,
    to: Iterable[str],
    subject: str,
    body: str,
    cc: Iterable[str] = (),
    sender: str | None = None,
) -> Path | None:
    """Send one message as ``config`` says.

    Returns the spool file's path when spooled, None when sent over SMTP or when mail is
    disabled. Raises MailError on any failure (bad address, unreachable host, full disk).
    """
    message = build_message(
        sender or config.sender, list(to), subject, body, list(cc), config.extra_headers
    )
    if not config.enabled:
        return None
    if config.smtp_host:
        smtp_send(message, config.smtp_host, config.smtp_port, config.timeout)
        return None
    return spool(message, config.spool_dir)
