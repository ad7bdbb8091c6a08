"""Free local ports for servers and Ray nodes started by tests."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1.

    The sockets stay bound until all `n` are picked. Picking one at a time (bind, read, close)
    can hand out the same port twice, because a port just freed is often the kernel's next
    answer; two Ray components given one port refuse to start, which failed CI once.
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
