"""Logging of every PlanetLab program: one line per record on stderr, read by people
and by journald alike.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) each line
starts with its syslog priority, `<3>` for an error, which journald turns into the
entry's priority and strips; journald stamps the time itself. On a terminal or in a
file each line starts with the time instead.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """`<PRIORITY>logger LEVEL message`: journald's syslog-level prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # A multi-line record (a traceback) stays one journal entry per line, each
        # with the record's priority.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


#: The longest argument of a log record (a slice's tag value, a caller's string) and
#: the longest message: a huge value never floods the log (issue 15).
ARG_MAX = 300
MESSAGE_MAX = 4000


def bounded(value: object, limit: int = ARG_MAX) -> object:
    """`value`, or its text cut at `limit` characters with the full length said."""
    if isinstance(value, int | float | bool) or value is None:
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return value
    return f"{text[:limit]}... ({len(text)} characters)"


class BoundedRecords(logging.Filter):
    """Cuts every argument of a record, and its message, to a bounded length."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(bounded(a) for a in record.args)
        if isinstance(record.msg, str) and len(record.msg) > MESSAGE_MAX:
            record.msg = bounded(record.msg, MESSAGE_MAX)
        return True


def setup(verbose: bool = False) -> None:
    """Configure the root logger once for a program's lifetime."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(BoundedRecords())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
