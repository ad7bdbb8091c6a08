"""What a page reward could know from the logs alone, judged by the simulator's truth.

    python bench/reward_headroom.py runs/quality/tiny/seed0 runs/quality/tiny/seed1 runs/quality/tiny/seed2

For each finished simulator run (data + SFT policy), over the test users:

1. **Signals on sampled pages.** S pages per user sampled from the SFT policy (as PPO's
   rollouts and the eval's reward-fidelity block); each signal below scores them and its
   within-user Spearman with the true utility is reported (pagellm/eval/fidelity.py):
   - `pref`: sum over the page of exam(k) x exp(z(log p_SFT(item as first item))), scored as
     the page prior scores (the log of that sum, so the same ranks) with fixed weights
     (the policy's own next-item preference, per user);
   - `quality`: the same with z(item score), the item's mean *training* rating (the data
     stage's `s_i`), the same for every user;
   - `pref+quality`, and `pref+quality, sat s`: their sum inside the exp, with each
     repeated category discounted by (1 - s) per earlier page item of that category.
2. **Reranked greedy pages.** The page written greedily by the same score over all unseen
   items (no sampling), for a fixed grid of quality weights and category discounts, next to
   the SFT policy's own greedy page: how much true utility a reward that knew these two
   log-derived facts would leave on the table for stage 3 to find, and what it would cost
   in NDCG@10 against the users' held-out test items.

Nothing here trains; the truth only judges. The grid is fixed in advance (not searched on
the truth), and each number is a mean ± sample std over the given runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagellm.data.simulator import Simulator  # noqa: E402
from pagellm.eval.fidelity import best_of, within_user_spearman  # noqa: E402
from pagellm.eval.metrics import ndcg_at_k  # noqa: E402
from pagellm.eval.runner import load_eval_set, sim_utilities  # noqa: E402
from pagellm.models.decoding import first_item_scores, generate_pages  # noqa: E402
from pagellm.models.page_prior import PagePrior, standardise  # noqa: E402
from pagellm.models.policy import load_policy  # noqa: E402
from pagellm.vocab import PromptEncoder  # noqa: E402

SAMPLED = [("pref", 1.0, 0.0, 0.0), ("quality", 0.0, 1.0, 0.0), ("pref+quality", 1.0, 1.0, 0.0),
           ("pref+quality, sat 0.25", 1.0, 1.0, 0.25), ("pref+quality, sat 0.5", 1.0, 1.0, 0.5)]
GREEDY = [(wq, sat) for wq in (0.0, 0.5, 1.0) for sat in (0.0, 0.25, 0.5)]


def greedy_page(item_value: np.ndarray, banned: set[int], cat: np.ndarray, sat: float, k: int) -> list[int]:
    gain = np.exp(item_value)
    gain[list(banned)] = -1.0
    page = []
    for _ in range(k):
        best = int(gain.argmax())
        if gain[best] < 0:
            break
        page.append(best)
        gain[best] = -1.0
        gain[(cat == cat[best]) & (gain > 0)] *= 1.0 - sat
    return page


def one_run(run: Path, samples: int, seed: int) -> dict[str, float]:
    es = load_eval_set(run / "data", "test", None)
    vocab = pd.read_parquet(run / "data" / "vocab.parquet")
    user_ids = vocab.loc[vocab["kind"] == "user", "raw_id"].tolist()
    item_ids = vocab.loc[vocab["kind"] == "item", "raw_id"].tolist()
    sim = Simulator.load(run / "data" / "simulator")
    items = pd.read_parquet(run / "data" / "items.parquet").set_index("index").sort_index()
    quality, cat = standardise(items["score"].to_numpy(dtype=np.float64)), items["cat_index"].to_numpy()
    model, tokenizer, layout = load_policy(run / "sft", trainable=False)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    users, k = len(prompts), 10
    with torch.inference_mode():
        pref = standardise(np.concatenate([first_item_scores(model, layout, prompts[a : a + 128]).numpy()
                                      for a in range(0, users, 128)]).astype(np.float64))
        rows = [u for u in range(users) for _ in range(samples)]
        generator, sampled = torch.Generator().manual_seed(seed), []
        for a in range(0, len(rows), 256):
            r = rows[a : a + 256]
            sampled += generate_pages(model, layout, [prompts[i] for i in r], k=k, mode="sample",
                                      exclude=[es.exclude[i] for i in r], generator=generator).items
        sft_greedy = []
        for a in range(0, users, 256):
            sft_greedy += generate_pages(model, layout, prompts[a : a + 256], k=k, exclude=es.exclude[a : a + 256]).items
    truth = sim_utilities(sim, es, item_ids, user_ids, sampled, rows).reshape(users, samples)
    def ndcg(pages):
        return float(np.mean([ndcg_at_k(p, t, k) for p, t in zip(pages, es.targets)]))

    out = {"sampled pages: best of S by truth": best_of(truth, truth),
           "greedy: SFT policy": float(sim_utilities(sim, es, item_ids, user_ids, sft_greedy).mean()),
           "ndcg@10 of greedy: SFT policy": ndcg(sft_greedy),
           "greedy: oracle": float(sim_utilities(sim, es, item_ids, user_ids,
                                                 [[item_ids.index(i) for i in p] for p in sim.oracle_page(
                                                     [user_ids[u] for u in es.user_index], k,
                                                     [{item_ids[i] for i in s} for s in es.exclude])]).mean())}
    for name, wp, wq, sat in SAMPLED:
        # The page prior's own value with these fixed weights (log of the sum: same ranks).
        scores = PagePrior(wp, wq, sat, quality.tolist()).score(pref[rows], sampled, cat)
        rho, _ = within_user_spearman(scores.reshape(users, samples), truth)
        out[f"spearman: {name}"] = rho
        out[f"best of S by {name}"] = best_of(scores.reshape(users, samples), truth)
    for wq, sat in GREEDY:
        pages = [greedy_page(pref[u] + wq * quality, es.exclude[u], cat, sat, k) for u in range(users)]
        out[f"greedy: pref + {wq} quality, sat {sat}"] = float(sim_utilities(sim, es, item_ids, user_ids, pages).mean())
        out[f"ndcg@10 of greedy: pref + {wq} quality, sat {sat}"] = ndcg(pages)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [one_run(run, args.samples, args.seed) for run in args.runs]
    print(f"{len(results)} run(s): {', '.join(str(r) for r in args.runs)}; {args.samples} sampled pages per user\n")
    print("| measure | mean ± std |\n|---|---|")
    for key in results[0]:
        values = [r[key] for r in results]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        print(f"| {key} | {np.mean(values):.4f} ± {std:.4f} |")


if __name__ == "__main__":
    main()
