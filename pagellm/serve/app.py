"""The Ray Serve application: POST /v1/page, POST /v1/score, GET /healthz (docs/ARCHITECTURE.md §8).

Requests are parsed and resolved (cold start, exclusions) one by one in the replica's event
loop; the model work is batched with `@serve.batch`, so concurrent requests share one
`generate_pages` call (left padding absorbs different prompt lengths, exclusions are per
row). The batch decodes inline, blocking the replica's user-code event loop, on purpose:
requests that arrive meanwhile wait in the replica and the next batch takes them all.
Handing the decode to a worker thread looks kinder but lets Serve keep cutting a batch
every `batch_wait_timeout_s` while one decodes; those small batches then queue behind it
(measured on the tiny policy at concurrency 16: ~1.5 requests per batch and twice the
server time per request).

Routing and the API's description are FastAPI's (`@serve.ingress`): `/docs` and
`/openapi.json` come with it. Bodies are still parsed by `schemas.parse_request`, not by
FastAPI's own body binding, because k and history limits come from the run's config (a
validation context FastAPI cannot pass) and every failure must read the same way:
`{"error": "...", "errors": [{"loc", "msg"}]}`, unknown routes and wrong methods included
(the exception handlers below). The cost, measured against the hand-written Starlette
router it replaced (`bench/serve_latency.py --routers`, docs/BENCHMARKS.md): +0.3-0.4 ms
p50 at concurrency 1, 4-12 % fewer pages/s at concurrency 16 on a 2-core box.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations
# (`Request`) as objects.

import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from pagellm.config import Config, ServeConfig
from pagellm.serve.engine import PageEngine, PageScorer, Prepared, ScoreInputs
from pagellm.serve.schemas import (
    Health,
    PageItem,
    PageRequest,
    PageResponse,
    RequestError,
    ScoreRequest,
    ScoreResponse,
    Timings,
    parse_request,
)

log = logging.getLogger("ray.serve")
DEPLOYMENT = "PageLLM"
ROUTES = {"/healthz": "GET", "/v1/page": "POST", "/v1/score": "POST"}


def default_threads() -> int:
    """Torch threads per replica: the replica's CPUs (Ray sets OMP_NUM_THREADS to them),
    at most 4; more threads than cores makes a small model slower, not faster."""
    return max(1, min(4, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class PageHandlers:
    """What a replica does for each route, routing aside (bench/serve_latency.py puts the
    old hand-written router in front of it to measure FastAPI's cost)."""

    def __init__(self, run_dir: str, config: dict, threads: int | None = None, device: str | None = None):
        import torch

        cfg = Config.model_validate(config)
        torch.set_num_threads(threads or default_threads())
        self.limits = {"max_k": cfg.serve.max_k, "max_history": cfg.serve.max_history}
        self.engine = PageEngine.load(run_dir, cfg, device)
        self.scorer = PageScorer.load(run_dir, device)
        self.run_dir = str(run_dir)
        self.batch_wait_s = cfg.serve.batch_wait_timeout_s
        self.in_flight = {"page": 0, "score": 0}
        for batched in (self.decode_batch, self.score_batch):
            batched.set_max_batch_size(cfg.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(self.batch_wait_s)
        log.info("PageLLM serving %s from %s (prompt window %d)",
                 self.engine.version, run_dir, self.engine.history_window)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def decode_batch(self, prepared: list[Prepared]) -> list[tuple]:
        start = time.perf_counter()
        pages = self.engine.pages(prepared)
        end = time.perf_counter()
        return [(page, start, end) for page in pages]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score_batch(self, rows: list[ScoreInputs]) -> list[tuple[float, float]]:
        return self.scorer.score(rows)

    def health(self) -> Health:
        return Health(model_version=self.engine.version, reward_model_version=self.scorer.version if self.scorer else None)

    async def _batched(self, kind: str, batched, row):
        """Call a @serve.batch method; a request alone in the replica does not wait for
        company: the batch wait applies only while others are in flight (Serve reads the
        timeout when a batch starts), so concurrency 1 pays no batching delay."""
        self.in_flight[kind] += 1
        try:
            batched.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight[kind] > 1 else 0.0)
            return await batched(row)
        finally:
            self.in_flight[kind] -= 1

    async def _page(self, body: bytes, arrived: float) -> PageResponse:
        req = parse_request(PageRequest, body, **self.limits)
        page, start, end = await self._batched("page", self.decode_batch, self.engine.prepare(req))
        done = time.perf_counter()
        return PageResponse(
            items=[PageItem(item_id=i, score=s) for i, s in zip(page.item_ids, page.scores)],
            model_version=self.engine.version,
            fallback=page.fallback,
            warnings=page.warnings,
            timings_ms=Timings(queue=_ms(start - arrived), decode=_ms(end - start), total=_ms(done - arrived)),
        )

    async def _score(self, body: bytes) -> ScoreResponse:
        if self.scorer is None:
            raise RequestError(
                f"no reward model in {self.run_dir}/reward: /v1/score needs one (run `pagellm reward --run "
                f"{self.run_dir}`)", 503
            )
        req = parse_request(ScoreRequest, body, **self.limits)
        inputs = self.engine.score_inputs(req)
        r_c, r_f = await self._batched("score", self.score_batch, inputs)
        return ScoreResponse(r_c=r_c, r_f=r_f, r=r_c + r_f, model_version=self.scorer.version, warnings=inputs.warnings)


api = FastAPI(title="PageLLM", summary="Recommendation pages written by a language-model policy",
              description="See docs/ARCHITECTURE.md §8 for the contract.")


def _body_schema(model) -> dict:
    """The request body as OpenAPI shows it; the endpoint reads the raw body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _path(request: Request) -> str:
    """The path under the application's route prefix, without a trailing slash."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's 404 and 405, worded like every other error of the API."""
    path = _path(request)
    if exc.status_code == 404:
        routes = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
        message = f"no route {request.method} {path}; routes: {routes} (API docs: GET /docs)"
    elif exc.status_code == 405 and path in ROUTES:
        message = f"{path} takes {ROUTES[path]}, not {request.method}"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message, "errors": []}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug answers 500 with its reason instead of a bare 'Internal Server Error'."""
    log.exception("PageLLM request failed", exc_info=exc)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "errors": []}, status_code=500)


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class PageService(PageHandlers):
    """The handlers behind FastAPI's routes."""

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return self.health()

    @api.post("/v1/page", response_model=PageResponse, openapi_extra=_body_schema(PageRequest))
    async def page(self, request: Request) -> PageResponse:
        arrived = time.perf_counter()
        return await self._page(await request.body(), arrived)

    @api.post("/v1/score", response_model=ScoreResponse, openapi_extra=_body_schema(ScoreRequest))
    async def score(self, request: Request) -> ScoreResponse:
        return await self._score(await request.body())


def deployment_options(serve_cfg: ServeConfig) -> dict:
    """Replica count or autoscaling, and enough ongoing requests per replica to fill a batch
    (Serve's default of 5 would cap every batch at 5)."""
    opts: dict = {"max_ongoing_requests": max(2 * serve_cfg.max_batch_size, 8),
                  "logging_config": {"enable_access_log": serve_cfg.access_log}}
    if serve_cfg.autoscaling:
        scaling = dict(serve_cfg.autoscaling)
        # Serve's default target (2 ongoing per replica) would add replicas long before a
        # batch is full; batching wants about one full batch in flight per replica.
        scaling.setdefault("target_ongoing_requests", serve_cfg.max_batch_size)
        opts["autoscaling_config"] = scaling
        if serve_cfg.num_replicas == "auto":
            opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = serve_cfg.num_replicas
    return opts


def build_app(run_dir: str | Path, cfg: Config, threads: int | None = None, device: str | None = None):
    """The bound application for `serve.run` / an app builder: one PageService deployment."""
    run_dir = str(Path(run_dir).resolve())
    deployment = PageService.options(**deployment_options(cfg.serve))
    return deployment.bind(run_dir, cfg.model_dump(mode="json"), threads, device)
