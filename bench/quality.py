"""Quality of every model of a config over N seeds: one command, one table.

    python bench/quality.py --config configs/tiny.yaml --seeds 0 1 2 --out runs/quality/tiny
    python bench/quality.py --config configs/movielens-loo.yaml --seeds 0 1 2 --out runs/quality/ml \\
        --set stage3.algorithm=ppo

Each seed is one `pagellm run --config C --out OUT/seed<s> --set seed=<s>` in its own
process (its own Ray), so every model of that seed — the baselines the config's
`eval.baselines` names (popularity, SASRec), the SFT policy and the stage-3 policy when
the config trains one — is scored by the same evaluation on the same split. The seed moves
every random choice of the run: the simulator's world, model init, data order and
SASRec's own init. A seed whose evaluation exists is read, not rerun, so an interrupted
sweep continues where it stopped (pass --fresh to redo).

Stage-3 variants compare on the same seeds from the same SFT policy:

    python bench/quality.py --config configs/tiny.yaml --out runs/quality/tiny \
        --variant "grpo=ppo.advantage=grpo ppo.samples_per_prompt=8" --variant "coarse=ppo.reward=coarse"

A variant copies each finished seed's data and SFT policy (and its reward model, unless the
variant sets `reward.*` or the seed trained none: then the variant's run trains its own when
its algorithm needs one) into OUT/seed<s>/variants/<name> and reruns
the later stages there with its overrides; its stage-3 policy is the row `<name>`. Stage-3
rows also report the mean KL per page over the last five PPO steps and the published step
(0 = the SFT policy, when no stage-3 checkpoint beat it on validation). Simulator runs add a
reward-fidelity table (pagellm/eval/fidelity.py) per run.

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

from pagellm.eval.output_cache import CACHE_DIR
from pagellm.names import STAGE3_ALGORITHMS

DEFAULT_METRICS = ["hr@10", "ndcg@10", "ndcg@100", "full/hr@10", "full/ndcg@100", "coverage@10", "sim_utility",
                   "hr@1%", "hr@10%", "kl", "published_step"]
FIDELITY = ["spearman/R", "spearman/R_c", "spearman/R_f", "oracle_above_greedy/R", "best_of_S/R",
            "spearman/prior", "oracle_above_greedy/prior", "best_of_S/prior", "best_of_S/truth", "greedy_utility"]
GAIN_METRICS = ["sim_utility", "ndcg@100", "ndcg@10", "hr@10"]
# Facts, not scores: no "best" is bolded (bench/stage3_compare.py adds the stage's cost).
NOT_RANKED = {"kl", "kl_to_sft", "published_step", "stage_seconds", "pages_generated", "pages_per_s"}
STAGE3_SECTIONS = ("stage3.", "ppo.", "dpo.", "degre.", "guided.", "reward.", "eval.")  # what a variant may change
KL_STEPS = 5  # the stage-3 KL reported: mean over the last this-many PPO steps


def stage3_name(models: dict) -> str | None:
    """The stage-3 row of a run's evaluation: named by its algorithm (its folder)."""
    return next((name for name in STAGE3_ALGORITHMS if name in models), None)


def stage3_facts(run_dir: Path, algorithm: str) -> dict:
    """KL per page at the end of the RL loop and the published step (or epoch), when the
    run trained a stage 3."""
    facts: dict = {}
    metrics = run_dir / algorithm / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            facts["kl"] = sum(r["kl"] for r in rows[-KL_STEPS:]) / len(rows[-KL_STEPS:])
    selection = run_dir / algorithm / "selection.json"
    if selection.exists():
        facts["published_step"] = json.loads(selection.read_text())["published_step"]
    return facts


def run_variant(seed_dir: Path, name: str, overrides: list[str], fresh: bool) -> dict:
    """A stage-3 variant of a finished seed: same data and SFT policy, later stages redone."""
    run_dir = seed_dir / "variants" / name
    metrics_file = run_dir / "eval" / "metrics.json"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    keys = [o.split("=", 1)[0] for o in overrides]
    if any(not k.startswith(STAGE3_SECTIONS) for k in keys):
        raise SystemExit(f"variant {name}: only {', '.join(s + '*' for s in STAGE3_SECTIONS)} may change "
                         "(same data and SFT policy)")
    # A seed without a finished reward model (stage3.algorithm=none trains none) gives the
    # variant none to copy: it starts from the reward stage, which trains one when its
    # algorithm reads it (jobs/pipeline.py `wanted`) and is skipped otherwise.
    has_reward = (seed_dir / "reward" / "metrics.json").exists()
    start = "reward" if any(k.startswith("reward.") for k in keys) or not has_reward else "stage3"
    if not metrics_file.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copy2(seed_dir / "config.yaml", run_dir / "config.yaml")
        for part in ["data", "sft"] + (["reward"] if start == "stage3" else []):
            shutil.copytree(seed_dir / part, run_dir / part)
        # The seed's fitted SASRec and SFT lists: the variant's eval reuses them where its
        # inputs are the same (pagellm/eval/output_cache.py), instead of recomputing them.
        if (seed_dir / CACHE_DIR).is_dir():
            shutil.copytree(seed_dir / CACHE_DIR, run_dir / CACHE_DIR)
        cmd = [sys.executable, "-m", "jobs.pipeline", "--run", str(run_dir), "--from", start]
        for item in overrides:
            cmd += ["--set", item]
        print(f"[quality] {seed_dir.name} variant {name}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True)
    result = json.loads(metrics_file.read_text())
    algorithm = stage3_name(result["models"])
    return {"stage3": result["models"][algorithm] | stage3_facts(run_dir, algorithm) if algorithm else {},
            "fidelity": result.get("reward_fidelity")}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or "=" not in rest:
        raise SystemExit(f"--variant expects NAME=KEY=VALUE [KEY=VALUE ...], got {text!r}")
    return name.strip(), rest.split()


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
    algorithm = stage3_name(result["models"])
    if algorithm:
        result["models"][algorithm].update(stage3_facts(run_dir, algorithm))
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


def paired_gains(per_seed: dict[int, dict], base: str = "sft") -> dict[int, dict]:
    """Per seed, each stage-3 model's relative change over `base` on GAIN_METRICS: the
    seeds' worlds differ far more than two models on one world do, so a stage-3 gain is
    judged on these paired differences (their mean and std over seeds)."""
    out: dict[int, dict] = {}
    for seed, result in per_seed.items():
        models = result["models"]
        if base not in models:
            continue
        rows = {}
        for name, m in models.items():
            if name in (base, "popularity", "sasrec") or not m:
                continue
            rows[name] = {k: (m[k] - models[base][k]) / abs(models[base][k])
                          for k in GAIN_METRICS if m.get(k) is not None and models[base].get(k)}
        out[seed] = {"models": rows}
    return out


def markdown(table: dict, metrics: list[str], title: str, seeds: list[int]) -> str:
    shown = [m for m in metrics if any(m in row for row in table.values())]
    lines = [f"### {title}", "", f"mean ± sample std over seeds {seeds}; best mean per column in bold"
             f"{' (kl: nats per page, last 5 PPO steps; published_step 0 = the SFT policy)' if 'kl' in shown else ''}.", "",
             "| model | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    best = {m: max((row[m]["mean"] for row in table.values() if m in row), default=None) for m in shown
            if m not in NOT_RANKED}
    for model, row in table.items():
        cells = []
        for m in shown:
            if m not in row:
                cells.append("–")
                continue
            text = f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}"
            cells.append(f"**{text}**" if m in best and row[m]["mean"] == best[m] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every seed (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE ...",
                        help="a stage-3 variant from each seed's SFT policy (repeatable)")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--title", default=None)
    parser.add_argument("--fresh", action="store_true", help="rerun seeds that already have results")
    args = parser.parse_args(argv)

    from pagellm.config import load_config

    variants = [parse_variant(v) for v in args.variant]
    load_config(args.config, args.overrides)  # a config mistake fails here, before any seed runs
    for name, overrides in variants:
        load_config(args.config, args.overrides + overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed = {seed: run_seed(args.config, args.out, seed, args.overrides, args.fresh) for seed in args.seeds}
    fidelity: dict[int, dict] = {}
    for seed, result in per_seed.items():
        fidelity[seed] = {"models": {}}
        if result.get("reward_fidelity"):
            fidelity[seed]["models"]["base"] = result["reward_fidelity"]
        for name, overrides in variants:
            out = run_variant(args.out / f"seed{seed}", name, args.overrides + overrides, args.fresh)
            result["models"][name] = out["stage3"]
            if out["fidelity"]:
                fidelity[seed]["models"][name] = out["fidelity"]
    table = aggregate(per_seed, args.metrics)
    first = next(iter(per_seed.values()))
    title = args.title or f"{args.config} ({first['dataset']}, {first['split_method']} split, {first['users']:,} test users)"
    text = markdown(table, args.metrics, title, args.seeds)
    gains = aggregate(paired_gains(per_seed), GAIN_METRICS)
    if gains:
        text += "\n" + markdown(gains, GAIN_METRICS, "Relative change over the SFT policy, paired by seed "
                                 "(0.05 = +5 %)", args.seeds)
    if any(f["models"] for f in fidelity.values()):
        text += "\n" + markdown(aggregate(fidelity, FIDELITY), FIDELITY, "Reward fidelity (simulator truth as judge)",
                                args.seeds)
    walls = [r["wall_s"] for r in per_seed.values() if "wall_s" in r]
    if walls:
        text += f"\nwall time per seed (whole pipeline): {', '.join(f'{w:.0f} s' for w in walls)}\n"
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "variants": dict(variants), "seeds": args.seeds,
         "aggregate": table, "fidelity": aggregate(fidelity, FIDELITY), "gains_over_sft": gains,
         "per_seed": {str(s): r for s, r in per_seed.items()}}, indent=1))
    print(text, flush=True)
    print(f"[quality] wrote {args.out / 'quality.md'} and quality.json", flush=True)


if __name__ == "__main__":
    main()
