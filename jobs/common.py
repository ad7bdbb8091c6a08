"""What every job entrypoint shares: arguments, the run folder, and the Ray session.

Jobs are the only place that calls ray.init(). Under `ray job submit` (or with
RAY_ADDRESS set) they join the running cluster; otherwise they start a local one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from pagellm.config import ConfigError
from pagellm.runfolder import RunFolder, resolve_run

ROOT = Path(__file__).resolve().parent.parent


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pagellm {stage}", description=description)
    p.add_argument("--run", "--out", dest="run", required=True, help="run folder (created if missing)")
    p.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, else configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set ppo.lr=1e-5 (repeatable)")
    return p


def open_run(args: argparse.Namespace):
    """Resolve the config before any work starts; a bad config exits with a clear message."""
    try:
        return resolve_run(args.run, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Join RAY_ADDRESS if set (cluster / ray job submit), else start a local Ray."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            # Local: workers must import this checkout even when it is not pip-installed.
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                "TOKENIZERS_PARALLELISM": "false"}}
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 2), include_dashboard=False,
                     logging_level="WARNING", runtime_env=env)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


__all__ = ["RunFolder", "open_run", "ray_session", "stage_parser"]
