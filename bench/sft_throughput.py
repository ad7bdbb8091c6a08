"""SFT tokens/s: our stage (Ray Train + DeepSpeed) vs a plain single-process PyTorch loop.

    python bench/sft_throughput.py [--run runs/bench_sft] [--steps 60] [--model tiny|gpt2-small]

Same model, same rows, same batch size, same optimizer settings. Steady state only: the
first `--warmup` steps (engine build, first allocations) are not timed, and neither is
Ray/worker start-up (a fixed cost per stage, reported separately). Target: our overhead
at 1 worker <= 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from jobs.common import ray_session  # noqa: E402
from pagellm.config import Config, load_config  # noqa: E402
from pagellm.data.pipeline import run_data_stage  # noqa: E402

MODELS = {
    "tiny": ["model.init.n_layer=2", "model.init.n_embd=64", "model.init.n_head=2"],
    "gpt2-small": ["model.init.n_layer=12", "model.init.n_embd=768", "model.init.n_head=12"],
}


def make_rows(cfg: Config, data_dir: Path):
    import pandas as pd

    from pagellm.models.policy import build_policy
    from pagellm.train.sft_rows import page_rows
    from pagellm.vocab import PromptEncoder, Vocab

    vocab = Vocab.from_parquet(data_dir / "vocab.parquet")
    model, tok, layout = build_policy(cfg.model, vocab, seed=cfg.seed)
    sft = pd.read_parquet(data_dir / "sft.parquet")
    rows = page_rows(PromptEncoder(tok, layout), sft["user_index"], sft["prompt"], sft["target"], 0.0, cfg.seed)
    return model, layout, rows


def timed_steps(step, batches, warmup: int) -> tuple[float, int]:
    """Seconds and tokens of the steps after `warmup`."""
    tokens, t0 = 0, None
    for n, batch in enumerate(batches):
        if n == warmup:
            t0 = time.perf_counter()
        step(batch)
        if n >= warmup:
            tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - t0, tokens


def batches_for(rows, batch_size: int, steps: int, pad_id: int, rank: int = 0, world: int = 1):
    from pagellm.train.sft_rows import collate

    out = []
    for n in range(steps):
        start = (n * batch_size * world + rank * batch_size) % max(1, len(rows) - batch_size)
        out.append(collate(rows[start : start + batch_size], pad_id))
    return out


def plain_pytorch(cfg: Config, data_dir: Path, steps: int, warmup: int) -> dict:
    torch.manual_seed(cfg.seed)
    model, layout, rows = make_rows(cfg, data_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr, betas=(0.9, cfg.sft.adam_beta2))

    def step(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.grad_clip)
        opt.step()

    secs, tokens = timed_steps(step, batches_for(rows, cfg.sft.batch_size, steps + warmup, layout.pad_id), warmup)
    return {"tokens_per_s": tokens / secs, "seconds": secs, "tokens": tokens}


def _ours_loop(config: dict) -> None:
    import torch.distributed as dist

    from pagellm.train.engine import build_engine, micro_batch_size, setup_distributed_for_deepspeed
    from pagellm.train.sft import make_loss

    cfg = Config.model_validate(config["cfg"])
    setup_distributed_for_deepspeed()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed)
    model, layout, rows = make_rows(cfg, Path(config["data_dir"]))
    world, rank = dist.get_world_size(), dist.get_rank()
    mbs = micro_batch_size(cfg.sft.batch_size, world)
    steps, warmup = config["steps"], config["warmup"]
    engine = build_engine(model, None, cfg.sft, steps + warmup, cfg.sft.use_gpu)
    loss_fn = make_loss(cfg.sft, layout)

    def step(batch):
        loss = loss_fn(engine, {k: v.to(engine.device) for k, v in batch.items()})
        engine.backward(loss)
        engine.step()

    secs, tokens = timed_steps(step, batches_for(rows, mbs, steps + warmup, layout.pad_id, rank, world), warmup)
    totals = torch.tensor([tokens, secs], dtype=torch.float64)
    dist.all_reduce(totals)  # tokens summed over ranks; seconds summed, averaged below
    if rank == 0:  # Ray Train V2 keeps reported metrics only with a checkpoint: use a file
        Path(config["out_file"]).write_text(json.dumps(
            {"tokens_per_s": float(totals[0] / (totals[1] / world)), "seconds": float(totals[1] / world)}))


def ours(cfg: Config, data_dir: Path, run_dir: Path, workers: int, steps: int, warmup: int, threads: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_file = (run_dir / f"ours_w{workers}.json").resolve()
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _ours_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
                           "steps": steps, "warmup": warmup, "threads": threads, "out_file": str(out_file)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench_w{workers}_{time.time_ns()}", storage_path=str((run_dir / "ray_train").resolve()),
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}),
    )
    trainer.fit()
    return {**json.loads(out_file.read_text()), "wall_incl_startup_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/bench_sft")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = ap.parse_args()
    run_dir = Path(args.run)
    cfg = load_config(None, MODELS[args.model] + [f"sft.batch_size={args.batch_size}"])
    threads = max(1, (os.cpu_count() or 2) // 2)  # one core per worker, matched in the plain loop
    torch.set_num_threads(threads)
    results = {}
    with ray_session():
        if not (run_dir / "data" / "sft.parquet").exists():
            run_data_stage(cfg, run_dir / "data", log=lambda *_: None)
        results["plain_pytorch_1proc"] = plain_pytorch(cfg, run_dir / "data", args.steps, args.warmup)
        print(f"plain PyTorch, 1 process : {results['plain_pytorch_1proc']['tokens_per_s']:10,.0f} tokens/s", flush=True)
        for workers in (1, 2):
            r = ours(cfg, run_dir / "data", run_dir, workers, args.steps, args.warmup, threads)
            results[f"pagellm_{workers}_worker"] = r
            print(f"PageLLM SFT, {workers} worker(s): {r['tokens_per_s']:10,.0f} tokens/s "
                  f"(stage wall incl. Ray start-up {r['wall_incl_startup_s']:.0f}s)", flush=True)
    overhead = 1 - results["pagellm_1_worker"]["tokens_per_s"] / results["plain_pytorch_1proc"]["tokens_per_s"]
    print(f"overhead at 1 worker: {overhead * 100:+.1f}% (target <= 15%)")
    print(json.dumps({"machine": f"{platform.machine()} cpus={os.cpu_count()}", "model": args.model,
                      "batch_size": args.batch_size, "steps": args.steps, "threads_per_proc": threads,
                      "overhead_1_worker": overhead, "results": results}, indent=2, default=float))


if __name__ == "__main__":
    main()
