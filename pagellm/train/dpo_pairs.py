"""DPO's training pairs and their reference log-probabilities, built in the driver (no Ray).

Offline pairs are the data stage's (`<run>/data/pairs.parquet`, filtered by `dpo.families`).
On-policy pairs come from the SFT policy itself: for each user's latest training prompt
(PPO's `latest` prompts, pagellm/rl/prompts.py) it samples `dpo.samples_per_prompt` pages
with the user's training history excluded, the ranker (`dpo.ranker`: the stage-2 reward
R = R_c + R_f, or the page prior) scores them, and the best becomes chosen, the worst
rejected. With `dpo.ranker: next_item` the chosen page is instead the top `page_len` of the
policy's own next-item ranking (its first-position item log-probs, history excluded), and
the rejected one the page it writes greedily for the same prompt: on every real dataset the
written page hits the held-out next item less often than that ranking does
(docs/BENCHMARKS.md), and this pair teaches the writer what its ranking already holds.
Either way the frozen SFT policy scores every chosen and rejected page once,
here (`page_logprobs`, the likelihood the training loss uses), so the Ray Train workers
hold one model, the policy. The result lands in `<run>/dpo/pairs.parquet` with a
`pairs.json` saying how it was built; a resumed run with the same settings reuses it.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.config import Config
from pagellm.models.positions import prompt_anchor
from pagellm.train.dpo_loss import page_logprobs
from pagellm.train.sft_rows import collate, page_rows
from pagellm.vocab import PromptEncoder

PAIRS_FILE = "pairs.parquet"
META_FILE = "pairs.json"
ON_POLICY = "on_policy"  # the family name of sampled pairs
_BATCH = 64  # pages per forward pass in the driver (sampling, ranking, reference scoring)


def offline_pairs(data_dir: Path, families: list[str] | None) -> pd.DataFrame:
    """The data stage's pairs of the requested families (None = all)."""
    path = data_dir / PAIRS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `pagellm data --run {data_dir.parent}` first")
    pairs = pd.read_parquet(path, columns=["user_index", "family", "prompt", "chosen", "rejected"])
    present = sorted(pairs["family"].unique())
    if not present:
        raise ValueError(f"{path} holds no pairs: the data stage built none for this configuration")
    if families is not None:
        missing = sorted(set(families) - set(present))
        if missing:
            raise ValueError(f"dpo.families asks for {', '.join(missing)}, but the data stage built no such pairs; "
                             f"families present: {', '.join(present)}")
        pairs = pairs[pairs["family"].isin(families)]
    return pairs.reset_index(drop=True)


def best_and_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt (rows of [N, S] scores): the index of the best and the worst page (the
    first of equals) and whether they tie (no preference to learn from)."""
    best, worst = scores.argmax(axis=1), scores.argmin(axis=1)
    rows = np.arange(len(scores))
    return best, worst, scores[rows, best] == scores[rows, worst]


def make_ranker(cfg: Config, run_dir: Path, model, layout):
    """score(prompt ids, pages) -> [B] page values under `dpo.ranker`."""
    reward_dir = run_dir / "reward"
    if cfg.dpo.ranker == "reward":
        from pagellm.models.reward import REWARD_FILE
        from pagellm.models.reward_scorer import RewardScorer

        if not (reward_dir / REWARD_FILE).exists():
            raise FileNotFoundError(f"{reward_dir}/{REWARD_FILE} not found: on-policy DPO ranks pages with the "
                                    f"reward model; run `pagellm reward --run {run_dir}` first")
        scorer = RewardScorer.load(reward_dir)
        encoder = PromptEncoder(None, layout)

        def score(prompts, pages):
            r_c, r_f = scorer.score_tokens(prompts, [encoder.encode_page(p) for p in pages])
            return (r_c + r_f).astype(np.float64)
        return score
    from pagellm.models.page_prior import PagePrior, first_item_preferences, item_categories

    prior = PagePrior.load(reward_dir)
    if prior is None:
        raise FileNotFoundError(f"{reward_dir}: no page prior; run `pagellm reward --run {run_dir}` with "
                                f"reward.page_prior=true first")
    item_cat = item_categories(run_dir / "data")
    # The prior's preference feature is the SFT policy's own first-item log-probs.
    return lambda prompts, pages: prior.score(first_item_preferences(model, layout, prompts), pages,
                                              item_cat).astype(np.float64)


def ranking_page(scores: np.ndarray, exclude: set[int], k: int) -> list[int]:
    """The k best items of one prompt's [n_items] next-item scores, best first, never one of
    `exclude` (ties broken by item index, so the page is deterministic). Not
    pagellm.eval.baselines.rank, whose argpartition leaves the order of tied items unset:
    a pair file must come out the same on every rebuild."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    if exclude:
        scores[sorted(exclude)] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [int(i) for i in order if np.isfinite(scores[i])]


def next_item_pairs(cfg: Config, model, tokenizer, layout, rows, log=print) -> tuple[pd.DataFrame, dict]:
    """`dpo.ranker: next_item` (module doc): per prompt, chosen = the ranking page, rejected =
    the greedy page; a prompt whose two pages are the same list is a tie and skipped."""
    from pagellm.models.decoding import first_item_scores, generate_pages

    encoder = PromptEncoder(tokenizer, layout)
    k = cfg.data.page_len
    log(f"[dpo] {len(rows):,} training prompts: the top {k} of the SFT policy's next-item ranking "
        f"against the page it writes greedily")
    out, ties = [], 0
    for a in range(0, len(rows), _BATCH):
        batch = rows[a : a + _BATCH]
        ids = [encoder.encode_prompt(user, prompt) for user, prompt, _, _ in batch]
        with torch.inference_mode():
            written = generate_pages(model, layout, ids, k=k, mode="greedy", exclude=[r[2] for r in batch]).items
            scores = first_item_scores(model, layout, ids).double().cpu().numpy()
        for (user, prompt, banned, _), row_scores, greedy in zip(batch, scores, written):
            ranked, greedy = ranking_page(row_scores, set(banned), k), list(greedy)
            if ranked == greedy:
                ties += 1
                continue
            # Each page's score: its next-item probability mass, the hits expected under the ranking.
            out.append((user, ON_POLICY, prompt, ranked, greedy, float(np.exp(row_scores[ranked]).sum()),
                        float(np.exp(row_scores[greedy]).sum())))
    pairs = pd.DataFrame(out, columns=["user_index", "family", "prompt", "chosen", "rejected", "score_chosen",
                                       "score_rejected"])
    stats = {"pages_generated": len(rows), "ties_skipped": ties}
    log(f"[dpo] {len(pairs):,} pairs ({ties:,} prompt(s) skipped: the written page already is the ranking's top)")
    return pairs, stats


def sample_pairs(cfg: Config, run_dir: Path, model, tokenizer, layout, log=print) -> tuple[pd.DataFrame, dict]:
    """On-policy pairs (module doc) and {pages_generated, ties_skipped}."""
    from pagellm.models.decoding import generate_pages

    from pagellm.rl.prompts import prompt_rows

    latest = prompt_rows(cfg, run_dir, "latest")
    if cfg.dpo.ranker == "next_item":
        return next_item_pairs(cfg, model, tokenizer, layout, latest, log)
    encoder = PromptEncoder(tokenizer, layout)
    users, prompts, exclude = ([r[i] for r in latest] for i in range(3))
    samples = cfg.dpo.samples_per_prompt
    rank = make_ranker(cfg, run_dir, model, layout)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    per_batch = max(1, _BATCH // samples)
    log(f"[dpo] sampling {samples} pages for each of {len(users):,} training prompts, ranked by {cfg.dpo.ranker}")
    rows, ties = [], 0
    for a in range(0, len(users), per_batch):
        group = list(range(a, min(a + per_batch, len(users))))
        repeated = [i for i in group for _ in range(samples)]  # the samples of one prompt in a row
        ids = [encoder.encode_prompt(users[i], prompts[i]) for i in repeated]
        with torch.inference_mode():
            pages = generate_pages(model, layout, ids, k=cfg.data.page_len, mode="sample",
                                   exclude=[exclude[i] for i in repeated], generator=generator).items
            scores = rank(ids, pages).reshape(len(group), samples)
        best, worst, tie = best_and_worst(scores)
        ties += int(tie.sum())
        for n, i in enumerate(group):
            if not tie[n]:
                rows.append((users[i], ON_POLICY, prompts[i], pages[n * samples + best[n]],
                             pages[n * samples + worst[n]], scores[n, best[n]], scores[n, worst[n]]))
    pairs = pd.DataFrame(rows, columns=["user_index", "family", "prompt", "chosen", "rejected", "score_chosen",
                                        "score_rejected"])
    stats = {"pages_generated": len(users) * samples, "ties_skipped": ties}
    log(f"[dpo] {len(pairs):,} on-policy pairs from {stats['pages_generated']:,} sampled pages "
        f"({ties:,} prompt(s) skipped: best and worst page tie)")
    return pairs, stats


def reference_logprobs(model, tokenizer, layout, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """([P], [P]) the frozen policy's constrained log-likelihood of each pair's chosen and
    rejected page, batched; the model must be in eval mode (no dropout)."""
    encoder = PromptEncoder(tokenizer, layout)
    pad = partial(collate, pad_id=layout.pad_id, anchor=prompt_anchor(model))
    users, prompts = pairs["user_index"].tolist(), pairs["prompt"].tolist()
    out = []
    for pages in (pairs["chosen"].tolist(), pairs["rejected"].tolist()):
        scored = []
        for a in range(0, len(pages), _BATCH):
            rows = page_rows(encoder, users[a : a + _BATCH], prompts[a : a + _BATCH], pages[a : a + _BATCH],
                             user_dropout=0.0, seed=0)
            with torch.inference_mode():
                scored.append(page_logprobs(model, pad(rows), layout).double().cpu().numpy())
        out.append(np.concatenate(scored) if scored else np.zeros(0))
    return out[0], out[1]


def pair_settings(cfg: Config) -> dict:
    """What the pairs depend on: a saved pairs file built otherwise is rebuilt."""
    if cfg.dpo.on_policy:
        settings = {"on_policy": True, "ranker": cfg.dpo.ranker, "seed": cfg.seed, "page_len": cfg.data.page_len}
        if cfg.dpo.ranker != "next_item":  # the next-item pairs sample nothing
            settings["samples_per_prompt"] = cfg.dpo.samples_per_prompt
        return settings
    return {"on_policy": False, "families": cfg.dpo.families}


def build_pairs(cfg: Config, run_dir: Path, log=print) -> tuple[Path, dict]:
    """Write (or reuse) <run>/dpo/pairs.parquet with ref_chosen / ref_rejected columns;
    returns its path and {pages_generated, ties_skipped, dropped}."""
    from pagellm.models.policy import load_policy

    out_dir, sft_dir = run_dir / "dpo", run_dir / "sft"
    path, meta_path = out_dir / PAIRS_FILE, out_dir / META_FILE
    settings = pair_settings(cfg)
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["settings"] == settings:
            log(f"[dpo] reusing {len(pd.read_parquet(path, columns=['family'])):,} pairs from {path}")
            return path, meta["stats"]
        log(f"[dpo] {path} was built with {meta['settings']}; rebuilding for {settings}")
    model, tokenizer, layout = load_policy(sft_dir, trainable=False)
    model.eval()
    if cfg.dpo.on_policy:
        pairs, stats = sample_pairs(cfg, run_dir, model, tokenizer, layout, log)
    else:
        pairs, stats = offline_pairs(run_dir / "data", cfg.dpo.families), {"pages_generated": 0, "ties_skipped": 0}
    if pairs.empty:
        raise ValueError("no DPO pairs: every sampled prompt's pages tied" if cfg.dpo.on_policy else "no DPO pairs")
    log(f"[dpo] reference log-probs of {len(pairs):,} pairs under the frozen SFT policy")
    ref_c, ref_r = reference_logprobs(model, tokenizer, layout, pairs)
    # A page that breaks the page constraints (an item twice, or one from the prompt) has no
    # likelihood under constrained decoding: nothing to move, so it is dropped and counted.
    ok = np.isfinite(ref_c) & np.isfinite(ref_r)
    stats["dropped"] = int((~ok).sum())
    if stats["dropped"]:
        log(f"[dpo] dropped {stats['dropped']:,} pair(s) whose pages break the page constraints")
    pairs = pairs.assign(ref_chosen=ref_c, ref_rejected=ref_r)[ok].reset_index(drop=True)
    if pairs.empty:
        raise ValueError("no DPO pairs left: every pair's pages break the page constraints")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(path)
    meta_path.write_text(json.dumps({"settings": settings, "stats": stats}, indent=1))
    return path, stats
