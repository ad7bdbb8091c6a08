"""Every stage-3 algorithm from the same SFT policy over N seeds: one command, one table.

    python bench/stage3_compare.py --config configs/tiny.yaml --seeds 0 1 2 --out runs/s3/tiny \\
        --algorithms ppo grpo dpo degre [--set KEY=VALUE ...] [--algo-set dpo=dpo.beta=0.2 ...]

An entry of --algorithms may carry a label, ALGO:LABEL (`degre:prior`), so two settings of one
algorithm are rows of the same table: `--algorithms degre degre:prior --algo-set
"degre:prior=degre.value_model=page_prior"` (its runs in OUT/seed<s>/variants/degre-prior).

Each seed runs once with `stage3.algorithm=none` (data, SFT and the baselines; bench/quality.py
`run_seed`, in OUT/seed<s>), then each algorithm as a variant of that seed (`run_variant`, in
OUT/seed<s>/variants/<algorithm>) with `stage3.algorithm=<algorithm>` and its --algo-set
overrides (ALGO=KEY=VALUE [KEY=VALUE ...], repeatable; stage-3, reward and eval keys only). So
every algorithm starts from the same data and SFT policy, and is evaluated on the same users
and the same HR@k% random pages. --set applies to the seed run, whose saved config every
variant inherits. The reward model (ppo, grpo, on-policy dpo) is trained once per seed, by the
first variant that needs it, and shared with the later ones (unless an --algo-set changes
`reward.*`): every algorithm then optimises against the same reward and the seed pays for one.
Finished runs are read, not rerun (--fresh redoes them).

Writes OUT/stage3.md and OUT/stage3.json:
- one row per algorithm and one for SFT, mean ± sample std over seeds: sim_utility (simulator
  runs), hr@1%, hr@10% (docs METRICS.md HR@k%), hr@10, ndcg@10, kl_to_sft (nats per page from
  the published policy to the SFT policy, measured by eval the same way for every algorithm,
  pagellm/eval/divergence.py), kl (PPO/GRPO's training KL: the mean of the last 5 steps of
  metrics.jsonl; others only when their DONE records one, else "–"), stage_seconds (the stage's wall time, DONE `seconds`),
  pages_generated, pages_per_s and published_step (0 = the SFT policy won validation);
- the relative change over SFT paired by seed (bench/quality.py `paired_gains`);
- the best algorithm on sim_utility and on hr@10, and per algorithm a verdict on each: "beats
  SFT" when its mean paired gain exceeds one std of that gain, "worse" below minus one std,
  "no change" between (with one seed there is no spread: "1 seed");
- per algorithm, paired with SFT user by user and pooled over seeds (`paired_users`): the
  users only it hits and only SFT hits (hr@10) with McNemar's exact p-value, and on the
  simulator the mean per-user change in true utility with a paired t-test: the tests that
  say whether a gain of a few users is more than chance, which the seed-level verdict cannot
  on a small test set.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from quality import GAIN_METRICS, aggregate, markdown, paired_gains, parse_variant, run_seed, run_variant

from pagellm.names import STAGE3_ALGORITHMS

METRICS = ["sim_utility", "hr@1%", "hr@10%", "hr@10", "ndcg@10", "kl_to_sft", "kl", "stage_seconds",
           "pages_generated", "pages_per_s", "published_step"]
VERDICT_METRICS = ["sim_utility", "hr@10"]


def done_facts(stage_dir: Path) -> dict:
    """What the stage's DONE record says about its cost: wall time, pages written and their
    rate, and the KL to the reference when the algorithm records one there."""
    done = json.loads((stage_dir / "DONE").read_text())
    facts = {"stage_seconds": done.get("seconds"), "pages_generated": done.get("pages_generated"), "kl": done.get("kl")}
    if facts["stage_seconds"] and facts["pages_generated"] is not None:
        facts["pages_per_s"] = facts["pages_generated"] / facts["stage_seconds"]
    return {k: v for k, v in facts.items() if v is not None}


def share_reward(seed_dir: Path, variant_dir: Path) -> None:
    """Keep the first reward model a variant trained as the seed's, for the later variants."""
    if not (seed_dir / "reward" / "metrics.json").exists() and (variant_dir / "reward" / "metrics.json").exists():
        shutil.rmtree(seed_dir / "reward", ignore_errors=True)
        shutil.copytree(variant_dir / "reward", seed_dir / "reward")


def algorithm_of(entry: str) -> str:
    """The stage-3 algorithm of an --algorithms entry: `degre:prior` -> degre."""
    return entry.partition(":")[0]


def variant_name(entry: str) -> str:
    """The folder of an entry's runs under OUT/seed<s>/variants: `degre:prior` -> degre-prior."""
    return entry.replace(":", "-")


def run_algorithm(seed_dir: Path, entry: str, sets: list[str], fresh: bool) -> dict:
    """One entry's row for one seed: its evaluation, KL and published step
    (quality.run_variant) and its DONE record, where metrics.jsonl's KL wins over DONE's."""
    algorithm = algorithm_of(entry)
    row = run_variant(seed_dir, variant_name(entry), [f"stage3.algorithm={algorithm}", *sets], fresh)["stage3"]
    variant_dir = seed_dir / "variants" / variant_name(entry)
    if not any(s.startswith("reward.") for s in sets):
        share_reward(seed_dir, variant_dir)
    return done_facts(variant_dir / algorithm) | row


PAIRED_METRICS = ("hr@10", "sim_utility")  # per-user outcomes compared with SFT's (sim_utility: simulator runs)


def pooled_outcomes(seed_dirs: list[Path], entry: str) -> dict[str, tuple[list, list, int]]:
    """metric -> (the entry's per-user values, SFT's on the same users, seeds) for each of
    PAIRED_METRICS, concatenated over the seeds whose eval wrote per-user rows holding it."""
    import pandas as pd

    from pagellm.eval.runner import PER_USER_FILE

    pooled: dict[str, tuple[list, list, int]] = {}
    for seed_dir in seed_dirs:
        path = seed_dir / "variants" / variant_name(entry) / "eval" / PER_USER_FILE
        if not path.exists():  # a run evaluated before eval wrote per-user rows
            continue
        rows = pd.read_parquet(path)
        ours = rows[rows["model"] == algorithm_of(entry)].set_index("user_index")
        sft = rows[rows["model"] == "sft"].set_index("user_index").reindex(ours.index)
        for metric in (m for m in PAIRED_METRICS if m in rows):
            if sft[metric].isna().any():
                raise ValueError(f"{path}: SFT has no {metric} for some of {entry}'s users")
            a, b, seeds = pooled.get(metric, ([], [], 0))
            pooled[metric] = (a + ours[metric].tolist(), b + sft[metric].tolist(), seeds + 1)
    return pooled


def paired_users(seed_dirs: list[Path], algorithms: list[str]) -> dict[str, dict]:
    """Per algorithm, against SFT on the same users, pooled over seeds (pagellm/eval/paired.py):
    "hr@10" {only_a (users only the algorithm hits), only_b (only SFT), p_value, seeds} by
    McNemar's exact test, and on the simulator "sim_utility" {mean_diff, se, p_value, users,
    seeds} by a paired t-test. Seed-level spread cannot say whether +2 users of 670 is
    anything; these can."""
    from pagellm.eval.paired import discordant, mcnemar, paired_difference

    tests = {"hr@10": lambda ours, sft: mcnemar(*discordant(ours, sft)), "sim_utility": paired_difference}
    out: dict[str, dict] = {}
    for algorithm in algorithms:
        pooled = pooled_outcomes(seed_dirs, algorithm)
        if pooled:
            out[algorithm] = {metric: tests[metric](ours, sft) | {"seeds": seeds}
                              for metric, (ours, sft, seeds) in pooled.items()}
    return out


def paired_table(paired: dict[str, dict]) -> str:
    """The Markdown of paired_users' result, after a blank line ("" when no run wrote
    per-user rows)."""
    if not paired:
        return ""
    utility = any("sim_utility" in r for r in paired.values())
    head = "| algorithm | hr@10: users only it hits | only SFT hits | McNemar p |"
    head += " sim_utility − SFT's (± se) | paired t p |" if utility else ""
    lines = ["", "Per user, paired with SFT on the same users and pooled over seeds (pagellm/eval/paired.py):", "",
             head + " seeds |", "|---" * head.count("|") + "|"]
    for a, r in paired.items():
        hr, util = r.get("hr@10"), r.get("sim_utility")
        row = f"| {a} | " + (f"{hr['only_a']} | {hr['only_b']} | {hr['p_value']:.3f} |" if hr else "– | – | – |")
        if utility:
            row += f" {util['mean_diff']:+.4f} ± {util['se']:.4f} | {util['p_value']:.3g} |" if util else " – | – |"
        lines.append(row + f" {max(x['seeds'] for x in r.values())} |")
    return "\n".join(lines) + "\n"


def verdict(gain: dict | None) -> str:
    """Whether a paired gain (aggregate's {mean, std, n}) is more than one std from 0."""
    if gain is None:
        return "–"
    if gain["n"] < 2:
        return "1 seed"
    if gain["mean"] > gain["std"]:
        return "beats SFT"
    return "worse" if gain["mean"] < -gain["std"] else "no change"


def best_line(table: dict, algorithms: list[str]) -> str:
    """The algorithm with the best mean on each verdict metric; equal means (e.g. every
    algorithm published the SFT policy) are named as a tie, not as the first of them, and a
    best mean no higher than SFT's says so: an algorithm that published the SFT policy in
    every seed is not the best one."""
    parts = []
    for metric in VERDICT_METRICS:
        scored = {a: table[a][metric]["mean"] for a in algorithms if metric in table.get(a, {})}
        if scored:
            top = max(scored.values())
            names = [a for a, mean in scored.items() if mean == top]
            who = names[0] if len(names) == 1 else f"tie between {', '.join(names)}"
            part = f"{metric}: {who} ({top:.4f} ± {table[names[0]][metric]['std']:.4f})"
            sft = table.get("sft", {}).get(metric, {}).get("mean")
            if sft is not None and top <= sft:
                part = f"{metric}: none above SFT ({sft:.4f}; best {who}, {top:.4f})"
            parts.append(part)
    return "Best algorithm on " + "; ".join(parts) + "." if parts else ""


def verdict_table(gains: dict, algorithms: list[str]) -> str:
    """Per algorithm, beats SFT / no change / worse on each verdict metric."""
    lines = ["| algorithm | " + " | ".join(VERDICT_METRICS) + " |", "|---" * (len(VERDICT_METRICS) + 1) + "|"]
    for a in algorithms:
        lines.append(f"| {a} | " + " | ".join(verdict(gains.get(a, {}).get(m)) for m in VERDICT_METRICS) + " |")
    return "\n".join(lines) + "\n"


def summarise(per_seed: dict[int, dict], algorithms: list[str], title: str) -> tuple[str, dict, dict]:
    """The Markdown page, the aggregate table and the paired gains of the per-seed rows
    (seed -> {"models": {"sft": {...}, <algorithm>: {...}}})."""
    seeds = list(per_seed)
    table = aggregate(per_seed, METRICS)
    gains = aggregate(paired_gains(per_seed), GAIN_METRICS)
    text = markdown(table, METRICS, title, seeds)
    if gains:
        text += "\n" + markdown(gains, GAIN_METRICS, "Relative change over the SFT policy, paired by seed "
                                "(0.05 = +5 %)", seeds)
    text += "\n" + best_line(table, algorithms) + "\n\n"
    text += ("Verdict over SFT (beats SFT: mean paired gain above one std of that gain; worse: below minus "
             "one std; no change: between):\n\n" + verdict_table(gains, algorithms))
    return text, table, gains


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=list(STAGE3_ALGORITHMS), metavar="ALGO[:LABEL]",
                        help=f"entries to compare, each one of {', '.join(STAGE3_ALGORITHMS)}, optionally labelled")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every seed (repeatable)")
    parser.add_argument("--algo-set", action="append", default=[], metavar="ALGO=KEY=VALUE ...",
                        help="overrides for one algorithm's runs (repeatable)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--fresh", action="store_true", help="rerun seeds and algorithms that already have results")
    args = parser.parse_args(argv)

    from pagellm.config import load_config

    for entry in args.algorithms:
        if algorithm_of(entry) not in STAGE3_ALGORITHMS or entry.endswith(":"):
            raise SystemExit(f"--algorithms {entry!r}: expected ALGO or ALGO:LABEL with ALGO one of "
                             f"{', '.join(STAGE3_ALGORITHMS)}")
    if len(set(map(variant_name, args.algorithms))) < len(args.algorithms):
        raise SystemExit(f"--algorithms {' '.join(args.algorithms)}: an entry is listed twice")
    sets: dict[str, list[str]] = {a: [] for a in args.algorithms}
    for text in args.algo_set:
        name, items = parse_variant(text)
        if name not in sets:
            raise SystemExit(f"--algo-set {text!r}: {name} is not among --algorithms {' '.join(args.algorithms)}")
        sets[name] += items
    base = args.overrides + ["stage3.algorithm=none"]
    load_config(args.config, base)  # a config mistake fails here, before any seed runs
    for name, items in sets.items():
        load_config(args.config, args.overrides + [f"stage3.algorithm={algorithm_of(name)}", *items])
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        result = run_seed(args.config, args.out, seed, base, args.fresh)
        rows = {"sft": result["models"]["sft"]}
        for name in args.algorithms:
            rows[name] = run_algorithm(args.out / f"seed{seed}", name, sets[name], args.fresh)
        per_seed[seed] = {"models": rows, "dataset": result["dataset"], "users": result["users"]}
    first = next(iter(per_seed.values()))
    title = args.title or f"Stage 3 on {args.config} ({first['dataset']}, {first['users']:,} test users)"
    text, table, gains = summarise(per_seed, args.algorithms, title)
    paired = paired_users([args.out / f"seed{s}" for s in args.seeds], args.algorithms)
    text += paired_table(paired)
    (args.out / "stage3.md").write_text(text)
    (args.out / "stage3.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "algorithm_sets": sets, "seeds": args.seeds,
         "aggregate": table, "gains_over_sft": gains, "paired_with_sft": paired,
         "per_seed": {str(s): r for s, r in per_seed.items()}}, indent=1))
    print(text, flush=True)
    print(f"[stage3] wrote {args.out / 'stage3.md'} and stage3.json", flush=True)


if __name__ == "__main__":
    main()
