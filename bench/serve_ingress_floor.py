"""What the HTTP ingress alone costs: a no-op Serve deployment behind each `serve.ingress`.

    python bench/serve_ingress_floor.py [--ingress proxy haproxy] [--requests 300] [--c16-requests 1500]

The deployment reads the body and answers a fixed 10-item JSON page, so the numbers are
the floor any model served behind that ingress starts from on this machine: p50 latency
at concurrency 1 and requests/s at concurrency 1 and 16 (aiohttp closed loop, as in
serve_latency.py). Each ingress runs in its own Ray instance (Serve reads the switch when
Ray starts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import ray_session  # noqa: E402
from pagellm.serve.ingress import prepare_ingress  # noqa: E402

BODY = {"user_id": "u1", "history": [f"i{i}" for i in range(20)], "k": 10}


async def drive(url: str, requests_total: int, concurrency: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    todo = iter(range(requests_total))

    async def worker(session) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            async with session.post(url, json=BODY) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests_total,
            "p50_ms": round(float(np.percentile(np.array(latencies) * 1000, 50)), 2),
            "requests_per_s": round(requests_total / wall, 1)}


def measure(mode: str, args) -> dict:
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    prepare_ingress(mode)
    with ray_session():
        from ray import serve
        from starlette.responses import JSONResponse

        @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                          logging_config={"enable_access_log": False})
        class Echo:
            async def __call__(self, request):
                await request.body()
                return JSONResponse({"items": [{"item_id": f"i{i}", "score": 0.0} for i in range(10)]})

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(Echo.bind(), name="echo", route_prefix="/")
            url = f"http://127.0.0.1:{port}/"
            asyncio.run(drive(url, 50, 1))  # warm-up
            c1 = asyncio.run(drive(url, args.requests, 1))
            c16 = asyncio.run(drive(url, args.c16_requests, 16))
        finally:
            serve.shutdown()
    return {"ingress": mode, "c1": c1, "c16": c16, "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ingress", nargs="+", default=["proxy", "haproxy"], choices=["proxy", "haproxy"])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--c16-requests", type=int, default=1500)
    args = ap.parse_args()
    if len(args.ingress) > 1:  # one process per ingress
        rows = []
        for mode in args.ingress:
            out = subprocess.run([sys.executable, __file__, "--ingress", mode, "--requests", str(args.requests),
                                  "--c16-requests", str(args.c16_requests)], check=True, capture_output=True,
                                 text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        print("| ingress | p50 ms (c=1) | req/s c=1 | req/s c=16 |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['ingress']} | {r['c1']['p50_ms']} | {r['c1']['requests_per_s']} | {r['c16']['requests_per_s']} |")
        return
    print(json.dumps(measure(args.ingress[0], args)))


if __name__ == "__main__":
    main()
