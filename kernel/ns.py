"""Namespace identities: which namespaces a process is in, and what still pins one.

A sliver's namespaces die with its last process unless something pins them: an
open /proc/PID/ns/* fd, a bind mount of one (nsfs in /proc/self/mountinfo), or a
process that joined them. Destroy must leave none; tests use `pinned` to check.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The namespaces a sliver gets of its own (the network namespace is the node's).
SLIVER_NAMESPACES = ("user", "mnt", "pid", "uts", "ipc", "cgroup")


def ns_ids(pid: int | str = "self") -> dict[str, int]:
    """Inode number of each namespace of `pid` (the kernel's identity for it)."""
    out = {}
    for kind in SLIVER_NAMESPACES + ("net",):
        try:
            out[kind] = os.stat(f"/proc/{pid}/ns/{kind}").st_ino
        except FileNotFoundError:
            raise ProcessLookupError(f"no process {pid}") from None
    return out


def pinned(inodes: set[int]) -> list[str]:
    """Describe every holder of any namespace in `inodes`: processes in it, open ns
    fds, nsfs bind mounts. An empty list means the namespaces are gone."""
    found: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for kind in SLIVER_NAMESPACES:
                if os.stat(proc / "ns" / kind).st_ino in inodes:
                    found.append(f"process {proc.name} is in {kind} namespace")
                    break
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(("user:[", "mnt:[", "pid:[", "uts:[", "ipc:[",
                                      "cgroup:[")):
                    ino = int(target.split("[", 1)[1].rstrip("]"))
                    if ino in inodes:
                        found.append(f"process {proc.name} holds fd {fd.name} -> {target}")
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].startswith("nsfs "):
            root = line.split()[3]
            if any(f"[{ino}]" in root for ino in inodes):
                found.append(f"nsfs mount: {line}")
    return found
