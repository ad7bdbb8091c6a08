"""Serve a run's policy with Ray Serve: POST /v1/page, POST /v1/score, GET /healthz.

    pagellm serve --run runs/demo [--set serve.port=8080] [--threads 2]

blocks until Ctrl-C (or SIGTERM), on cfg.serve.host:port (127.0.0.1:8000 by default), behind
Serve's Python proxy or, with `--set serve.ingress=haproxy`, Serve's HAProxy ingress. On a cluster,
`serve deploy deploy/serve_config.yaml` builds the same application through
`app_builder` (args: run_dir, optional config and set).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from jobs.common import open_run, ray_session, stage_parser
from pagellm.config import load_config
from pagellm.runfolder import RunFolder
from pagellm.serve.app import build_app
from pagellm.serve.ingress import prepare_ingress

APP_NAME = "pagellm"


def app_builder(args: dict):
    """`serve deploy` entry: args {run_dir, config?: path, set?: ["serve.max_batch_size=32", ...],
    threads?: int}. Reads the run's saved config.yaml unless `config` is given; writes nothing."""
    if "run_dir" not in args:
        raise ValueError("the PageLLM app needs args.run_dir (the run folder to serve)")
    folder = RunFolder(Path(args["run_dir"]))
    config = args.get("config") or (folder.config if folder.config.exists() else None)
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(config, overrides)
    threads = int(args["threads"]) if args.get("threads") else None
    return build_app(folder.root, cfg, threads=threads)


def start(folder, cfg, threads: int | None = None) -> str:
    """Start Serve on cfg.serve.host:port and deploy the app (Ray must be up); returns the URL."""
    from ray import serve

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(folder.root, cfg, threads=threads), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("serve", __doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per replica (default: its CPUs, at most 4)")
    args = parser.parse_args(argv)
    folder, cfg = open_run(args)
    prepare_ingress(cfg.serve.ingress)
    with ray_session():
        from ray import serve

        url = start(folder, cfg, args.threads)
        print(f"[serve] PageLLM on {url}  (POST /v1/page, POST /v1/score, GET /healthz); Ctrl-C stops", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, `ray job stop`, docker stop
            signal.signal(sig, lambda *_: stop.set())
        try:
            stop.wait()
            print("[serve] shutting down", flush=True)
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
