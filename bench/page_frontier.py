"""How much true utility a page can gain over the SFT policy's own page without losing accuracy.

    python bench/page_frontier.py runs/quality/tiny/seed0 runs/quality/tiny/seed1 runs/quality/tiny/seed2

The stage-3 issue asks, on the tiny world, for +15 % true page utility over the SFT policy
with ndcg@100 not below it. This script maps that trade-off for finished simulator runs
(data, SFT policy, reward stage, and the evaluation's cached SASRec fit) without training
anything: each row rewrites every test user's evaluation list (the policy's greedy list of
`eval.list_len` items, whose first `page_len` are the page the simulator judges) and reports
its true utility and its ndcg@100 / ndcg@10 against the held-out items, relative to the SFT
policy's own list, paired by run.

Rows (a fixed grid, chosen before looking at the truth; nothing here is tuned on it):
- `ranking`: the top of the policy's own first-position item scores instead of its list;
- `page c, b, top M`: the page rewritten greedily from the first M items of the policy's list
  by value z + b q, each item's exp(value) discounted by (1 - c) per earlier page item of its
  category (z: the policy's standardised first-item log-probs, q: standardised mean training
  rating, as the page prior reads them), the rest of the list kept in its order;
- `... whole list`: the same discount applied over the whole list, not only the page;
- `prior page`: the page written by the page prior the reward stage fitted (its own b, c);
- `+ sasrec w`: the same with z replaced by z + w z_SASRec, the validation-selected SASRec of
  the run's evaluation (an independent ranker: the ensemble's ranking is also the rest of
  the list). Rows with SASRec need the run's eval_cache (run the evaluation first).

The truth only judges. Read with docs/BENCHMARKS.md ("How far a page can move from the
policy's own ranking").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_headroom import greedy_page  # noqa: E402

from pagellm.config.loading import load_config  # noqa: E402
from pagellm.data.simulator import Simulator  # noqa: E402
from pagellm.eval.metrics import ndcg_at_k  # noqa: E402
from pagellm.eval.output_cache import CACHE_DIR, OutputCache  # noqa: E402
from pagellm.eval.runner import fitted_baseline, load_eval_set, sim_utilities  # noqa: E402
from pagellm.models.decoding import first_item_scores, generate_pages  # noqa: E402
from pagellm.models.page_prior import PagePrior, item_categories, standardise  # noqa: E402
from pagellm.models.policy import load_policy  # noqa: E402
from pagellm.train.dpo_pairs import ranking_page  # noqa: E402
from pagellm.vocab import PromptEncoder  # noqa: E402

DISCOUNTS = (0.1, 0.2, 0.3)
QUALITY = (0.0, 0.1)
TOPS = (20, 100)
SASREC_WEIGHTS = (0.5,)
BATCH = 128


def reranked(value: np.ndarray, lists: list[list[int]], top: int, cat: np.ndarray, c: float, page_len: int,
             whole: bool = False) -> list[list[int]]:
    """Each user's list with its first `page_len` items rewritten greedily from its first `top`
    (`whole`: every position rewritten), the remaining items kept in their order."""
    out = []
    for u, lst in enumerate(lists):
        banned = set(range(value.shape[1])) - set(lst[:top])
        page = greedy_page(value[u], banned, cat, c, len(lst) if whole else page_len)
        chosen = set(page)
        out.append(page + [i for i in lst if i not in chosen])
    return out


def ranking_lists(scores: np.ndarray, exclude: list, width: int) -> list[list[int]]:
    """Each user's top `width` items by score, excluded ones left out (ties by item index)."""
    return [ranking_page(row, set(banned), width) for row, banned in zip(scores, exclude)]


def one_run(run: Path) -> dict[str, dict[str, float]]:
    cfg = load_config(run / "config.yaml")
    es = load_eval_set(run / "data", "test", None)
    vocab = pd.read_parquet(run / "data" / "vocab.parquet")
    user_ids = vocab.loc[vocab["kind"] == "user", "raw_id"].tolist()
    item_ids = vocab.loc[vocab["kind"] == "item", "raw_id"].tolist()
    sim = Simulator.load(run / "data" / "simulator")
    cat = item_categories(run / "data")
    prior = PagePrior.load(run / "reward")
    if prior is None:
        raise SystemExit(f"{run}/reward holds no page prior: run the reward stage with reward.page_prior=true")
    q = np.asarray(prior.quality)
    model, tokenizer, layout = load_policy(run / "sft", trainable=False)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    k, width, users = cfg.data.page_len, cfg.eval.list_len, len(prompts)
    with torch.inference_mode():
        z = standardise(np.concatenate([first_item_scores(model, layout, prompts[a : a + BATCH]).numpy()
                                        for a in range(0, users, BATCH)]).astype(np.float64))
        lists = []
        for a in range(0, users, BATCH):
            lists += generate_pages(model, layout, prompts[a : a + BATCH], k=width,
                                    exclude=es.exclude[a : a + BATCH]).items

    def score(rows: list[list[int]]) -> dict[str, float]:
        return {"utility": float(sim_utilities(sim, es, item_ids, user_ids, [r[:k] for r in rows]).mean()),
                "ndcg@100": float(np.mean([ndcg_at_k(r, t, 100) for r, t in zip(rows, es.targets)])),
                "ndcg@10": float(np.mean([ndcg_at_k(r, t, 10) for r, t in zip(rows, es.targets)]))}

    out = {"SFT policy's list": score(lists), "ranking": score(ranking_lists(z, es.exclude, width))}
    for c in DISCOUNTS:
        for b in QUALITY:
            for top in TOPS:
                out[f"page c {c}, b {b}, top {top}"] = score(reranked(z + b * q, lists, top, cat, c, k))
        out[f"page c {c}, b 0.0, whole list"] = score(reranked(z, lists, width, cat, c, k, whole=True))
    out["prior page (fitted b, c), top 100"] = score(reranked(prior.pref_weight * z + prior.quality_weight * q,
                                                              lists, width, cat, prior.satiation, k))
    cache = OutputCache(run / CACHE_DIR)
    with contextlib.redirect_stdout(io.StringIO()):  # its "reusing the fit" line
        sasrec = fitted_baseline("sasrec", cfg.eval.sasrec, es, cfg.seed, cache)
    z_sasrec = standardise(np.concatenate([sasrec.score(es.histories[a : a + BATCH])
                                           for a in range(0, users, BATCH)]).astype(np.float64))
    for w in SASREC_WEIGHTS:
        ens = standardise(z + w * z_sasrec)
        ens_lists = ranking_lists(ens, es.exclude, width)
        out[f"+ sasrec {w}: ranking"] = score(ens_lists)
        for c in DISCOUNTS[:2]:
            out[f"+ sasrec {w}: page c {c}, b 0.0, top 20"] = score(reranked(ens, ens_lists, 20, cat, c, k))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for run in args.runs:
        results.append(one_run(run))
        print(f"[frontier] {run} done", file=sys.stderr, flush=True)
    base = "SFT policy's list"
    print(f"{len(results)} run(s): {', '.join(map(str, args.runs))}. Relative to the SFT policy's list, paired by "
          f"run (mean ± sample std); absolute SFT values in its row.\n")
    print("| rows | utility | ndcg@100 | ndcg@10 |\n|---|---|---|---|")

    def cell(values: list[float], pct: bool) -> str:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return f"{np.mean(values):+.1%} ± {std:.1%}" if pct else f"{np.mean(values):.4f} ± {std:.4f}"

    for row in results[0]:
        cells = []
        for metric in ("utility", "ndcg@100", "ndcg@10"):
            if row == base:
                cells.append(cell([r[base][metric] for r in results], pct=False))
            else:
                cells.append(cell([r[row][metric] / r[base][metric] - 1 for r in results], pct=True))
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
