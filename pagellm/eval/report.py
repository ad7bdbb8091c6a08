"""The run report: one Markdown page plus PNG plots, readable without opening any JSON."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on cluster nodes and CI boxes
import matplotlib.pyplot as plt  # noqa: E402

from pagellm.names import STAGE3_ALGORITHMS  # noqa: E402

ACCURACY = ["recall@20", "recall@40", "ndcg@100", "hr@10", "ndcg@10"]
CONSISTENCY = ["was@10", "pwkt@10", "wmrd@10", "dpa@10"]
DIVERSITY = ["ild@10", "entropy@10", "coverage@10", "tail_share@10"]
VALIDITY = ["invalid_rate", "duplicate_rate"]
FULL = ["full/recall@20", "full/recall@40", "full/ndcg@100", "full/hr@10"]
SIM = ["sim_utility", "sim_utility_ratio"]
HR_PCT = ["hr@1%", "hr@10%"]
HR_PCT_JUDGES = {
    "simulator": "the simulator's true page utility, which no model sees",
    "sasrec": "the page's position-discounted expected relevance under the SASRec baseline (its softmaxed "
              "scores), a model no stage-3 algorithm trains against; SASRec itself is therefore not ranked",
}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def metric_table(models: dict[str, dict], keys: list[str]) -> str:
    keys = [k for k in keys if any(k in m for m in models.values())]
    if not keys:
        return ""
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def gain_table(models: dict[str, dict], base: str, new: str, keys: list[str]) -> str:
    rows = ["| metric | " + base + " | " + new + " | relative gain |", "|---|---|---|---|"]
    for k in keys:
        a, b = models[base].get(k), models[new].get(k)
        if a is None or b is None:
            continue
        gain = f"{(b - a) / abs(a) * 100:+.1f}%" if a else "–"
        rows.append(f"| {k} | {a:.4f} | {b:.4f} | {gain} |")
    return "\n".join(rows)


def bar_plot(models: dict[str, dict], keys: list[str], title: str, path: Path) -> bool:
    keys = [k for k in keys if any(m.get(k) is not None for m in models.values())]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.6))
    width = 0.8 / max(1, len(models))
    for n, (name, m) in enumerate(models.items()):
        xs = [i + n * width for i in range(len(keys))]
        ax.bar(xs, [m.get(k) or 0.0 for k in keys], width, label=name)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(keys))], keys, rotation=20)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ppo_plot(rows: list[dict], path: Path) -> bool:
    if not rows:
        return False
    keys = [k for k in ("reward_mean", "kl", "policy_loss", "value_loss", "pages_per_s") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([r["step"] for r in rows], [r.get(k) for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fidelity_section(block: dict) -> list[str]:
    """How well each page score tracks the simulator's truth (pagellm/eval/fidelity.py)."""
    signals = [k.split("/", 1)[1] for k in block if k.startswith("spearman/")]
    lines = ["## Reward fidelity (simulator truth as the judge)", "",
             f"{block['users']:,} users x {block['samples_per_user']} pages sampled from the SFT policy. "
             "Spearman: within-user rank correlation with the true utility; oracle > greedy: share of users "
             "whose oracle page the signal scores above the SFT greedy page; best of S: true utility of the "
             "sampled page the signal ranks first.", "",
             "| signal | spearman | oracle > greedy | best of S |", "|---|---|---|---|"]
    for name in signals:
        lines.append(f"| {name} | {_fmt(block[f'spearman/{name}'])} | {_fmt(block.get(f'oracle_above_greedy/{name}'))} "
                     f"| {_fmt(block[f'best_of_S/{name}'])} |")
    lines += ["", f"True utility: sampled pages {block['sampled_mean']:.4f}, best of S by truth "
              f"{block['best_of_S/truth']:.4f}, SFT greedy page {block['greedy_utility']:.4f}, oracle page "
              f"{block['oracle_utility']:.4f}.", ""]
    return lines


def hr_pct_section(result: dict) -> list[str]:
    """HR@k% (docs METRICS.md) and what judged it."""
    if "hr_pct_judge" not in result:
        return []
    return ["## Evaluator-ranked hit rate (HR@k%)", "",
            f"Share of users whose page the judge values above all but k% of {result['hr_pct_pages']:,} random "
            f"pages of {result['page_len']} unseen items; the judge is {HR_PCT_JUDGES[result['hr_pct_judge']]}.", "",
            metric_table(result["models"], HR_PCT), ""]


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_report(result: dict, run_dir: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    models = result["models"]
    parts = [f"# PageLLM evaluation — {run_dir.name}", "",
             f"Dataset `{result['dataset']}`, split `{result['split']}` ({result['split_method']}), "
             f"{result['users']:,} users, {result['items']:,} items. Each model writes a "
             f"{result['list_len']}-item list per user; its first {result['page_len']} items are the page.", ""]
    stats = _read_json(run_dir / "data" / "stats.json")
    if stats:
        parts += ["## Data", "",
                  f"{stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions "
                  f"({stats['positives']:,} positive); split {stats['split']}; {stats['sft_rows']:,} SFT rows; "
                  f"pairs {stats['pairs']}; rejected rows {stats['rejected'] or 'none'}.", ""]
        parts += [f"- note: {n}" for n in stats.get("notes", [])] + [""]
    sections = [("Accuracy (generated list)", ACCURACY), ("Ranking consistency of the page (wmrd: lower is better)",
                CONSISTENCY), ("Diversity and redundancy", DIVERSITY), ("Validity (must be 0)", VALIDITY),
                ("Full-ranking track (paper lineage)", FULL), ("True page utility (simulator)", SIM)]
    for title, keys in sections:
        table = metric_table(models, keys)
        if table:
            parts += [f"## {title}", "", table, ""]
    if "sim_oracle_utility" in result:
        parts += [f"The simulator's greedy oracle page earns {result['sim_oracle_utility']:.4f} expected clicks "
                  "per user (sim_utility_ratio 1.0).", ""]
    parts += hr_pct_section(result)
    stage3 = next((name for name in STAGE3_ALGORITHMS if name in models), None)
    if "sft" in models and stage3:
        parts += [f"## {stage3.upper()} vs SFT", "", gain_table(models, "sft", stage3, [
            "sim_utility", "ndcg@100", "ndcg@10", "hr@10", "ild@10", "full/ndcg@100"]), ""]
    if result.get("reward_fidelity"):
        parts += fidelity_section(result["reward_fidelity"])
    reward = _read_json(run_dir / "reward" / "metrics.json")
    if reward and "pair_accuracy" in reward:
        acc = reward["pair_accuracy"]
        fams = sorted({f for head in acc.values() for f in head})
        parts += ["## Reward model: held-out pair accuracy", "", "| head | " + " | ".join(fams) + " |",
                  "|---" * (len(fams) + 1) + "|"]
        parts += [f"| {h} | " + " | ".join(_fmt(acc[h].get(f)) for f in fams) + " |" for h in acc] + [""]
    parts += stage3_section(run_dir, stage3, out_dir) if stage3 else []
    plots = [("accuracy.png", ACCURACY, "Accuracy"), ("consistency.png", CONSISTENCY, "Ranking consistency"),
             ("diversity.png", DIVERSITY, "Diversity"), ("full_ranking.png", FULL, "Full ranking"),
             ("utility.png", SIM, "Simulator utility")]
    parts += ["## Plots", ""]
    for file, keys, title in plots:
        if bar_plot(models, keys, title, out_dir / file):
            parts.append(f"![{title}]({file})")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def stage3_section(run_dir: Path, algorithm: str, out_dir: Path) -> list[str]:
    """Stage 3's training curve (the RL loop's steps, or DPO's / DeGRe's epochs) and what
    validation published."""
    parts: list[str] = []
    stage_dir = run_dir / algorithm
    rl_file = stage_dir / "metrics.jsonl"
    if rl_file.exists():
        rows = [json.loads(line) for line in rl_file.read_text().splitlines() if line.strip()]
        if rows and ppo_plot(rows, out_dir / "ppo_curves.png"):
            last = rows[-1]
            parts += [f"## {algorithm.upper()} training", "", f"{len(rows)} steps; last step reward_mean "
                      f"{_fmt(last.get('reward_mean'))}, kl {_fmt(last.get('kl'))}, stale batches dropped "
                      f"{last.get('stale_dropped', 0)}.", "", "![RL curves](ppo_curves.png)", ""]
    selection = _read_json(stage_dir / "selection.json")
    from pagellm.train.guided import UNIT as GUIDED_UNIT

    if selection and selection.get("unit") in (GUIDED_UNIT, "penalty"):  # the guided stage's (before: penalty)
        return guided_section(selection)
    if selection:
        key, step = selection["metric"], selection["published_step"]
        unit = "step" if rl_file.exists() else "epoch"
        what = "the SFT policy (no stage-3 checkpoint beat it)" if step == 0 else f"{unit} {step}"
        parts += ([] if parts else [f"## {algorithm.upper()} training", ""]) + [
            f"Published: {what}, validation {key} {_fmt(selection['published_' + key])} "
            f"(SFT {_fmt(selection['sft_' + key])}).", ""]
    return parts


def evaluator_names(kinds) -> str:
    """selection.json's `evaluator`: a list since EASE joined SASRec, one name before."""
    return kinds if isinstance(kinds, str) else " + ".join(kinds) or "none"


def guided_section(selection: dict) -> list[str]:
    """What the guided stage tried on validation: its evaluator weights and page terms (repeat
    penalty x quality weight), and which it published."""
    parts = ["## GUIDED: the decoding terms chosen on validation", ""]
    if selection.get("reason") and "guard" not in selection:
        return parts + [f"Published the SFT policy as it is: {selection['reason']}.", ""]
    guard = selection["guard"]
    from pagellm.train.guided import published_terms

    weight = selection.get("evaluator_weight", 0.0)
    kinds = selection.get("evaluator") if weight else None
    kept = published_terms(weight, selection["repeat_penalty"], selection.get("quality_weight"),
                           [kinds] if isinstance(kinds, str) else kinds)
    parts += [f"{selection['users']:,} validation users; guarded {', '.join(guard)}, paired with the SFT decoding, "
              f"less {selection.get('standard_errors', 0):g} standard error(s); published "
              + (kept + "." if kept else "the SFT decoding (no term passed)."), ""]
    changes = " | ".join(f"{m} change (± se)" for m in guard)

    def cells(r: dict) -> str:
        return " | ".join(f"{r[m + '_change']:+.4f} ± {r[m + '_change_se']:.4f}" for m in guard)

    if selection.get("evaluator_history"):
        parts += ["Evaluator weights (each model alone and their average), the largest gain kept if above 0:", "",
                  f"| evaluator | weight | {changes} | page prior value | gain |", "|---" * (len(guard) + 4) + "|"]
        for r in selection["evaluator_history"]:
            # Records before the evaluator took several models name theirs once, in `evaluator`.
            names = evaluator_names(r.get("evaluator", selection.get("evaluator", "sasrec")))
            parts.append(f"| {names} | {r['weight']:g} | {cells(r)} | {_fmt(r.get('prior_value'))} | "
                         f"{'yes' if r['passes'] else 'no'} |")
        parts.append("")
    if selection.get("reason"):
        parts += [selection["reason"][0].upper() + selection["reason"][1:] + ".", ""]
    if selection["history"]:
        base = selection.get("prior_base", selection.get("prior_sft"))
        parts += [f"Page terms{f' (with evaluator weight {weight:g})' if weight else ''}: of the pairs kept within "
                  f"{selection['margin']:.1%} of {selection.get('page_terms_against', 'the SFT decoding')} (and "
                  f"whose smaller neighbours are), the one the "
                  f"page prior values most (without page terms: {_fmt(base)}):", "",
                  f"| penalty | quality | {changes} | page prior value | within margin | eligible |",
                  "|---" * (len(guard) + 5) + "|"]
        for r in sorted(selection["history"], key=lambda r: (r["penalty"], r.get("quality", 0.0))):
            parts.append(f"| {r['penalty']:g} | {r.get('quality', 0.0):g} | {cells(r)} | {_fmt(r.get('prior_value'))} | "
                         f"{'yes' if r['passes'] else 'no'} | {'yes' if r.get('eligible', r['passes']) else 'no'} |")
        parts.append("")
    return parts + [f"SFT decoding: " + ", ".join(f"{m} {_fmt(v)}" for m, v in selection["sft"].items())
                    + f"; page prior value {_fmt(selection.get('prior_sft'))}.", ""]
