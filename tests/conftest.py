"""Shared test fixtures and markers.

Kernel tests need root and the real kernel; they skip (with the reason) only where the
machine lacks what they need. On the project's machines none skip.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="requires root (real namespaces, cgroups and seccomp)")
    for item in items:
        if "kernel" in item.keywords or "multinode" in item.keywords:
            item.add_marker(skip)
