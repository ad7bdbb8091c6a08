"""What a job prints by default: the stages' own lines; Ray's and the libraries' only with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs import console
from waiting import RAY_NODE_START_TIMED_OUT

ROOT = Path(__file__).resolve().parent.parent

NOISE = [
    "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x), metrics={})",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
    "Exception in thread PlacementGroupCleanerMonitor:",
    "Requesting resources: {'CPU': 1} * 1",
    "[2026-12-01 09:28:26,260] [WARNING] [lr_schedules.py:759:get_lr] Attempting to get learning rate",
    "[transformers] `past_key_values`/`cache_params` are deprecated. Use `cache` instead.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "Writing model shards: 100%|##########| 1/1 [00:00<00:00, 430.23it/s]",
]
PROGRESS = [
    "[sft] epoch 1/10 step 3/30 lr 0.003 train_loss 3.964 9.8 it/s eta 0:10",
    "[sft_meta] epoch 2/8 step 10/40 train_loss 4.1",
    "[reward_coarse] epoch 1/5 step 4/20 train_loss 0.7",
    "[ppo] step 1/30 reward +2.0121 kl -0.0000",
]


def test_only_stage_lines_and_serve_replicas_pass_by_default():
    worker = {"actor_name": "RayTrainWorker"}
    assert all(console.keep_worker_line(line, worker) for line in PROGRESS)
    assert not any(console.keep_worker_line(line, worker) for line in NOISE)
    assert console.keep_worker_line("POST /v1/page 200 3.1ms", {"actor_name": "ServeReplica:pagellm:PageLLM"})
    assert not console.keep_worker_line("Started Serve controller", {"actor_name": "ServeController"})
    assert console.keep_worker_line("A worker died or was killed while executing a task", {"pid": "raylet"})


def test_the_worker_line_printer_is_replaced_by_a_filtered_one():
    """Against this Ray's own dispatcher: if an upgrade renames it, this fails instead of the
    console silently filling up again."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[str] = []
    saved = list(dispatcher.handlers)
    try:
        dispatcher.handlers = [(console.HANDLER_NAME, lambda batch: printed.extend(batch["lines"]))]
        assert console._filter_worker_lines(console.keep_worker_line)
        dispatcher.emit({"lines": NOISE + PROGRESS, "actor_name": "RayTrainWorker", "pid": 1, "ip": "x",
                         "is_err": False})
        dispatcher.emit({"lines": NOISE, "actor_name": "TrainController", "pid": 2, "ip": "x", "is_err": True})
        assert printed == PROGRESS
    finally:
        dispatcher.handlers = saved


@pytest.fixture
def fresh_console(monkeypatch):
    """configure() changes this process (environment, warning filters, a logger filter):
    start from a clean slate and put everything back afterwards."""
    import logging
    import warnings

    saved_env, saved_filters = dict(os.environ), list(warnings.filters)
    deepspeed = logging.getLogger("DeepSpeed")
    saved_ds = list(deepspeed.filters)
    monkeypatch.setattr(console, "_verbose", False)
    for key in [*console.QUIET_ENV, *console.ALWAYS_ENV, console.VERBOSE_ENV]:
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    warnings.filters[:] = saved_filters
    deepspeed.filters[:] = saved_ds


def test_stage_lines_lose_rays_prefix_and_replica_lines_keep_it():
    import functools

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    calls: list[tuple[bool, list[str]]] = []

    def printer(batch, ignore_prefix):
        calls.append((ignore_prefix, batch["lines"]))

    saved = list(dispatcher.handlers)
    try:
        dispatcher.handlers = [(console.HANDLER_NAME, functools.partial(printer, ignore_prefix=False))]
        assert console._filter_worker_lines(console.keep_worker_line)
        dispatcher.emit({"lines": ["[ppo] step 1/2", "GET /healthz 200"], "actor_name": "ServeReplica:a:b"})
        assert calls == [(True, ["[ppo] step 1/2"]), (False, ["GET /healthz 200"])]
    finally:
        dispatcher.handlers = saved


def test_verbose_leaves_everything_on(fresh_console):
    console.configure(True)
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"
    assert not any(k in os.environ for k in console.QUIET_ENV)
    assert console.ray_logging_level() == "INFO" and not console.after_ray_init()
    assert set(console.worker_env()) == {*console.ALWAYS_ENV, console.VERBOSE_ENV}


def test_quiet_by_default_sets_the_source_knobs_for_workers_too(fresh_console):
    import logging

    console.configure(False)
    assert not console.verbose()
    assert console.worker_env() == {**console.QUIET_ENV, **console.ALWAYS_ENV}
    assert console.ray_logging_level() == "ERROR"
    deepspeed = logging.getLogger("DeepSpeed")
    assert not deepspeed.filter(logging.LogRecord("DeepSpeed", logging.WARNING, "", 0, "noise", None, None))
    assert deepspeed.filter(logging.LogRecord("DeepSpeed", logging.ERROR, "", 0, "real", None, None))


@pytest.mark.timeout(300)
def test_a_ray_session_prints_worker_progress_but_not_rays_chatter(tmp_path):
    """A real local Ray started the way jobs start it: a task's stage line reaches the
    console once, its noise and Ray's own lines do not."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent('''
        import logging, sys, warnings
        sys.path.insert(0, sys.argv[1])
        from jobs import console
        from jobs.common import ray_session
        console.configure(False)
        with ray_session(num_cpus=1) as ray:
            @ray.remote(num_cpus=1)
            def work():
                print("[sft] epoch 1/1 step 1/1 train_loss 1.0", flush=True)
                print("Reporting training result 1: TrainingReport(...)", flush=True)
                logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state.")
                warnings.warn("old api", FutureWarning)
                return 1
            assert ray.get(work.remote()) == 1
            import time; time.sleep(2)  # the log monitor ships worker lines in batches
        print("[run] done", flush=True)
    '''))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.VERBOSE_ENV)}
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True,
                              timeout=240, env=env, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        if RAY_NODE_START_TIMED_OUT not in out:
            break
    assert proc.returncode == 0, out
    assert out.count("[sft] epoch 1/1 step 1/1 train_loss 1.0") == 1, out
    assert "[run] done" in out
    for noise in ("Reporting training result", "Failed to query", "FutureWarning", "Token authentication"):
        assert noise not in out, out
