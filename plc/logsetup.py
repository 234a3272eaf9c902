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


def setup(verbose: bool = False) -> None:
    """Configure the root logger once for a program's lifetime."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
