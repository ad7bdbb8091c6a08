"""What a job prints: by default the stages' own progress and result lines, nothing else.

Ray, Ray Train, Ray Data, DeepSpeed and Hugging Face all write to the console of the
process they run in, and Ray streams every worker's stdout/stderr to the driver
(`log_to_driver`): a tiny run printed hundreds of such lines around the dozen a user wants.
`--verbose` (or PAGELLM_VERBOSE=1) keeps all of it. By default:

- at the source, in the driver and (through the runtime env) in every Ray worker:
  Hugging Face progress bars and warnings off, Python deprecation/future warnings off,
  Ray Data's progress bars off, Ray's and Ray Data's console loggers at ERROR (their log
  files keep everything), DeepSpeed below ERROR dropped in the driver; Ray Train's print
  patch off, so a worker's print() reaches the driver once, not twice (raw and again
  through Train's logger);
- at the driver, on the stream of worker lines: only lines that start with a stage tag
  (`[sft] ...`, `[ppo] ...`; printed without Ray's "(RayTrainWorker pid=...)" prefix),
  the lines of Serve replicas (access logs) and the raylet's and autoscaler's own notices
  (a worker killed for memory, resources Ray cannot find) are printed.
  Everything else (Train controller and PlacementGroupCleaner chatter, "Reporting
  training result ...", C++ core-worker warnings of Ray's own actors) still lands in
  Ray's log files, `<session>/logs/` (printed when a stage fails).

A failing stage still shows its error: Ray raises a worker's exception, with its
traceback, in the driver.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "PAGELLM_VERBOSE"
STAGE_TAGS = ("run", "data", "sft", "reward", "ppo", "dpo", "degre", "eval", "serve")  # jobs/cli.py's stages
# "[sft] epoch 1/10 ...", "[sft_meta] ...", "[reward_coarse] ..." (Ray Train run names).
PROJECT_LINE = re.compile(r"^\[(?:%s)(?:[:_]\w+)?\] " % "|".join(STAGE_TAGS))
# Environment of this process and of every Ray worker, by default (the user's own settings win).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::PendingDeprecationWarning,ignore::FutureWarning",
}
# In both modes: Train V2 routes a worker's print() through its logger as well as printing
# it, and the driver showed every progress line twice.
ALWAYS_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
HANDLER_NAME = "ray_print_logs"  # the name Ray registers its worker-line printer under

_verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def verbose() -> bool:
    return _verbose


def configure(verbose: bool) -> None:
    """Quiet this process's libraries unless `verbose`; call before any stage work (the
    environment part must precede the libraries' imports to take full effect)."""
    global _verbose
    _verbose = verbose or _verbose
    for key, value in ALWAYS_ENV.items():
        os.environ.setdefault(key, value)
    if _verbose:
        os.environ[VERBOSE_ENV] = "1"  # a Ray job started from here inherits it
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # DeepSpeed's logger resets its level on import, but keeps filters added before.
    logging.getLogger("DeepSpeed").addFilter(_AtLeast(logging.ERROR))
    if "transformers" in sys.modules:  # already imported: its env vars were read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def worker_env() -> dict[str, str]:
    """env_vars for the runtime env of the Ray session this driver starts or joins."""
    keys = [*ALWAYS_ENV, *([] if _verbose else QUIET_ENV), VERBOSE_ENV]
    return {k: os.environ[k] for k in keys if k in os.environ}


def ray_logging_level() -> str:
    """The `logging_level` of ray.init: Ray's driver-side logger."""
    return "INFO" if _verbose else "ERROR"


def keep_worker_line(line: str, batch: dict) -> bool:
    """Whether a line a Ray worker wrote is shown on the driver's console by default."""
    if PROJECT_LINE.match(line):
        return True
    if batch.get("pid") in ("raylet", "autoscaler"):
        return True  # rare and worth seeing: a worker killed for memory, a request Ray cannot place
    return str(batch.get("actor_name") or "").startswith("ServeReplica")  # request logs, errors


def after_ray_init() -> bool:
    """Filter what Ray streams to this driver, and quiet Ray Data's console here. Returns
    whether worker lines are now filtered (False when verbose, or when this Ray version
    does not expose the printer, in which case nothing is hidden)."""
    if _verbose:
        return False
    import ray.data  # noqa: F401 - configures the "ray.data" logger, which we then adjust

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)  # the log file keeps everything
    return _filter_worker_lines(keep_worker_line)


def _filter_worker_lines(keep) -> bool:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printers = [handler for name, handler in getattr(dispatcher, "handlers", []) if name == HANDLER_NAME]
    if len(printers) != 1:
        return False
    (printer,) = printers
    # A stage's own line reads as it would on the driver, without Ray's "(RayTrainWorker
    # pid=...)" prefix; other kept lines (Serve replicas) keep it.
    bare = printer
    if isinstance(printer, functools.partial) and "ignore_prefix" in printer.keywords:
        bare = functools.partial(printer.func, *printer.args, **{**printer.keywords, "ignore_prefix": True})

    def filtered(batch: dict) -> None:
        lines = [line for line in batch.get("lines", []) if keep(line, batch)]
        ours = [line for line in lines if PROJECT_LINE.match(line)]
        others = [line for line in lines if not PROJECT_LINE.match(line)]
        if ours:
            bare({**batch, "lines": ours})
        if others:
            printer({**batch, "lines": others})

    filtered.__wrapped__ = printer  # type: ignore[attr-defined]
    dispatcher.remove_handler(HANDLER_NAME)
    dispatcher.add_handler(HANDLER_NAME, filtered)  # ray.shutdown() removes it by this name
    return True


def ray_logs_dir() -> str | None:
    """This Ray session's log folder (where the hidden lines are), if known."""
    try:
        import ray

        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - only a hint for the user
        return None


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level
