"""What every job entrypoint shares: arguments, the run folder, and the Ray session.

Jobs are the only place that calls ray.init(). Under `ray job submit` (or with
RAY_ADDRESS set) they join the running cluster; otherwise they start a local one.

On a cluster the run folder must be a path every node sees (a shared filesystem): Train
workers and PPO actors on other nodes read and write it directly. A relative `--run` is
placed under `storage` (config field, else $PAGELLM_STORAGE); inside a submitted job it
may not be left relative, because the job's working directory is a per-node temporary
copy that Ray deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from jobs import console
from pagellm.config import ConfigError, load_config
from pagellm.runfolder import RunFolder, resolve_run

ROOT = Path(__file__).resolve().parent.parent
STORAGE_ENV = "PAGELLM_STORAGE"
# Ray sets this in the driver process of a job started by `ray job submit`.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What a hand-started cluster driver does not ship to the workers with this checkout.
CHECKOUT_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pagellm {stage}", description=description)
    # Not required by argparse: a bad config is reported first (open_run), then a missing --run.
    p.add_argument("--run", "--out", dest="run", default=None,
                   help="run folder (created if missing; required); a relative path goes under `storage` when set")
    p.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, else configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set ppo.lr=1e-5 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's, Ray Train's, DeepSpeed's and Hugging Face's own log lines and "
                        "warnings (by default only the stages' progress and results; the rest is in Ray's logs)")
    return p


def in_submitted_job() -> bool:
    return SUBMITTED_JOB_ENV in os.environ


def _as_path(text: str, what: str) -> Path:
    """A filesystem path from a path or file:// URI; object-store URIs are refused clearly."""
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        raise ConfigError(
            f"{what}={text!r}: a run folder is read and written with file APIs by every node; "
            "mount the bucket or volume on every node (NFS/EFS/Filestore, mountpoint-s3, gcsfuse) "
            "and give its path"
        )
    return Path(text).expanduser()


def place_run(run: str, storage: str | None, submitted_job: bool = False) -> Path:
    """The absolute run folder for `--run`: itself when absolute, else under `storage`.

    Absolute because workers do not share the driver's working directory (under
    `ray job submit` every node unpacks its own copy)."""
    run_path = _as_path(run, "--run")
    if run_path.is_absolute():
        return Path(os.path.abspath(run_path))
    if storage:
        base = _as_path(storage, "storage")
        if not base.is_absolute():
            raise ConfigError(f"storage={storage!r} must be an absolute path (a filesystem every node mounts)")
        return Path(os.path.abspath(base / run_path))
    if submitted_job:
        raise ConfigError(
            f"--run {run!r} is relative and no storage is set: inside `ray job submit` it would land "
            "in the job's temporary working directory, which other nodes cannot see and Ray deletes. "
            f"Pass an absolute path on shared storage, or set `storage` (--set storage=/mnt/shared/runs "
            f"or ${STORAGE_ENV})"
        )
    return Path(os.path.abspath(run_path))


def _configured_storage(args: argparse.Namespace) -> str | None:
    """`storage` from --config/--set if given there, else $PAGELLM_STORAGE."""
    if _as_path(args.run, "--run").is_absolute():
        return None
    return load_config(args.config, args.overrides).storage or os.environ.get(STORAGE_ENV) or None


def open_run(args: argparse.Namespace):
    """Resolve the config before any work starts; a bad config exits with a clear message.
    Also sets what this job prints (jobs/console.py: quiet unless --verbose)."""
    console.configure(getattr(args, "verbose", False))
    try:
        if args.run is None:
            load_config(args.config, args.overrides)  # a config error is worth saying first
            raise ConfigError("--run (or --out) is required: the run folder to create or continue")
        run = place_run(args.run, _configured_storage(args), in_submitted_job())
        return resolve_run(run, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def checkout_runtime_env() -> dict:
    """Runtime env of a driver that joins a cluster by hand (RAY_ADDRESS, not a submitted
    job): ship this checkout to the workers unless the project is installed from a wheel."""
    env: dict = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **console.worker_env()}}
    if (ROOT / "pyproject.toml").exists():
        env |= {"working_dir": str(ROOT), "excludes": CHECKOUT_EXCLUDES}
    return env


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Join RAY_ADDRESS if set (cluster / ray job submit), else start a local Ray.

    Worker output reaches this console (log_to_driver), filtered to the stages' own lines
    unless --verbose (jobs/console.py)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.configure(console.verbose())  # benches call this without open_run
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # A submitted job already carries its runtime env (working_dir, env_vars).
            extra = {} if in_submitted_job() else {"runtime_env": checkout_runtime_env()}
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                     logging_level=console.ray_logging_level(), **extra)
        else:
            # Local: workers must import this checkout even when it is not pip-installed.
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                "TOKENIZERS_PARALLELISM": "false", **console.worker_env()}}
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 2), include_dashboard=False,
                     log_to_driver=True, logging_level=console.ray_logging_level(), runtime_env=env)
        started = True
        console.after_ray_init()
    try:
        yield ray
    except Exception:
        logs = console.ray_logs_dir()
        if logs and not console.verbose():
            print(f"Ray's own logs of this session: {logs} (--verbose prints them here)", file=sys.stderr, flush=True)
        raise
    finally:
        if started:
            ray.shutdown()


def stage_main(stage: str, doc: str, run, argv: list[str] | None = None) -> None:
    """The command line of a stage that runs on Ray: parse, resolve the run folder (a bad
    config fails here, before Ray starts), then `run(folder, cfg)` in a Ray session."""
    args = stage_parser(stage, doc).parse_args(argv)
    folder, cfg = open_run(args)
    with ray_session():
        run(folder, cfg)


def stage3_main(algorithm: str, doc: str, run, argv: list[str] | None = None) -> None:
    """stage_main for a stage-3 algorithm's own subcommand (`pagellm dpo`, ...): the
    subcommand names the algorithm, and the run folder's config records it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_main(algorithm, doc, run, [*argv, "--set", f"stage3.algorithm={algorithm}"])


__all__ = ["RunFolder", "in_submitted_job", "open_run", "place_run", "ray_session", "stage3_main", "stage_main",
           "stage_parser"]
