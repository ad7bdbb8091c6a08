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

Request handling is plain Starlette (no FastAPI): every failure becomes a JSON body
`{"error": "...", "errors": [{"loc", "msg"}]}` with a readable message, the way
`schemas.parse_request` writes it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

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


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1})
class PageService:
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

    async def __call__(self, request: Request) -> JSONResponse:
        arrived = time.perf_counter()
        path = self._route_path(request)
        try:
            if path not in ROUTES:
                routes = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
                raise RequestError(f"no route {request.method} {path}; routes: {routes}", 404)
            if request.method != ROUTES[path]:
                raise RequestError(f"{path} takes {ROUTES[path]}, not {request.method}", 405)
            if path == "/healthz":
                health = Health(
                    model_version=self.engine.version, reward_model_version=self.scorer.version if self.scorer else None
                )
                return JSONResponse(health.model_dump())
            body = await request.body()
            if path == "/v1/page":
                return JSONResponse((await self._page(body, arrived)).model_dump())
            return JSONResponse((await self._score(body)).model_dump())
        except RequestError as exc:
            headers = {"Allow": ROUTES[path]} if exc.status == 405 else None
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        except Exception as exc:  # a bug must answer 500 with its reason, not drop the connection
            log.exception("PageLLM request failed")
            body = {"error": f"internal error: {type(exc).__name__}: {exc}", "errors": []}
            return JSONResponse(body, status_code=500)

    @staticmethod
    def _route_path(request: Request) -> str:
        """The path under the application's route prefix, without a trailing slash."""
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return "/" + path.strip("/")

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
