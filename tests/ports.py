"""Free local ports for servers and Ray nodes started by tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports are drawn above Ray's worker ports (10002-19999 by default) and below the kernel's
# ephemeral range, which every bind to port 0 draws from: a Ray started after the pick (a
# served run's own Ray binds a dozen ephemeral ports) could otherwise take the port between
# the pick and the server's bind ("Address already in use" in HAProxy, once in a clean run).
_LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1, outside the ephemeral range when there is room.

    The sockets stay bound until all `n` are picked, so no port is handed out twice; a port
    just freed is often the kernel's next answer, and two Ray components given one port
    refuse to start, which failed CI once.
    """
    high = _ephemeral_low() - 1
    sockets: list[socket.socket] = []
    try:
        for _ in range(200 * n):
            if len(sockets) == n:
                break
            s = socket.socket()
            port = random.randint(_LOW, high) if high - _LOW >= 100 * n else 0
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: draw another
                s.close()
                continue
            sockets.append(s)
        if len(sockets) < n:
            raise RuntimeError(f"no {n} free ports between {_LOW} and {high}")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
