"""Serving latency and throughput of the Ray Serve app, over real HTTP, K = 10.

    python bench/serve_latency.py [--out runs/bench_serve] [--models tiny tiny-guided gpt2-small]
                                  [--ingress proxy haproxy] [--duration 60] [--concurrency 16]
                                  [--requests 300]
    python bench/serve_latency.py --routers hand fastapi [--ingress proxy] [--rounds 6]

For each policy shape (random weights: timing does not depend on training) it builds a run
folder on one simulator data build, deploys the app on 127.0.0.1, and measures
  - concurrency 1: p50/p99 latency and pages/s over `--requests` sequential requests;
  - concurrency 16: a load run of `--duration` seconds (closed loop: each client thread
    sends its next request when the previous answers), pages/s, p50/p99 and errors
    (non-200 answers and pages that are not K distinct known items outside the history).
Each ingress (`serve.ingress`: Serve's Python proxy, or its HAProxy ingress) runs in its own
Ray instance, since Serve reads that switch when Ray starts.
`--routers hand fastapi` answers a different question: what FastAPI (`@serve.ingress`, the
app's router) costs over the hand-written Starlette router it replaced. Both serve the same tiny run from one Serve
instance (at /hand and /fastapi, behind the one `--ingress`), with the same engine code;
`--rounds` alternating rounds of c=1 requests, then of c=16 load, go to each in turn so a
neighbour's load on the box falls on both alike.
Client, proxy and replica share the machine, so numbers include the client's CPU; the
load average before and after each phase is recorded. Targets on a 2-core box: tiny p50
<= 20 ms at concurrency 1; concurrency-16 pages/s >= 4x concurrency-1 pages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import ray_session  # noqa: E402
from pagellm.config import load_config, save_config  # noqa: E402
from pagellm.data.pipeline import run_data_stage  # noqa: E402
from pagellm.models.evaluator import fit_evaluator  # noqa: E402
from pagellm.models.policy import build_policy, save_policy  # noqa: E402
from pagellm.serve.ingress import prepare_ingress  # noqa: E402
from pagellm.train.guided import publish  # noqa: E402
from pagellm.vocab import Vocab  # noqa: E402

SHAPES = {
    "tiny": [],  # configs/tiny.yaml: 2 layers, 64 wide
    # The tiny policy published by the guided stage with its evaluator term (weight 1, a
    # 1-epoch SASRec): what serving pays for the evaluator's pass per request.
    "tiny-guided": ["stage3.algorithm=guided"],
    "gpt2-small": ["model.init={n_layer: 12, n_embd: 768, n_head: 12, n_positions: 1024}"],
}
K = 10


def build_run(out: Path, shape: str, overrides: list[str]) -> tuple[Path, object]:
    """<out>/<shape>: the shared data build plus a randomly initialised SFT checkpoint."""
    data = out / "data"
    cfg = load_config(None, SHAPES[shape] + overrides)
    if not (data / "stats.json").exists():
        run_data_stage(cfg, data, log=lambda *_: None)
    run = out / shape
    if not (run / "sft" / "config.json").exists():
        (run).mkdir(parents=True, exist_ok=True)
        if not (run / "data").exists():
            (run / "data").symlink_to(data.resolve())
        save_policy(*build_policy(cfg.model, Vocab.from_parquet(data / "vocab.parquet"), seed=0), run / "sft")
    if cfg.stage3.algorithm == "guided" and not (run / "guided" / "evaluator").exists():
        evaluator = fit_evaluator(data, {"sasrec": {**cfg.eval.sasrec, "epochs": 1, "verbose": False}}, cfg.seed)
        publish(run, {"weight": 1.0}, evaluator)
    save_config(cfg, run / "config.yaml")
    return run, cfg


def request_pool(run: Path) -> list[dict]:
    """Real users with their test-time prompts (raw ids), as a client would send them."""
    vocab = Vocab.from_parquet(run / "data" / "vocab.parquet")
    evals = pd.read_parquet(run / "data" / "eval.parquet", columns=["user_index", "prompt_test"])
    return [{"user_id": vocab.user_ids[int(u)], "history": [vocab.item_ids[int(i)] for i in h], "k": K}
            for u, h in zip(evals["user_index"], evals["prompt_test"])]


def check_page(body: dict, req: dict, known: set[str]) -> str | None:
    ids = [item["item_id"] for item in body.get("items", [])]
    if len(ids) != K or len(set(ids)) != K:
        return f"page of {len(ids)} items ({len(set(ids))} distinct)"
    if not set(ids) <= known:
        return "unknown item on the page"
    if set(ids) & set(req["history"]):
        return "history item on the page"
    return None


class Load:
    """A closed-loop load on one asyncio loop (aiohttp, keep-alive): `concurrency` workers,
    each sending its next request when the previous answers. One loop instead of client
    threads keeps the load generator's own CPU small on a 2-core box it shares with the server."""

    def __init__(self, url: str, pool: list[dict], known: set[str]):
        self.url, self.pool, self.known = url + "/v1/page", pool, known

    def run(self, concurrency: int, seconds: float | None = None, requests_total: int | None = None,
            latencies: bool = False) -> dict:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        got, server, errors = asyncio.run(self._drive(concurrency, seconds, requests_total))
        wall = time.perf_counter() - start
        lat = np.array(got) * 1000.0
        return {**({"latencies_ms": lat} if latencies else {}),
            "concurrency": concurrency,
            "seconds": round(wall, 2),
            "pages": len(got),
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "pages_per_s": round(len(got) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            # Inside the replica: waiting for a batch slot, the batched decode, arrival to answer.
            "server_p50_ms": {part: round(float(np.percentile([t[part] for t in server], 50)), 1)
                              for part in ("queue", "decode", "total")} if server else None,
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }

    async def _drive(self, concurrency: int, seconds: float | None, requests_total: int | None):
        import aiohttp

        latencies, server, errors = [], [], {}
        counter = itertools.count()
        stop_at = time.perf_counter() + seconds if seconds else None
        timeout = aiohttp.ClientTimeout(total=120)

        async def worker(session, seed: int) -> None:
            rng = np.random.default_rng(seed)
            while True:
                n = next(counter)
                if (requests_total is not None and n >= requests_total) or (stop_at and time.perf_counter() >= stop_at):
                    return
                req = self.pool[int(rng.integers(len(self.pool)))]
                t0 = time.perf_counter()
                try:
                    async with session.post(self.url, json=req) as resp:
                        body = await resp.json(content_type=None)
                        status = resp.status
                    err = f"HTTP {status}" if status != 200 else check_page(body, req, self.known)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    err, body = type(exc).__name__, {}
                dt = time.perf_counter() - t0
                if err:
                    errors[err] = errors.get(err, 0) + 1
                else:
                    latencies.append(dt)
                    server.append(body["timings_ms"])

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(worker(session, s) for s in range(concurrency)))
        return latencies, server, errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_shape(shape: str, out: Path, args, url: str) -> dict:
    from ray import serve

    from pagellm.serve.app import build_app

    # No access log: a line per request, printed by this driver too, is CPU the server loses.
    run, cfg = build_run(out, shape, ["serve.access_log=false", *args.overrides, f"serve.ingress={args.ingress[0]}"])
    pool = request_pool(run)
    known = set(Vocab.from_parquet(run / "data" / "vocab.parquet").item_ids)
    t0 = time.perf_counter()
    serve.run(build_app(run, cfg, threads=args.threads), name=shape, route_prefix="/")
    ready_s = time.perf_counter() - t0
    load = Load(url, pool, known)
    load.run(1, requests_total=20)  # warm-up: first calls pay lazy init
    load.run(args.concurrency, seconds=3)
    c1 = load.run(1, requests_total=args.requests, seconds=args.c1_max_seconds)
    print(f"[{shape}] c=1  {c1}", flush=True)
    cN = load.run(args.concurrency, seconds=args.duration)
    print(f"[{shape}] c={args.concurrency} {cN}", flush=True)
    serve.delete(shape)
    with safe_open(str(run / "sft" / "model.safetensors"), "pt") as f:
        params = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    return {"ingress": cfg.serve.ingress, "shape": shape, "init": cfg.model.init, "params": params, "deploy_s": round(ready_s, 1),
            "batch": {"max_batch_size": cfg.serve.max_batch_size,
                      "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s},
            "c1": c1, "cN": cN, "speedup": round(cN["pages_per_s"] / c1["pages_per_s"], 2)}


def table(results: list[dict], concurrency: int) -> str:
    rows = [f"| ingress | policy | params | p50 ms (c=1) | p99 ms (c=1) | pages/s c=1 | pages/s c={concurrency} | "
            f"speedup | load run | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c1, cN = r["c1"], r["cN"]
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] else "?"
        rows.append(f"| {r['ingress']} | {r['shape']} | {params} | {c1['p50_ms']} | {c1['p99_ms']} | {c1['pages_per_s']} | "
                    f"{cN['pages_per_s']} | {r['speedup']}x | {cN['seconds']} s, {cN['pages']} pages | "
                    f"{cN['errors']} |")
    return "\n".join(rows)


def hand_service():
    """The hand-written Starlette router the app had before FastAPI, in front of the same
    handlers (pagellm.serve.app.PageHandlers): the baseline of `--routers`."""
    from ray import serve
    from starlette.responses import JSONResponse

    from pagellm.serve.app import ROUTES, PageHandlers, _path
    from pagellm.serve.schemas import RequestError

    @serve.deployment(name="PageLLMHand", ray_actor_options={"num_cpus": 1})
    class HandPageService(PageHandlers):
        async def __call__(self, request: Request) -> JSONResponse:
            arrived = time.perf_counter()
            path = _path(request)
            try:
                if path not in ROUTES:
                    raise RequestError(f"no route {request.method} {path}", 404)
                if request.method != ROUTES[path]:
                    raise RequestError(f"{path} takes {ROUTES[path]}, not {request.method}", 405)
                if path == "/healthz":
                    return JSONResponse(self.health().model_dump())
                body = await request.body()
                if path == "/v1/page":
                    return JSONResponse((await self._page(body, arrived)).model_dump())
                return JSONResponse((await self._score(body)).model_dump())
            except RequestError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)

    return HandPageService


def compare_routers(out: Path, args) -> None:
    """Hand router vs FastAPI on the tiny run, alternating rounds (see the module docstring)."""
    from ray import serve

    from pagellm.serve.app import build_app, deployment_options

    run, cfg = build_run(out, "tiny", ["serve.access_log=false", *args.overrides, f"serve.ingress={args.ingress[0]}"])
    pool = request_pool(run)
    known = set(Vocab.from_parquet(run / "data" / "vocab.parquet").item_ids)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    hand = hand_service().options(**deployment_options(cfg.serve))
    try:
        serve.run_many([
            serve.RunTarget(target=hand.bind(str(run.resolve()), cfg.model_dump(mode="json"), args.threads, None),
                            name="hand", route_prefix="/hand"),
            serve.RunTarget(target=build_app(run, cfg, threads=args.threads), name="fastapi", route_prefix="/fastapi"),
        ])
        loads = {name: Load(f"http://127.0.0.1:{port}/{name}", pool, known) for name in args.routers}
        for name, load in loads.items():
            warm = load.run(1, requests_total=30)  # warm-up
            if warm["errors"]:
                import requests

                answer = requests.post(load.url, json=pool[0], timeout=30).text[:300]
                raise RuntimeError(f"{name}: {warm['error_kinds']}: {answer}")
        c1 = {name: [] for name in loads}
        c16 = {name: [] for name in loads}
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for name, load in loads.items():
                c1[name].append(load.run(1, requests_total=per_round, latencies=True))
            for name, load in loads.items():
                c16[name].append(load.run(args.concurrency, seconds=args.duration / args.rounds))
    finally:
        serve.shutdown()
    rows = ["| router | p50 ms (c=1) | p99 ms (c=1) | pages/s c=1 | "
            f"p50 ms (c={args.concurrency}) | pages/s c={args.concurrency} | errors |", "|---|---|---|---|---|---|---|"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "ingress": args.ingress[0], "rounds": args.rounds, "routers": {}}
    for name in loads:
        lat = np.concatenate([r.pop("latencies_ms") for r in c1[name]])
        pages_c1 = sum(r["pages"] for r in c1[name]) / sum(r["seconds"] for r in c1[name])
        pages_cN = sum(r["pages"] for r in c16[name]) / sum(r["seconds"] for r in c16[name])
        p50_cN = float(np.median([r["p50_ms"] for r in c16[name]]))
        errors = sum(r["errors"] for r in c1[name] + c16[name])
        row = {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
               "pages_per_s_c1": round(pages_c1, 1), "p50_ms_cN": round(p50_cN, 1),
               "pages_per_s_cN": round(pages_cN, 1), "errors": errors, "requests_c1": int(len(lat))}
        report["routers"][name] = row
        rows.append(f"| {name} | {row['p50_ms']} | {row['p99_ms']} | {row['pages_per_s_c1']} | {row['p50_ms_cN']} | "
                    f"{row['pages_per_s_cN']} | {errors} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve_routers_{args.ingress[0]}.json").write_text(json.dumps(report, indent=2))
    print("\n".join(rows))
    print(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_serve")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the concurrency-N load run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests for the concurrency-1 numbers")
    ap.add_argument("--c1-max-seconds", type=float, default=90.0, help="cap on the concurrency-1 phase")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the served runs, e.g. --set serve.batch_wait_timeout_s=0.02")
    ap.add_argument("--ingress", nargs="+", default=["proxy", "haproxy"], choices=["proxy", "haproxy"],
                    help="serve.ingress modes to measure, each in a fresh Ray")
    ap.add_argument("--routers", nargs="+", choices=["hand", "fastapi"], default=None,
                    help="compare request routers on the tiny run instead (one --ingress)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per router with --routers")
    args = ap.parse_args()
    out = Path(args.out)
    if args.routers:
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
        prepare_ingress(args.ingress[-1])
        args.ingress = args.ingress[-1:]
        with ray_session():
            compare_routers(out, args)
        return
    if len(args.ingress) > 1:
        results = []
        for mode in args.ingress:  # one process per ingress: Serve reads the switch at Ray start
            # argparse keeps the last --ingress, so appending one overrides any given before it.
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ingress", mode], check=True)
            results += json.loads((out / f"serve_latency_{mode}.json").read_text())["results"]
        print(table(results, args.concurrency))
        return
    mode = args.ingress[0]
    # Replicas behind HAProxy hold on for 30 s at shutdown so a load balancer can take them
    # out; nothing routes to a benchmark's replicas after it, so do not wait.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    prepare_ingress(mode)
    results = []
    with ray_session():
        from ray import serve

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for shape in args.models:
                results.append(bench_shape(shape, out, args, f"http://127.0.0.1:{port}"))
        finally:
            serve.shutdown()
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "k": K,
        "ingress": mode,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve_latency_{mode}.json").write_text(json.dumps(report, indent=2))
    print(table(results, args.concurrency))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
