"""A node without a kernel, for testing the agent's pure logic (planning, dispatch).

Kernel behaviour itself is tested against the real kernel in test_agent_kernel.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.backend import MissingImage, SliverPlan


class FakeBackend:
    def __init__(self, images: tuple[str, ...] = ("base",), fail: set[str] | None = None) -> None:
        self.images = set(images)
        self.fail = fail or set()
        self.fail_destroy: set[str] = set()
        self.contexts: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def image_exists(self, image: str) -> bool:
        return image in self.images

    def live(self) -> set[str]:
        return set(self.contexts)

    def create(self, plan: SliverPlan) -> None:
        self.calls.append(("create", plan.name))
        if plan.name in self.fail:
            raise OSError(5, "simulated failure", plan.name)
        if plan.image not in self.images:
            raise MissingImage(plan.image)
        assert plan.name not in self.contexts, "double creation"
        self.contexts[plan.name] = {"plan": plan, "frozen": False}

    def guarded_init(self, name: str) -> int | None:
        return None

    def adopt(self, name: str) -> bool:
        self.calls.append(("adopt", name))
        return name in self.contexts

    def needs_restart(self, plan: SliverPlan) -> bool:
        return False

    def update(self, plan: SliverPlan) -> None:
        self.calls.append(("update", plan.name))
        self.contexts[plan.name]["plan"] = plan

    def start(self, name: str) -> None:
        self.calls.append(("start", name))
        self.contexts[name]["frozen"] = False

    def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        self.contexts[name]["frozen"] = True

    def destroy(self, name: str) -> None:
        self.calls.append(("destroy", name))
        if name in self.fail_destroy:
            raise OSError(16, "simulated busy", name)
        self.contexts.pop(name, None)

    def usage(self, name: str) -> dict[str, Any]:
        return {"cpu_usec": 0}

    def run(self, name: str, argv: list[str], user: str = "root",
            timeout: float = 60.0) -> tuple[int, str]:
        self.calls.append(("run", name))
        return 0, ""

    def root_of(self, name: str) -> Path | None:
        return None

    def frozen(self, name: str) -> bool:
        return bool(self.contexts.get(name, {}).get("frozen"))

    def uid_base_of(self, name: str) -> int | None:
        ctx = self.contexts.get(name)
        return None if ctx is None else int(ctx["plan"].uid_base)

    def enter(self, name: str, argv: list[str], tty: bool, winsize: tuple[int, int],
              env: dict[str, str]) -> Any:
        raise OSError(95, "no sessions without a kernel", name)


def sliver(name: str, **attrs: str) -> dict[str, Any]:
    return {"name": name, "slice_id": abs(hash(name)) % 100000, "instantiation":
            "plc-instantiated", "expires": 2**31 - 1,
            "keys": [{"key_type": "ssh", "key": f"ssh-ed25519 AAAA {name}"}],
            "attributes": [{"tagname": k, "value": v} for k, v in attrs.items()]}


def reply(slivers: list[dict[str, Any]], node_id: int = 1, timestamp: int = 1000) -> dict[str, Any]:
    return {"timestamp": timestamp, "node_id": node_id, "hostname": "node.test",
            "interfaces": [], "groups": [], "conf_files": [], "initscripts": [],
            "accounts": [], "slivers": slivers}
