"""Every stage on a Llama-3.2-1B-shaped policy, bounded, on a small slice of MovieLens.

    python bench/llama_scale.py --size 1b [--out runs/llama_scale] [--users 64] [--ppo-steps 4]
    python bench/llama_scale.py --size tiny          # the same path in about a minute
    python bench/llama_scale.py --size tiny --gpu    # bf16 on CUDA (bench/gpu_check.sh)

The policy is pagellm/models/llama.py's random-init checkpoint (the published
configuration, `--size tiny` shrinks it), read through `model.name` as a download would be,
with configs/llama-3.2-1b-lora.yaml's LoRA. Stages: data (MovieLens latest-small, the first
`--users` users) → SFT (one epoch, LoRA, new token rows trainable) → reward model (one
epoch) → PPO (`--ppo-steps` steps, merged SFT base + fresh adapter, adapter-only weights to
the rollout actors) → eval → serving (the replica's engine in this process, K = 10).

Per stage it reports the peak RSS of every process that holds a model (this driver, each
Ray actor and Ray Train worker of the Ray it starts; the kernel's high-water mark VmHWM,
read from /proc every 0.2 s while the process lives, so growth in its last 0.2 s can be
missed), with `--gpu` each process's peak GPU memory (nvidia-smi, sampled), the stage's
step time and tokens/s, and serving p50/p99. Step time is the stage's wall time over its
steps, start-up included: at these step counts it is an upper bound. Prints one Markdown
table and writes <out>/results.json.

Rollout actors: 2, except `--size 1b` on CPU, which runs 1: in fp32 a copy is ~5 GB, and a
24 GiB box holds the learner, the reward actor's reward model, Ray and this driver next to
one rollout actor, not two (docs/ARCHITECTURE.md §6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.common import ray_session  # noqa: E402
from pagellm.config import load_config, save_config  # noqa: E402
from pagellm.models.llama import TINY, llama_config, n_parameters, write_llama_checkpoint  # noqa: E402

SIZES = {"tiny": TINY, "1b": {}}
# Next to the checkout (../shared/data, as configs/movielens-loo.yaml reads it) or inside it.
MOVIELENS = next((d for d in (ROOT.parent / "shared" / "data" / "movielens_latest_small",
                              ROOT / "shared" / "data" / "movielens_latest_small") if d.is_dir()),
                 ROOT.parent / "shared" / "data" / "movielens_latest_small")
K = 10
# The processes that hold a model; Ray's own (controllers, agents, the weights broker)
# stay near 200 MiB whatever the model and are left out of the table.
MODEL_PROCESSES = {"RayTrainWorker", "LearnerActor", "RolloutActor", "RewardActor"}


def settings(model_dir: Path, args) -> list[str]:
    """configs/llama-3.2-1b-lora.yaml with the data, step counts and hardware bounded."""
    gpu = "true" if args.gpu else "false"
    batch = args.batch_size
    return [
        f"model.name={model_dir}", f"model.dtype={'bfloat16' if args.gpu else 'float32'}",
        "data.source=movielens", f"data.path={args.data}", "data.split=leave_one_out", "data.kcore=5",
        f"data.max_users={args.users}", "data.history_len=20", "data.sft_windows=1",
        "sft.meta_epochs=0", "sft.epochs=1", f"sft.batch_size={batch}", "sft.workers=1", f"sft.use_gpu={gpu}",
        f"sft.val_users={args.val_users}",
        "reward.epochs=1", f"reward.batch_size={batch}", "reward.workers=1", f"reward.use_gpu={gpu}",
        # publish=last: the published policy is PPO's own (merged), which eval and serve then load.
        "stage3.algorithm=ppo", "stage3.publish=last", f"ppo.steps={args.ppo_steps}", f"ppo.batch_size={batch}",
        f"ppo.mini_batch_size={max(1, batch // 2)}", "ppo.epochs=1", f"ppo.rollout_actors={args.rollout_actors}",
        "ppo.reward_actors=1",
        f"ppo.checkpoint_every={args.ppo_steps}", f"ppo.use_gpu={gpu}",
        # One GPU holds the learner and every rollout and reward actor (a bf16 base is 2.5 GB).
        "ppo.learner_gpus=0.25", "ppo.actor_gpus=0.25",
        f"eval.max_users={args.eval_users}", "eval.list_len=20", "eval.batch_size=8", "eval.baselines=[popularity]",
        *args.overrides,
    ]


class PeakMemory:
    """Peak RSS (VmHWM) of this process and of every live Ray worker, and with `gpu` each
    process's GPU memory, sampled on a thread; `stage()` starts a fresh window."""

    def __init__(self, gpu: bool, every_s: float = 0.2):
        self.gpu, self.every_s = gpu, every_s
        self.peaks: dict[int, dict] = {}
        self.previous: set[int] = set()
        self.device_mib = 0.0  # the whole GPU's memory in use: seen even where nvidia-smi lists no pids
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stage(self, wait_s: float = 120.0) -> None:
        # A killed actor's process can take a while to exit; at 1B each holds ~5 GB, so let
        # them go before the next stage loads its own models.
        procs = []
        for pid in self.peaks:
            if pid != os.getpid():
                try:
                    procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs(procs, timeout=wait_s)
        with self.lock:
            # Earlier stages' actors may still be exiting: they are not this stage's.
            self.previous |= {pid for pid in self.peaks if pid != os.getpid()}
            self.peaks = {}
            self.device_mib = 0.0
        # Reset this process's own high-water mark (Linux 4.0+), so a stage's peak is its own.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def read(self) -> list[dict]:
        """This window's processes, the driver first, each {process, pid, rss_mib[, gpu_mib]}."""
        self._sample()
        with self.lock:
            rows = list(self.peaks.values())
        return sorted(rows, key=lambda r: (r["pid"] != os.getpid(), r["process"], r["pid"]))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        gpu = self._gpu_mib() if self.gpu else {}
        if self.gpu:
            with self.lock:
                self.device_mib = max(self.device_mib, self._device_mib())
        seen = {os.getpid(): "driver"}
        # The local Ray this process started is its descendant: another job's Ray on the
        # same box is not counted.
        for proc in psutil.Process().children(recursive=True):
            try:
                title = (proc.cmdline() or [""])[0]
            except psutil.Error:
                continue  # it ended while being listed
            # Ray names a worker process after its actor ("ray::RolloutActor.generate" while
            # in a call).
            name = title[len("ray::"):].split(".")[0].split(" ")[0] if title.startswith("ray::") else ""
            if name in MODEL_PROCESSES and proc.pid not in self.previous:
                seen[proc.pid] = name
        for pid, name in seen.items():
            hwm = _vm_hwm_mib(pid)
            if hwm is None:
                continue
            with self.lock:
                row = self.peaks.setdefault(pid, {"process": name, "pid": pid, "rss_mib": 0.0})
                row["rss_mib"] = max(row["rss_mib"], hwm)
                if self.gpu:
                    row["gpu_mib"] = max(row.get("gpu_mib", 0.0), gpu.get(pid, 0.0))

    @staticmethod
    def _gpu_mib() -> dict[int, float]:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
        rows = [line.split(",") for line in out.splitlines() if line.strip()]
        return {int(pid): float(mib) for pid, mib in rows}

    @staticmethod
    def _device_mib() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
        return sum(float(line) for line in out.splitlines() if line.strip())


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None  # the process ended between listing and reading
    return None


def prompt_tokens(encoder, users, prompts) -> np.ndarray:
    return np.array([len(encoder.encode_prompt(int(u), list(p))) for u, p in zip(users, prompts)])


def sft_tokens(run_dir: Path, encoder) -> int:
    """Tokens one SFT epoch reads: each row's prompt and golden page (+ eos)."""
    import pandas as pd

    rows = pd.read_parquet(run_dir / "data" / "sft.parquet")
    pages = rows["target"].map(len).to_numpy() + 1
    return int(prompt_tokens(encoder, rows["user_index"], rows["prompt"]).sum() + pages.sum())


def reward_tokens(run_dir: Path, encoder) -> int:
    """Tokens one reward epoch reads: the prompt with the chosen and with the rejected page."""
    import pandas as pd

    pairs = pd.read_parquet(run_dir / "data" / "pairs.parquet")
    prompt = prompt_tokens(encoder, pairs["user_index"], pairs["prompt"])
    pages = pairs["chosen"].map(len).to_numpy() + pairs["rejected"].map(len).to_numpy() + 2
    return int(2 * prompt.sum() + pages.sum())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_stages(cfg, run_dir: Path, memory: PeakMemory, requests: int) -> list[dict]:
    from actors.orchestrator import run_ppo_stage
    from pagellm.data.pipeline import run_data_stage
    from pagellm.eval.runner import run_eval_stage
    from pagellm.train.reward import run_reward_stage
    from pagellm.train.sft import run_sft_stage
    from pagellm.vocab import PromptEncoder, load_tokenizer

    log = lambda line: print("   ", line, flush=True)  # noqa: E731
    results = []

    def stage(name: str, fn, steps_tokens) -> None:
        print(f"[llama_scale] {name}", flush=True)
        memory.stage()
        out, seconds = timed(fn)
        steps, tokens, extra = steps_tokens(out)
        results.append({"stage": name, "seconds": round(seconds, 1), "steps": steps,
                        "step_s": round(seconds / steps, 3) if steps else None,
                        "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
                        "processes": memory.read(), "gpu_device_mib": memory.device_mib, **extra})

    stage("data", lambda: run_data_stage(cfg, run_dir / "data", log=log), lambda _: (0, 0, {}))
    encoder = None

    def after_sft(metrics):
        nonlocal encoder
        encoder = PromptEncoder(*load_tokenizer(run_dir / "sft"))
        steps = metrics["final"]["step"]
        return steps, sft_tokens(run_dir, encoder) * metrics["final"]["epoch"], {}

    stage("sft", lambda: run_sft_stage(cfg, run_dir, log=log), after_sft)

    def after_reward(metrics):
        epochs = max((h.get("epoch", 0) for h in metrics.get("history", [])), default=1)
        steps = max((h.get("step", 0) for h in metrics.get("history", [])), default=0)
        return steps, reward_tokens(run_dir, encoder) * epochs, {}

    stage("reward", lambda: run_reward_stage(cfg, run_dir, log=log), after_reward)

    def after_ppo(summary):
        rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
        mean = lambda key: round(float(np.mean([r.get(key, 0.0) for r in rows])), 3)  # noqa: E731
        # Each page: prompt + K items + eos, sampled once, reference-scored once, trained `epochs` times.
        page_tokens = len(encoder.encode_prompt(0, [0] * cfg.data.history_len)) + cfg.data.page_len + 1
        tokens = summary["pages_generated"] * page_tokens
        return summary["step"], tokens, {"per_step_s": {k: mean(k) for k in
                                                        ("generate_s", "reference_s", "score_s", "learner_seconds")}}

    stage("ppo", lambda: run_ppo_stage(cfg, run_dir, log=log), after_ppo)

    def after_eval(metrics):
        users = metrics["models"]["sft"]["users"]
        page_tokens = len(encoder.encode_prompt(0, [0] * cfg.data.history_len)) + cfg.eval.list_len
        # Every policy in the run (sft, ppo) writes one list per user.
        n_policies = sum(1 for m in metrics["models"] if m in ("sft", "ppo"))
        return users * n_policies, users * n_policies * page_tokens, {}

    stage("eval", lambda: run_eval_stage(cfg, run_dir, log=log), after_eval)
    stage("serve", lambda: serve_latency(cfg, run_dir, requests), lambda out: (out["requests"], out["tokens"], out))
    return results


def serve_latency(cfg, run_dir: Path, requests: int) -> dict:
    """Sequential /v1/page requests, K = 10, straight into the replica's engine (no HTTP):
    the model's share of a request's latency."""
    import pandas as pd

    from pagellm.serve.engine import PageEngine
    from pagellm.serve.schemas import PageRequest

    engine = PageEngine.load(run_dir, cfg)
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    vocab = engine.vocab
    latencies, tokens = [], 0
    for n in range(requests):
        row = evals.iloc[n % len(evals)]
        history = [vocab.item_ids[i] for i in list(row["prompt_test"])[-cfg.data.history_len:]]
        req = PageRequest(user_id=vocab.user_ids[int(row["user_index"])], history=history, k=K)
        t0 = time.perf_counter()
        page = engine.page(req)
        latencies.append(time.perf_counter() - t0)
        tokens += len(history) + len(page.item_ids)
    lat_ms = np.array(latencies) * 1000
    return {"requests": requests, "tokens": tokens, "serve_p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
            "serve_p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "served_by": engine.version}


def table(results: list[dict], gpu: bool) -> str:
    head = "| stage | process | peak RSS MiB |" + (" peak GPU MiB |" if gpu else "") + " steps | s/step | tokens/s |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for n, p in enumerate(r["processes"]):
            first = n == 0
            cells = [r["stage"] if first else "", f"{p['process']} ({p['pid']})", f"{p['rss_mib']:.0f}"]
            if gpu:
                cells.append(f"{p.get('gpu_mib', 0.0):.0f}")
            cells += [str(r["steps"]) if first else "", str(r["step_s"]) if first else "",
                      str(r["tokens_per_s"]) if first else ""]
            rows.append("| " + " | ".join(cells) + " |")
    serve = next(r for r in results if r["stage"] == "serve")
    rows.append("")
    rows.append(f"serving, K = {K}, {serve['requests']} sequential requests: p50 {serve['serve_p50_ms']} ms, "
                f"p99 {serve['serve_p99_ms']} ms")
    ppo = next(r for r in results if r["stage"] == "ppo")
    rows.append(f"PPO per step (s, means): {ppo['per_step_s']}")
    if gpu:
        rows.append("peak GPU memory in use on the device, per stage (MiB): "
                    + ", ".join(f"{r['stage']} {r['gpu_device_mib']:.0f}" for r in results))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", default="runs/llama_scale")
    ap.add_argument("--data", default=str(MOVIELENS))
    ap.add_argument("--users", type=int, default=64, help="data.max_users")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppo-steps", type=int, default=4)
    ap.add_argument("--val-users", type=int, default=16)
    ap.add_argument("--eval-users", type=int, default=32)
    ap.add_argument("--requests", type=int, default=100, help="serving requests")
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA for every stage")
    ap.add_argument("--rollout-actors", type=int, default=None, help="default: 1 for --size 1b on CPU, else 2")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if args.rollout_actors is None:
        args.rollout_actors = 1 if args.size == "1b" and not args.gpu else 2

    out = Path(args.out) / args.size
    model_dir = out / "llama"
    if not (model_dir / "config.json").exists():
        print(f"[llama_scale] writing a random-init Llama-3.2-1B ({args.size}) to {model_dir}", flush=True)
        write_llama_checkpoint(model_dir, seed=0, **SIZES[args.size])
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # every measurement starts from nothing
    cfg = load_config(ROOT / "configs" / "llama-3.2-1b-lora.yaml", settings(model_dir.resolve(), args))
    save_config(cfg, run_dir / "config.yaml")

    memory = PeakMemory(gpu=args.gpu)
    try:
        with ray_session():
            results = run_stages(cfg, run_dir, memory, args.requests)
    finally:
        memory.stop()
    params = n_parameters(llama_config(**SIZES[args.size]))
    header = (f"Llama-3.2-1B ({args.size}, {params:,} parameters before the new tokens), "
              f"{'bf16 CUDA' if args.gpu else 'fp32 CPU'}, {platform.machine()} cpus={os.cpu_count()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}, data.max_users={args.users}, batch {args.batch_size}, "
              f"ppo.steps={args.ppo_steps}, {args.rollout_actors} rollout actor(s)")
    print("\n" + header + "\n\n" + table(results, args.gpu))
    (out / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
