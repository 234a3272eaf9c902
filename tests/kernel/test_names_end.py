"""Names end where the pattern ends: Python's '$' also matches before a trailing
newline, so 'x\\n' passed every '^...$' check and then broke the line-based uid index
(issue 9 item 9). No kernel-level name check accepts a trailing newline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel import context, images, rootfs


@pytest.mark.parametrize("name", ["pl_x\n", "pl_x\r\n", "pl_x\n\n"])
def test_names_with_a_trailing_newline_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        context._check_name(name)
    with pytest.raises(ValueError):
        rootfs._check_name(name)
    with pytest.raises(images.ImageError):
        images.check_name(name)
    run_dir = tmp_path / f"run-{os.getpid()}"
    with pytest.raises(ValueError):
        context.reserve_uid_range(run_dir, name, 65536, base=100000)
    assert not (run_dir / ".uid-ranges").exists() or \
        (run_dir / ".uid-ranges").read_text() == ""
    context._check_name(name.rstrip())   # the same name without it is fine
