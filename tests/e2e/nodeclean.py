"""`python -m tests.e2e.nodeclean BASE`: inside a test node's mount namespace, remove
whatever the node's agent left under BASE (contexts, sliver roots, the layer store).

Run by tests/e2e/netnode.py after `planetlab-agent sliver destroy`, as a sweep for
slivers the CLI did not know (the agent's own). Exit 1, naming what failed.
"""

from __future__ import annotations

import sys
from pathlib import Path


def sweep(base: Path) -> list[str]:
    from kernel import disk
    from kernel.context import Context
    from kernel.rootfs import list_roots, release_root

    errors: list[str] = []
    contexts = base / "run" / "contexts"
    for name in Context.list(contexts):
        try:
            try:
                Context.adopt(contexts, name).destroy()
            except (ProcessLookupError, FileNotFoundError):
                Context.destroy_stale(contexts, name)
        except Exception as exc:  # noqa: BLE001 - clean the rest, report all
            errors.append(f"context {name}: {exc}")
    roots = base / "state" / "roots"
    if roots.exists():
        for name in list_roots(roots):
            try:
                release_root(roots, name)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"root {name}: {exc}")
        try:
            disk.unmount_store(roots, remove=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"layer store: {exc}")
    return errors


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m tests.e2e.nodeclean BASE", file=sys.stderr)
        return 2
    errors = sweep(Path(sys.argv[1]))
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
