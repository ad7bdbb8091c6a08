"""Waiting for something that is starting (a server, a cluster node) in a test.

While a service starts, every kind of answer can mean "not ready yet": a refused or reset
connection, a read that times out because the port is open but nothing answers yet, a 503,
a CLI that hangs. A wait that tolerates only some of them fails by timing; `wait_until`
tolerates all of them until its deadline and then says what the last answer was.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Ray gives a starting node a fixed 30 s (ray/_private/node.py) to register with its GCS; a
# second Ray on a loaded 2-core box can miss that. Nothing started then, so a retry is safe.
RAY_NODE_START_TIMED_OUT = "The current node timed out during startup"


def wait_until(ready: Callable[[], bool], timeout_s: float, *, interval_s: float = 1.0,
               gave_up: Callable[[], bool] = lambda: False) -> str | None:
    """Call `ready()` until it returns True; an exception it raises counts as not ready.

    Returns None once ready, else why not: the deadline passed (with the last exception,
    if any) or `gave_up()` turned True (e.g. the process being waited for exited).
    """
    deadline = time.monotonic() + timeout_s
    last = "ready() returned False"
    while True:
        if gave_up():
            return f"gave up after {timeout_s - (deadline - time.monotonic()):.0f}s; last answer: {last}"
        try:
            if ready():
                return None
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "not ready yet"
            last = f"{type(exc).__name__}: {exc}"
        else:
            last = "ready() returned False"
        if time.monotonic() >= deadline:
            return f"not ready after {timeout_s:.0f}s; last answer: {last}"
        time.sleep(interval_s)


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    """True when GET `url` answers 200 within `timeout_s`; raises or returns False otherwise."""
    import requests

    return requests.get(url, timeout=timeout_s).status_code == 200
