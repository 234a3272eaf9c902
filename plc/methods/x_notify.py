"""Methods that send mail (spec 6.1 Persons): NotifyPersons, NotifySupport, ResetPassword,
VerifyPerson. Mail goes through plc.mail (SMTP host or spool directory, [mail] of
plc.toml); a delivery failure is fault 111 and rolls the call back. Message texts come
from the ``messages`` table when a template of that id is present and enabled (fields
are filled with ``%(name)s``), otherwise from the built-in texts below."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from plc import mail
from plc.auth import Auth
from plc.faults import PLCAPIError, PLCInvalidArgument
from plc.filters import FilterParam
from plc.methods._util import id_or_name
from plc.methods._xtra import xmethod
from plc.model import Person
from plc.params import Parameter
from plc.passwords import hash_password

if TYPE_CHECKING:
    from plc.api import Call

_ONE = Parameter(int, "1 if successful")
KEY_LIFETIME = 24 * 3600

#: message_id -> (subject, body), used when the messages table has no such template
BUILTIN = {
    "PASSWORD_RESET_REQUESTED": (
        "%(PLC_NAME)s password reset requested",
        "Someone asked to reset the password of your %(PLC_NAME)s account %(email)s.\n"
        "To reset it, visit\n\n"
        "  https://%(PLC_WWW_HOST)s:%(PLC_WWW_SSL_PORT)s/db/persons/reset_password.php"
        "?id=%(person_id)d&key=%(verification_key)s\n\n"
        "The link is valid until %(expires)s. If you did not ask, ignore this message.\n"),
    "PASSWORD_RESET": (
        "%(PLC_NAME)s password reset",
        "The password of your %(PLC_NAME)s account %(email)s has been reset to\n\n"
        "  %(password)s\n\nPlease log in and change it.\n"),
    "VERIFY_ACCOUNT": (
        "Verify your %(PLC_NAME)s account",
        "To verify the e-mail address of your new %(PLC_NAME)s account %(email)s, visit\n\n"
        "  https://%(PLC_WWW_HOST)s:%(PLC_WWW_SSL_PORT)s/db/persons/register.php"
        "?id=%(person_id)d&key=%(verification_key)s\n\n"
        "The link is valid until %(expires)s.\n"),
    "ACCOUNT_VERIFIED": (
        "%(PLC_NAME)s account %(email)s verified",
        "%(first_name)s %(last_name)s <%(email)s> has verified the e-mail address of\n"
        "%(PLC_NAME)s account %(person_id)d. A PI of the account's site may now enable it.\n"),
}


def _template(call: Call, message_id: str) -> tuple[str, str]:
    rows = call.conn.query("SELECT subject, template FROM messages WHERE message_id = ? AND "
                           "enabled = 1", [message_id])
    if rows and rows[0]["template"]:
        return rows[0]["subject"] or BUILTIN[message_id][0], rows[0]["template"]
    return BUILTIN[message_id]


def _render(call: Call, message_id: str, values: dict[str, Any]) -> tuple[str, str]:
    subject, body = _template(call, message_id)
    values = {"PLC_NAME": call.config.get("plc", "name"),
              "PLC_WWW_HOST": call.config.get("www", "host"),
              "PLC_WWW_SSL_PORT": call.config.get("www", "ssl_port"), **values}
    try:
        return subject % values, body % values
    except (KeyError, ValueError, TypeError) as exc:
        raise PLCAPIError(f"message template {message_id} is broken: {exc}") from None


def send(call: Call, to: list[str], subject: str, body: str, cc: list[str] | None = None) -> None:
    """Send through the configured mail route; fault 111 when that fails."""
    try:
        cfg = mail.MailConfig.from_plc_config(call.config)
        mail.send(cfg, to, subject, body, cc or [])
    except (mail.MailError, ValueError) as exc:
        raise PLCAPIError(f"mail not sent: {exc}") from None


def _person(call: Call, person_id_or_email: int | str) -> dict[str, Any]:
    person = call.one(Person, person_id_or_email,
                      ["person_id", "email", "first_name", "last_name", "enabled", "peer_id",
                       "site_ids"], what="person")
    if person["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local account")
    key = call.conn.query("SELECT verification_key, verification_expires FROM persons "
                          "WHERE person_id = ?", [person["person_id"]])[0]
    return {**person, **key}


def _site_pis(call: Call, site_ids: list[int]) -> list[str]:
    if not site_ids:
        return []
    marks = ", ".join("?" * len(site_ids))
    return [r["email"] for r in call.conn.query(
        "SELECT DISTINCT p.email FROM persons p JOIN person_site s ON s.person_id = p.person_id "
        "JOIN person_role r ON r.person_id = p.person_id JOIN roles ro ON ro.role_id = r.role_id "
        f"WHERE s.site_id IN ({marks}) AND ro.name = 'pi' AND p.enabled = 1 AND p.deleted = 0 "
        "ORDER BY p.email", site_ids)]


def _new_key(call: Call, person: dict[str, Any], expires: int | None) -> dict[str, Any]:
    key = secrets.token_hex(16)
    expires = call.now + KEY_LIFETIME if expires is None else expires
    if expires <= call.now:
        raise PLCInvalidArgument("verification_expires must be in the future")
    call.update("persons", {"person_id": person["person_id"]},
                {"verification_key": key, "verification_expires": expires})
    return {**person, "verification_key": key,
            "expires": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))}


def _check_key(call: Call, person: dict[str, Any], key: str) -> None:
    if not person["verification_key"] or not secrets.compare_digest(
            person["verification_key"], key):
        raise PLCInvalidArgument("Verification key incorrect")
    if person["verification_expires"] is not None and person["verification_expires"] < call.now:
        raise PLCInvalidArgument("Verification key has expired; request a new one")


@xmethod(roles=["admin", "node"],
         accepts=[Auth(), FilterParam(Person), Parameter(str, "E-mail subject", min=1),
                  Parameter(str, "E-mail body")],
         returns=_ONE)
def NotifyPersons(call: Call, auth: dict, person_filter: Any, subject: str, body: str) -> int:
    """Sends an e-mail message to the persons matching the filter (one message, every
    recipient in To). No matching person is an error."""
    persons = call.get(Person, person_filter, ["person_id", "email"])
    if not persons:
        raise PLCInvalidArgument("No such user(s)")
    send(call, [p["email"] for p in persons], subject, body)
    ids = [p["person_id"] for p in persons]
    call.log(f"Sent message to {len(ids)} person(s)", Person=ids)
    return 1


@xmethod(roles=["admin"], accepts=[Auth(), Parameter(str, "E-mail subject", min=1),
                                   Parameter(str, "E-mail body")], returns=_ONE)
def NotifySupport(call: Call, auth: dict, subject: str, body: str) -> int:
    """Sends an e-mail message to the support address of this PLC."""
    send(call, [call.config.get("mail", "support_address")], subject, body)
    call.log("Sent message to support")
    return 1


@xmethod(roles=["admin"],
         accepts=[Auth(), id_or_name(Person), Parameter(str, "Verification key", nullok=True),
                  Parameter(int, "Key expiry, seconds since epoch", nullok=True)],
         returns=_ONE)
def ResetPassword(call: Call, auth: dict, person_id_or_email: int | str,
                  verification_key: str | None = None,
                  verification_expires: int | None = None) -> int:
    """Without a key: stores a new verification key (valid 24 h, or until
    verification_expires) and mails the person a link carrying it. With the right,
    unexpired key: sets a new random password and mails it to the person."""
    person = _person(call, person_id_or_email)
    if not person["enabled"]:
        raise PLCInvalidArgument("Person account not enabled")
    if verification_key is None:
        values = _new_key(call, person, verification_expires)
        subject, body = _render(call, "PASSWORD_RESET_REQUESTED", values)
        call.log(f"Password reset requested for person {person['person_id']}",
                 Person=person["person_id"])
    else:
        _check_key(call, person, verification_key)
        password = secrets.token_urlsafe(12)
        call.update("persons", {"person_id": person["person_id"]},
                    {"password": hash_password(password), "verification_key": None,
                     "verification_expires": None, "last_updated": call.now})
        subject, body = _render(call, "PASSWORD_RESET", {**person, "password": password})
        call.log(f"Password reset for person {person['person_id']}",
                 Person=person["person_id"])
    send(call, [person["email"]], subject, body)
    return 1


@xmethod(roles=["admin"],
         accepts=[Auth(), id_or_name(Person), Parameter(str, "Verification key", nullok=True),
                  Parameter(int, "Key expiry, seconds since epoch", nullok=True)],
         returns=_ONE)
def VerifyPerson(call: Call, auth: dict, person_id_or_email: int | str,
                 verification_key: str | None = None,
                 verification_expires: int | None = None) -> int:
    """Verifies the e-mail address of a new (still disabled) account. Without a key:
    stores a new verification key and mails the person a link carrying it. With the
    right, unexpired key: clears it and tells the PIs of the person's sites (or support)
    that the account is verified; enabling it stays with them."""
    person = _person(call, person_id_or_email)
    if person["enabled"]:
        raise PLCInvalidArgument(f"Person account {person['person_id']} already enabled")
    if verification_key is None:
        values = _new_key(call, person, verification_expires)
        subject, body = _render(call, "VERIFY_ACCOUNT", values)
        to = [person["email"]]
        call.log(f"Verification requested for person {person['person_id']}",
                 Person=person["person_id"])
    else:
        _check_key(call, person, verification_key)
        call.update("persons", {"person_id": person["person_id"]},
                    {"verification_key": None, "verification_expires": None})
        subject, body = _render(call, "ACCOUNT_VERIFIED", person)
        to = _site_pis(call, person["site_ids"]) or [call.config.get("mail", "support_address")]
        call.log(f"Person {person['person_id']} verified", Person=person["person_id"])
    send(call, to, subject, body)
    return 1
