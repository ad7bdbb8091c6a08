"""PPO pages/s: asynchronous (max_staleness 1) vs synchronous (max_staleness 0), same config.

    python bench/ppo_throughput.py --run runs/demo [--steps 12] [--set ppo.batch_size=64 ...]

Needs a run folder with sft/ and reward/ (e.g. after `pagellm run` or `pagellm reward`).
Each mode runs in a fresh copy of the run's ppo/ state, so both start from the same SFT
policy. pages/s = pages trained / wall time from the first to the last trained step
(actor start-up, a fixed cost, is excluded and reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import ray_session  # noqa: E402
from pagellm.runfolder import resolve_run  # noqa: E402


def measure(run_dir: Path, overrides: list[str], staleness: int, steps: int) -> dict:
    from actors.orchestrator import run_ppo_stage

    work = run_dir.parent / f"{run_dir.name}_ppo_bench_s{staleness}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("data", "sft", "reward", "config.yaml"):
        src = run_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    _, cfg = resolve_run(work, None, overrides + [f"ppo.max_staleness={staleness}", f"ppo.steps={steps}",
                                                  f"ppo.checkpoint_every={steps}"])
    t0 = time.perf_counter()
    run_ppo_stage(cfg, work, log=lambda line: print("   ", line, flush=True))
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # Steady state: from the end of step 1 to the end of the last step.
    pages = sum(cfg.ppo.batch_size for _ in rows[1:])
    span = sum(1.0 / r["pages_per_s"] * cfg.ppo.batch_size for r in rows[1:])
    # Where a step's time goes: the learner's update, and how long it sat waiting for a batch.
    parts = {f"{k}_mean": round(sum(r[k] for r in rows[1:]) / len(rows[1:]), 4)
             for k in ("learner_seconds", "learner_idle_s", "generate_s", "score_s")}
    return {"max_staleness": staleness, "steps": len(rows), "pages_per_s": pages / span, **parts,
            "stage_wall_s": total, "stale_dropped": rows[-1]["stale_dropped"],
            "final_reward_mean": rows[-1]["reward_mean"], "final_kl": rows[-1]["kl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    run_dir = Path(args.run)
    results = {}
    with ray_session():
        for staleness in (0, 1):
            r = measure(run_dir, args.overrides, staleness, args.steps)
            results[f"max_staleness_{staleness}"] = r
            print(f"max_staleness={staleness}: {r['pages_per_s']:.1f} pages/s "
                  f"(stage wall {r['stage_wall_s']:.0f}s incl. actor start-up; per step: learner "
                  f"{r['learner_seconds_mean']:.3f}s, learner idle {r['learner_idle_s_mean']:.3f}s, "
                  f"generate {r['generate_s_mean']:.3f}s, score {r['score_s_mean']:.3f}s)", flush=True)
    speedup = results["max_staleness_1"]["pages_per_s"] / results["max_staleness_0"]["pages_per_s"]
    print(f"async / sync: {speedup:.2f}x (target >= 1.5x)")
    print(json.dumps({"machine": f"{platform.machine()} cpus={os.cpu_count()}", "date": time.strftime("%Y-%m-%d %H:%M"),
                      "speedup": speedup,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
