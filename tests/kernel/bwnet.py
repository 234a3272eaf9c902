"""A veth pair into a network namespace, and a paced UDP sender, for shaping tests.

Names and addresses derive from os.getpid() so parallel runs do not collide."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

UDP_PAYLOAD = 1400
WIRE_V4 = UDP_PAYLOAD + 8 + 20 + 14   # what HTB counts per packet (skb->len on veth)
WIRE_V6 = UDP_PAYLOAD + 8 + 40 + 14


@dataclass(frozen=True)
class Net:
    ns: str
    host: str
    sink4: str
    exempt4: str
    sink6: str
    exempt6: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def veth_netns(tag: str = "") -> Iterator[Net]:
    pid = os.getpid()
    ns, host, peer = f"bw{tag}{pid}", f"bwh{tag}{pid}"[:15], f"bwp{tag}{pid}"[:15]
    o2, o3 = 64 + (pid >> 8) % 128, pid & 0xFF
    o1 = 10 if not tag else 11
    net = Net(ns, host, f"{o1}.{o2}.{o3}.2", f"{o1}.{o2}.{o3}.3",
              f"fd42:{pid & 0xFFFF:x}:{len(tag)}::2", f"fd42:{pid & 0xFFFF:x}:{len(tag)}::3")
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("addr", "add", f"{o1}.{o2}.{o3}.1/24", "dev", host)
        _ip("-6", "addr", "add", f"fd42:{pid & 0xFFFF:x}:{len(tag)}::1/64", "dev", host, "nodad")
        _ip("link", "set", host, "up")
        for addr in (f"{net.sink4}/24", f"{net.exempt4}/24"):
            _ip("-n", ns, "addr", "add", addr, "dev", peer)
        for addr in (f"{net.sink6}/64", f"{net.exempt6}/64"):
            _ip("-n", ns, "-6", "addr", "add", addr, "dev", peer, "nodad")
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield net
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def udp_socket(priority: int | None, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    if priority is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, priority)
    s.setblocking(False)
    return s


def send_count(dest: str, priority: int | None, count: int, family: int = socket.AF_INET) -> None:
    """Send `count` packets, slowly enough that none is dropped."""
    s = udp_socket(priority, family)
    s.setblocking(True)
    try:
        for _ in range(count):
            s.sendto(b"x" * UDP_PAYLOAD, (dest, 9))
            time.sleep(0.0005)
    finally:
        s.close()


class Blaster:
    """Paced UDP senders (one thread): each flow sends at `bits` bit/s of payload+headers,
    enough above its class's ceiling to keep the class backlogged."""

    def __init__(self, flows: list[tuple[str, int | None, int]]) -> None:
        self.flows = [(dest, udp_socket(prio), bits) for dest, prio, bits in flows]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        payload = b"x" * UDP_PAYLOAD
        start = time.monotonic()
        sent = [0] * len(self.flows)
        while not self.stop.is_set():
            elapsed = time.monotonic() - start
            for i, (dest, sock, bits) in enumerate(self.flows):
                due = int(elapsed * bits / 8 / WIRE_V4) + 4
                while sent[i] < due:
                    try:
                        sock.sendto(payload, (dest, 9))
                    except (BlockingIOError, OSError):
                        pass
                    sent[i] += 1
            time.sleep(0.002)

    def __enter__(self) -> Blaster:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for _, sock, _ in self.flows:
            sock.close()


def measure(read_bytes, seconds: float) -> float:
    """bit/s of a byte counter over `seconds` (read_bytes() -> int)."""
    b0, t0 = read_bytes(), time.monotonic()
    time.sleep(seconds)
    b1, t1 = read_bytes(), time.monotonic()
    return (b1 - b0) * 8 / (t1 - t0)
