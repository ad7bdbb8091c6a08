"""Fit the page prior (pagellm/models/page_prior.py) on the data stage's pairs.

Runs in the reward stage after the heads are trained, on the same users: fitted on the
training users' pairs, its held-out pair accuracy per family reported on the others. The
preference feature comes from the SFT policy (its first-item log-probabilities for each
pair's prompt), so the prior belongs to the policy that stage 3 starts from. The quality
weight comes from the training users' last training positives, each scored as the next item
after the positives before it (`reward.prior_quality: next_item`), or from the pairs; the
category discount is fitted on the pairs, or read off the training logs
(`reward.prior_satiation`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.models.page_prior import (PagePrior, fit_page_prior, next_item_loglik, quality_from_next_items,
                                       satiation_from_logs, standardise)
from pagellm.train.harness import in_worker

BATCH = 256  # prompts per forward pass of the SFT policy
# Users whose last training positive fits the quality weight: one parameter needs few, and the
# fit holds a [users, n_items] matrix (4,096 x Beauty's 12,101 items: 0.4 GB in float64).
NEXT_ITEM_USERS = 4096


def prompt_preferences(sft_dir: Path, users: list[int], prompts: list[list[int]], pages: list[list[list[int]]],
                       width: int) -> list[np.ndarray]:
    """For each list of pages in `pages` (all pages of one kind, e.g. chosen), [P, width]
    standardised preferences, pair p's prompt scoring pair p's page."""
    from pagellm.models.decoding import first_item_scores
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    model, tokenizer, layout = load_policy(sft_dir, trainable=False)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    keys = list(zip(users, map(tuple, prompts)))
    unique = list(dict.fromkeys(keys))
    where = {key: n for n, key in enumerate(unique)}
    by_prompt: list[list[int]] = [[] for _ in unique]
    for pair, key in enumerate(keys):
        by_prompt[where[key]].append(pair)
    out = [np.zeros((len(keys), width)) for _ in pages]
    with torch.inference_mode():
        for a in range(0, len(unique), BATCH):
            chunk = unique[a : a + BATCH]
            pref = first_item_scores(model, layout, [encoder.encode_prompt(u, list(p)) for u, p in chunk]).double().numpy()
            z = standardise(pref)
            for pos in range(len(chunk)):  # every pair of this prompt reads its row
                for pair in by_prompt[a + pos]:
                    for kind, kind_pages in enumerate(pages):
                        page = kind_pages[pair]
                        out[kind][pair, : len(page)] = z[pos, page]
    return out


def next_item_rows(run_dir: Path, history_len: int, skip_users: set[int],
                   max_users: int = NEXT_ITEM_USERS) -> tuple[list[int], list[list[int]], list[int], list[set[int]]]:
    """(users, prompts, targets, seen) for the quality weight's fit: per training user with two
    or more training positives (none of `skip_users`, whose pairs judge the prior), the last
    training positive as the target after the `history_len` positives before it, every other
    training item of the user not a candidate. At most `max_users`, evenly spread. Only the
    train split: nothing held out informs a stage."""
    from pagellm.eval.probe import evenly_spread

    evals = pd.read_parquet(run_dir / "data" / "eval.parquet", columns=["user_index", "train_positives", "train_items"])
    found: tuple[list, list, list, list] = ([], [], [], [])
    for user, positives, items in zip(evals["user_index"], evals["train_positives"], evals["train_items"]):
        positives = [int(i) for i in positives]
        if len(positives) < 2 or int(user) in skip_users:
            continue
        target = positives[-1]
        for part, value in zip(found, (int(user), positives[:-1][-history_len:], target,
                                       {int(i) for i in items} - {target})):
            part.append(value)
    keep = evenly_spread(len(found[0]), max_users)
    users, prompts, targets, seen = ([part[i] for i in keep] for part in found)
    return users, prompts, targets, seen


def next_item_quality_weight(sft_dir: Path, users: list[int], prompts: list[list[int]], targets: list[int],
                             seen: list[set[int]], quality: np.ndarray) -> dict:
    """In a worker: the SFT policy's standardised first-item preferences for each prompt, and
    `quality_from_next_items` on them; with the mean log-likelihood per user at that b and at 0."""
    from pagellm.models.page_prior import first_item_preferences
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    model, tokenizer, layout = load_policy(sft_dir, trainable=False)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    encoded = [encoder.encode_prompt(u, p) for u, p in zip(users, prompts)]
    z = standardise(np.concatenate([first_item_preferences(model, layout, encoded[a : a + BATCH])
                                    for a in range(0, len(encoded), BATCH)]))
    allowed = np.ones_like(z, dtype=bool)
    for row, items in enumerate(seen):
        allowed[row, list(items)] = False
    targets = np.asarray(targets, dtype=np.int64)
    b = quality_from_next_items(z, quality, targets, allowed)
    return {"quality_weight": b, "users": len(targets), "loglik": next_item_loglik(z, quality, targets, allowed, b),
            "loglik_without": next_item_loglik(z, quality, targets, allowed, 0.0)}


def training_categories(run_dir: Path, item_cat: np.ndarray) -> list[np.ndarray]:
    """Each user's training items' categories in the data stage's time order (eval.parquet's
    `train_items`, the same sequence every stage reads), uncategorised items left out. Only
    the train split: nothing held out informs a stage."""
    train_items = pd.read_parquet(run_dir / "data" / "eval.parquet", columns=["train_items"])["train_items"]
    categories = [item_cat[np.asarray(items, dtype=np.int64)] for items in train_items]
    return [seq[seq >= 0] for seq in categories]


def run_prior_fit(run_dir: Path, pairs: pd.DataFrame, val: np.ndarray, source: str, quality_source: str,
                  history_len: int, log=print) -> dict:
    """Fit on the training users (pairs[~val], and with `quality_source` "next_item" their last
    training positives), judge on pairs[val]; writes <run>/reward/page_prior.json. `source`
    says where the category discount comes from (`reward.prior_satiation`), `quality_source`
    the quality weight (`reward.prior_quality`)."""
    t0 = time.perf_counter()
    items = pd.read_parquet(run_dir / "data" / "items.parquet").sort_values("index")
    quality, item_cat = standardise(items["score"].to_numpy(dtype=np.float64)), items["cat_index"].to_numpy()
    from_logs = satiation_from_logs(training_categories(run_dir, item_cat)) if source == "logs" else None
    chosen = [list(map(int, p)) for p in pairs["chosen"]]
    rejected = [list(map(int, p)) for p in pairs["rejected"]]
    width = max(max(map(len, chosen)), max(map(len, rejected)))
    # The SFT policy is loaded in a worker that exits after, not in the driver (harness.in_worker).
    z_chosen, z_rejected = in_worker(prompt_preferences, (run_dir / "sft").resolve(),
                                     pairs["user_index"].astype(int).tolist(),
                                     [list(map(int, p)) for p in pairs["prompt"]], [chosen, rejected], width)
    train = np.flatnonzero(~val)
    # Without categories no page repeats one: c has no gradient and would stay at its start
    # (0.5), read later as a discount the data never showed; it is 0 there.
    no_categories = not (item_cat >= 0).any()
    if no_categories:
        source = "no categories"
    held_c = 0.0 if no_categories else (from_logs["satiation"] if from_logs else None)
    from_next = None
    if quality_source == "next_item":
        skip = {int(u) for u in pairs["user_index"].to_numpy()[val]}
        rows = next_item_rows(run_dir, history_len, skip)
        if rows[0]:
            from_next = in_worker(next_item_quality_weight, (run_dir / "sft").resolve(), *rows, quality)
        else:
            log("[reward] page prior: no training user has two training positives; quality weight from the pairs")
    a, b, c = fit_page_prior(z_chosen[train], [chosen[i] for i in train], z_rejected[train],
                             [rejected[i] for i in train], quality, item_cat, satiation=held_c,
                             quality_weight=from_next["quality_weight"] if from_next else None)
    prior = PagePrior(a, b, c, quality.tolist())
    held = np.flatnonzero(val)
    margin = (prior.value(z_chosen[held], [chosen[i] for i in held], item_cat)
              - prior.value(z_rejected[held], [rejected[i] for i in held], item_cat))
    families = pairs["family"].to_numpy()[held]
    accuracy = {str(f): float((margin[families == f] > 0).mean()) for f in pd.unique(families)}
    accuracy["all"] = float((margin > 0).mean())
    stats = {"pref_weight": a, "quality_weight": b, "satiation": c, "satiation_source": source,
             "quality_source": "next_item" if from_next else "pairs",
             **({"log_repeat_odds": from_logs["odds"], "log_steps": from_logs["steps"]} if from_logs else {}),
             **({"next_item_users": from_next["users"], "next_item_loglik": from_next["loglik"],
                 "next_item_loglik_without_quality": from_next["loglik_without"]} if from_next else {}),
             "heldout_accuracy": accuracy,
             "train_pairs": int(len(train)), "heldout_pairs": int(len(held)),
             "seconds": round(time.perf_counter() - t0, 1)}
    prior.save(run_dir / "reward", {"fit": stats})
    quality_from = f"the next items of {from_next['users']:,} users" if from_next else "the pairs"
    log(f"[reward] page prior: a {a:.3f} (preference), b {b:.3f} (quality, from {quality_from}), c {c:.3f} (satiation, "
        f"{'the data has no categories' if no_categories else 'from the ' + source}); held-out "
        "accuracy " + ", ".join(f"{f} {v:.3f}" for f, v in accuracy.items()))
    return stats

