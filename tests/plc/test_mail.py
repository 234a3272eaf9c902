"""plc.mail: spool directory and SMTP delivery to a small SMTP server on loopback."""

from __future__ import annotations

import email
import email.policy
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from plc import mail


class _SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough RFC 5321 to receive one or more messages; records the envelopes."""

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        server: _SMTPServer = self.server  # type: ignore[assignment]
        self._reply("220 test.localhost ESMTP")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(4096)
            if not raw:
                return
            line = raw.decode("ascii", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                self._reply("250 test.localhost")
            elif line.upper().startswith("MAIL FROM:"):
                sender, rcpts = line[10:].strip().strip("<>"), []
                self._reply("250 OK")
            elif line.upper().startswith("RCPT TO:"):
                rcpt = line[8:].strip().strip("<>")
                if rcpt.startswith("refuse"):
                    self._reply("550 no such user")
                else:
                    rcpts.append(rcpt)
                    self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 go ahead")
                data = bytearray()
                while True:
                    chunk = self.rfile.readline(65536)
                    if not chunk or chunk == b".\r\n":
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                server.received.append((sender, list(rcpts), bytes(data)))
                self._reply("250 queued")
            elif verb == "RSET":
                sender, rcpts = None, []
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 bye")
                return
            else:
                self._reply("502 not implemented")


class _SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SMTPHandler)
        self.received: list[tuple[str | None, list[str], bytes]] = []


@pytest.fixture
def smtp_server() -> Iterator[_SMTPServer]:
    server = _SMTPServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_spool_is_default_and_atomic(tmp_path: Path) -> None:
    cfg = mail.MailConfig(spool_dir=tmp_path / "spool")
    body = "Grüße — your account\nline two\n"
    path = mail.send(cfg, ["pi@example.org"], "Welcome to PlanetLab ✓", body, cc=["cc@example.org"])
    assert path is not None and path.parent == tmp_path / "spool" / "new"
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    msg = _parse(path.read_bytes())
    assert msg["To"] == "pi@example.org"
    assert msg["Cc"] == "cc@example.org"
    assert msg["Subject"] == "Welcome to PlanetLab ✓"
    assert msg["From"] == cfg.sender
    assert msg.get_content() == body
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    # A second message gets its own file.
    path2 = mail.send(cfg, ["x@example.org"], "s", "b")
    assert path2 is not None and path2 != path
    assert len(list((tmp_path / "spool" / "new").iterdir())) == 2


def test_smtp_delivery(smtp_server: _SMTPServer, tmp_path: Path) -> None:
    host, port = smtp_server.server_address[:2]
    cfg = mail.MailConfig(smtp_host=str(host), smtp_port=int(port), spool_dir=tmp_path / "never")
    ret = mail.send(cfg, ["a@example.org", "b@example.org"], "Node down", "ünïcode body\n.\nend\n",
                    sender="boot@plc.example.org")
    assert ret is None
    assert not (tmp_path / "never").exists()
    assert len(smtp_server.received) == 1
    sender, rcpts, data = smtp_server.received[0]
    assert sender == "boot@plc.example.org"
    assert rcpts == ["a@example.org", "b@example.org"]
    msg = _parse(data)
    assert msg["Subject"] == "Node down"
    # The lone "." line is dot-stuffed on the wire and restored by the server.
    assert msg.get_content().replace("\r\n", "\n") == "ünïcode body\n.\nend\n"


def test_smtp_refused_recipient_and_unreachable_host(smtp_server: _SMTPServer) -> None:
    host, port = smtp_server.server_address[:2]
    cfg = mail.MailConfig(smtp_host=str(host), smtp_port=int(port))
    with pytest.raises(mail.MailError, match="refused"):
        mail.send(cfg, ["refuse@example.org"], "s", "b")
    # A port nobody listens on: bind one, close it, and use it.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    cfg = mail.MailConfig(smtp_host="127.0.0.1", smtp_port=dead_port, timeout=2)
    with pytest.raises(mail.MailError, match=f"127.0.0.1:{dead_port}"):
        mail.send(cfg, ["a@example.org"], "s", "b")


def test_disabled_sends_nothing(tmp_path: Path) -> None:
    cfg = mail.MailConfig(enabled=False, spool_dir=tmp_path / "spool")
    assert mail.send(cfg, ["a@example.org"], "s", "b") is None
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize(
    "to,subject,match",
    [
        (["a@example.org\r\nBcc: victim@example.org"], "s", "line break"),
        (["no-at-sign"], "s", "no '@'"),
        ([""], "s", "empty"),
        ([], "s", "no recipient"),
        (["a@example.org"], "hi\r\nBcc: victim@example.org", "subject"),
    ],
)
def test_bad_input_is_refused(tmp_path: Path, to: list[str], subject: str, match: str) -> None:
    cfg = mail.MailConfig(spool_dir=tmp_path / "spool")
    with pytest.raises(mail.MailError, match=match):
        mail.send(cfg, to, subject, "b")
    assert not (tmp_path / "spool" / "new").exists() or not os.listdir(tmp_path / "spool" / "new")


def test_unwritable_spool_names_the_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = mail.MailConfig(spool_dir=blocker / "spool")
    with pytest.raises(mail.MailError, match=str(blocker)):
        mail.send(cfg, ["a@example.org"], "s", "b")


def test_config_from_mapping() -> None:
    cfg = mail.MailConfig.from_mapping(
        {"smtp_host": "127.0.0.1", "smtp_port": 2525, "spool_dir": "/tmp/x", "enabled": True},
        source="plc.toml [mail]",
    )
    assert cfg.smtp_host == "127.0.0.1" and cfg.smtp_port == 2525
    assert cfg.spool_dir == Path("/tmp/x")
    assert mail.MailConfig.from_mapping({"smtp_host": ""}).smtp_host is None
    with pytest.raises(ValueError, match=r"plc.toml \[mail\]: unknown key 'smtp'"):
        mail.MailConfig.from_mapping({"smtp": "x"}, source="plc.toml [mail]")
    with pytest.raises(ValueError, match="smtp_port must be int"):
        mail.MailConfig.from_mapping({"smtp_port": "25"})
    with pytest.raises(ValueError, match="smtp_port must be 1..65535"):
        mail.MailConfig.from_mapping({"smtp_port": 70000})
    with pytest.raises(ValueError, match="enabled must be bool"):
        mail.MailConfig.from_mapping({"enabled": 1})
    with pytest.raises(ValueError, match="sender"):
        mail.MailConfig.from_mapping({"sender": "bad\naddress@x"})


class _FakeCfg:
    """Stands in for plc.config.Config: only ``get(section, name)`` is used."""

    source = "plc.toml"

    def __init__(self, **mail_values: object) -> None:
        self.values = {"enabled": True, "smtp_host": "", "spool_dir": "/tmp/s",
                       "support_address": "support@plc.example.org",
                       "boot_address": "boot@plc.example.org", **mail_values}

    def get(self, section: str, name: str) -> object:
        assert section == "mail"
        return self.values[name]


def test_config_from_plc_config() -> None:
    cfg = mail.MailConfig.from_plc_config(_FakeCfg())
    assert cfg.smtp_host is None and cfg.spool_dir == Path("/tmp/s")
    assert cfg.sender == "support@plc.example.org" and cfg.boot_address == "boot@plc.example.org"
    cfg = mail.MailConfig.from_plc_config(_FakeCfg(smtp_host="mx.example.org:2525"))
    assert (cfg.smtp_host, cfg.smtp_port) == ("mx.example.org", 2525)
    cfg = mail.MailConfig.from_plc_config(_FakeCfg(smtp_host="mx.example.org"))
    assert (cfg.smtp_host, cfg.smtp_port) == ("mx.example.org", 25)
    cfg = mail.MailConfig.from_plc_config(_FakeCfg(smtp_host="[::1]:26"))
    assert (cfg.smtp_host, cfg.smtp_port) == ("::1", 26)
    with pytest.raises(ValueError, match=r"plc.toml: \[mail\] smtp_host = 'mx:0'"):
        mail.MailConfig.from_plc_config(_FakeCfg(smtp_host="mx:0"))
    assert not mail.MailConfig.from_plc_config(_FakeCfg(enabled=False)).enabled


def test_default_plc_config_spools_beside_the_database() -> None:
    """By default mail is on and goes to a spool directory next to the database."""
    from plc.config import Config

    cfg = mail.MailConfig.from_plc_config(Config().replace(db_path="/srv/plc/plc.db"))
    assert cfg.enabled and cfg.smtp_host is None
    assert cfg.spool_dir == Path("/srv/plc/mail")
    explicit = Config().replace(db_path="/srv/plc/plc.db", mail_spool_dir="/var/spool/x")
    assert mail.MailConfig.from_plc_config(explicit).spool_dir == Path("/var/spool/x")
