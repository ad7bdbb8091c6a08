"""How well DeGRe's lookahead evaluator tracks the simulator's true page utility (a judge, read
here after training; no stage reads it).

    python bench/evaluator_fidelity.py runs/s3/tiny/seed0/variants/degre [more runs ...]

For each run (a simulator run whose <run>/degre holds a fitted evaluator and mined pages):
  - within-user Spearman of the evaluator's page value with the truth over S pages sampled
    from the SFT policy per user (as the reward-fidelity block measures R), next to the same
    for the summed mean training rating of the page's items (a signal with no model at all);
  - the mined pages: the true utility of each prompt's highest-valued page, the mean over all
    mined pages, the best by truth, and the within-user Spearman of value with truth among them;
  - the Spearman, over items, of the evaluator's first-step gain (averaged over users) with the
    items' mean training rating and with their popularity: what the gains learned.
Prints one Markdown table, mean ± std over the runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

SAMPLES = 8


def _within_user(values: np.ndarray, truth: np.ndarray) -> float:
    """Mean over users (rows) of Spearman(values, truth); rows that tie throughout are skipped."""
    rhos = [spearmanr(v, t)[0] for v, t in zip(values, truth) if np.ptp(v) > 0 and np.ptp(t) > 0]
    return float(np.mean(rhos)) if rhos else float("nan")


def measure(run: Path, users: int, seed: int) -> dict[str, float]:
    from pagellm.config import load_config
    from pagellm.data.simulator import Simulator
    from pagellm.models.decoding import generate_pages, left_pad
    from pagellm.models.lookahead import LookaheadEvaluator, page_values
    from pagellm.models.policy import load_policy
    from pagellm.rl.prompts import prompt_rows
    from pagellm.vocab import PromptEncoder

    cfg = load_config(run / "config.yaml")
    sim = Simulator.load(run / "data" / "simulator")
    vocab = pd.read_parquet(run / "data" / "vocab.parquet")
    user_ids = vocab.loc[vocab["kind"] == "user", "raw_id"].tolist()
    item_ids = vocab.loc[vocab["kind"] == "item", "raw_id"].tolist()
    items = pd.read_parquet(run / "data" / "items.parquet").sort_values("index")
    quality = items["mean_rating"].to_numpy()
    policy, tokenizer, layout = load_policy(run / "sft", trainable=False)
    policy.eval()
    encoder = PromptEncoder(tokenizer, layout)
    evaluator = LookaheadEvaluator.from_pretrained(str(run / "degre" / "evaluator")).eval()
    rows = prompt_rows(cfg, run, "latest")[:users]
    prompts = [encoder.encode_prompt(u, p) for u, p, _, _ in rows]
    generator = torch.Generator().manual_seed(seed)
    values, truth, quality_sum = [], [], []
    with torch.inference_mode():
        for (user, _, banned, _), prompt in zip(rows, prompts):
            pages = generate_pages(policy, layout, [prompt] * SAMPLES, k=cfg.data.page_len, mode="sample",
                                   exclude=[banned] * SAMPLES, generator=generator).items
            values.append(page_values(evaluator, [prompt] * SAMPLES, pages, layout.item_offset, layout.pad_id)[:, -1]
                          .numpy())
            truth.append(sim.page_utility([user_ids[user]] * SAMPLES, [[item_ids[i] for i in p] for p in pages]))
            quality_sum.append(np.array([quality[p].sum() for p in pages]))
        ids, mask, _ = left_pad(prompts, layout.pad_id, "cpu")
        first = evaluator.last_gains(ids, mask).mean(dim=0).numpy()
    mined = pd.read_parquet(run / "degre" / "mined.parquet")
    mined["truth"] = sim.page_utility([user_ids[u] for u in mined["user_index"]],
                                      [[item_ids[i] for i in p] for p in mined["page"]])
    by_user = mined.groupby("user_index")
    return {
        "spearman: evaluator (SFT samples)": _within_user(np.stack(values), np.stack(truth)),
        "spearman: summed mean rating (SFT samples)": _within_user(np.stack(quality_sum), np.stack(truth)),
        "mined: utility of the top-valued page": float(by_user.apply(lambda d: d.loc[d["value"].idxmax(), "truth"])
                                                       .mean()),
        "mined: mean utility": float(mined["truth"].mean()),
        "mined: best by truth": float(by_user["truth"].max().mean()),
        "mined: spearman value vs truth": _within_user(*(np.stack([d[c].to_numpy() for _, d in by_user])
                                                         for c in ("value", "truth"))),
        "first-step gain vs item mean rating": float(spearmanr(first, quality)[0]),
        "first-step gain vs popularity": float(spearmanr(first, items["popularity"].to_numpy())[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--users", type=int, default=200, help="users whose SFT samples are scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [measure(run, args.users, args.seed) for run in args.runs]
    print(f"| measure | mean ± std over {len(results)} run(s) |\n|---|---|")
    for key in results[0]:
        vals = [r[key] for r in results]
        mean = float(np.mean(vals))
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        print(f"| {key} | {mean:.4f} ± {std:.4f} |" if not math.isnan(mean) else f"| {key} | – |")


if __name__ == "__main__":
    main()
