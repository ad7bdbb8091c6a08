"""Data-stage throughput at 10^4, 10^5 and 10^6 simulator interactions.

    python bench/data_scale.py [--sizes 1e4 1e5 1e6] [--out runs/bench_data]

Each size runs the whole stage (simulate → validate → split → vocab → golden pages and
pairs on Ray Data → parquet) in one Ray session and prints interactions/s. Target on a
2-core machine: 10^6 in under 90 s, and 10^6 taking at most 12x the time of 10^5.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import ray_session  # noqa: E402
from pagellm.config import load_config  # noqa: E402
from pagellm.data.pipeline import run_data_stage  # noqa: E402

PER_USER = 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    ap.add_argument("--out", default="runs/bench_data")
    args = ap.parse_args()
    results = []
    with ray_session():
        for size in args.sizes:
            users = max(10, int(size) // PER_USER)
            items = max(200, min(20_000, users // 2))
            cfg = load_config(None, [f"data.simulator.users={users}", f"data.simulator.items={items}",
                                     "data.simulator.categories=30",
                                     f"data.simulator.interactions_per_user={PER_USER}", "data.sft_windows=1"])
            t0 = time.perf_counter()
            stats = run_data_stage(cfg, Path(args.out) / f"n{int(size)}", log=lambda *_: None)
            secs = time.perf_counter() - t0
            n = stats["interactions"]
            results.append({"target": int(size), "interactions": n, "users": stats["users"], "items": stats["items"],
                            "seconds": round(secs, 2), "interactions_per_s": round(n / secs),
                            "stage_seconds": stats["seconds"]})
            print(f"{n:>10,} interactions  {stats['users']:>7,} users  {secs:7.1f} s  {n / secs:>10,.0f} interactions/s",
                  flush=True)
    if len(results) >= 2:
        a, b = results[-2], results[-1]
        print(f"scaling: {b['interactions'] / a['interactions']:.1f}x data took {b['seconds'] / a['seconds']:.1f}x time")
    print(json.dumps({"machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}",
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
