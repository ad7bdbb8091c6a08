"""Quality of every model of a config over N seeds: one command, one table.

    python bench/quality.py --config configs/tiny.yaml --seeds 0 1 2 --out runs/quality/tiny
    python bench/quality.py --config configs/movielens-loo.yaml --seeds 0 1 2 --out runs/quality/ml \\
        --set ppo.enabled=true

Each seed is one `pagellm run --config C --out OUT/seed<s> --set seed=<s>` in its own
process (its own Ray), so every model of that seed — the baselines the config's
`eval.baselines` names (popularity, SASRec), the SFT policy and the stage-3 policy when
the config trains one — is scored by the same evaluation on the same split. The seed moves
every random choice of the run: the simulator's world, model init, data order and
SASRec's own init. A seed whose evaluation exists is read, not rerun, so an interrupted
sweep continues where it stopped (pass --fresh to redo).

Writes OUT/quality.md (mean ± sample std per model and metric, n seeds) and
OUT/quality.json (every seed's numbers and the aggregate).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_METRICS = ["hr@10", "ndcg@10", "ndcg@100", "full/hr@10", "full/ndcg@100", "coverage@10", "sim_utility"]


def run_seed(config: str, out: Path, seed: int, overrides: list[str], fresh: bool) -> dict:
    """The seed's eval/metrics.json, running the pipeline first when it is missing."""
    run_dir = out / f"seed{seed}"
    metrics_file = run_dir / "eval" / "metrics.json"
    timing_file = run_dir / "quality_wall_s.json"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if not metrics_file.exists():
        cmd = [sys.executable, "-m", "jobs.pipeline", "--config", config, "--out", str(run_dir),
               "--set", f"seed={seed}"]
        for item in overrides:
            cmd += ["--set", item]
        print(f"[quality] seed {seed}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        timing_file.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    else:
        print(f"[quality] seed {seed}: {metrics_file} exists, reading it", flush=True)
    result = json.loads(metrics_file.read_text())
    if timing_file.exists():
        result["wall_s"] = json.loads(timing_file.read_text())["wall_s"]
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(per_seed: dict[int, dict], metrics: list[str]) -> dict[str, dict[str, dict]]:
    """model -> metric -> {mean, std, n, values}; a metric a model lacks is left out."""
    models: list[str] = []
    for result in per_seed.values():
        models += [m for m in result["models"] if m not in models]
    table: dict[str, dict[str, dict]] = {}
    for model in models:
        row = {}
        for metric in metrics:
            values = [r["models"][model][metric] for r in per_seed.values()
                      if model in r["models"] and r["models"][model].get(metric) is not None]
            if values:
                mean, std = mean_std(values)
                row[metric] = {"mean": mean, "std": std, "n": len(values), "values": values}
        table[model] = row
    return table


def markdown(table: dict, metrics: list[str], title: str, seeds: list[int]) -> str:
    shown = [m for m in metrics if any(m in row for row in table.values())]
    lines = [f"### {title}", "", f"mean ± sample std over seeds {seeds}; best mean per column in bold.", "",
             "| model | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    best = {m: max((row[m]["mean"] for row in table.values() if m in row), default=None) for m in shown}
    for model, row in table.items():
        cells = []
        for m in shown:
            if m not in row:
                cells.append("–")
                continue
            text = f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}"
            cells.append(f"**{text}**" if row[m]["mean"] == best[m] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every seed (repeatable)")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--title", default=None)
    parser.add_argument("--fresh", action="store_true", help="rerun seeds that already have results")
    args = parser.parse_args(argv)

    from pagellm.config import load_config

    load_config(args.config, args.overrides)  # a config mistake fails here, before any seed runs
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed = {seed: run_seed(args.config, args.out, seed, args.overrides, args.fresh) for seed in args.seeds}
    table = aggregate(per_seed, args.metrics)
    first = next(iter(per_seed.values()))
    title = args.title or f"{args.config} ({first['dataset']}, {first['split_method']} split, {first['users']:,} test users)"
    text = markdown(table, args.metrics, title, args.seeds)
    walls = [r["wall_s"] for r in per_seed.values() if "wall_s" in r]
    if walls:
        text += f"\nwall time per seed (whole pipeline): {', '.join(f'{w:.0f} s' for w in walls)}\n"
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "aggregate": table,
         "per_seed": {str(s): r for s, r in per_seed.items()}}, indent=1))
    print(text, flush=True)
    print(f"[quality] wrote {args.out / 'quality.md'} and quality.json", flush=True)


if __name__ == "__main__":
    main()
