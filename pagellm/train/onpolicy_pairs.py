"""On-policy preference pairs for the reward heads (`reward.onpolicy_samples`).

The data stage's pairs set a golden page against a corruption of it. Neither is a page the
SFT policy writes, and stage 3 asks the reward one thing only: which of the pages this
policy writes for a user is better. Trained on the golden pairs alone the heads answer
"which looks more like what the policy writes" (docs/BENCHMARKS.md, reward fidelity). So the
policy writes S pages for each prompt, the page prior (fitted on training data only) scores
them, and they are paired at random, each pair carrying the prior's score difference as its
margin: the heads learn the prior's judgement on the policy's own pages, and can carry it where
the prior cannot go (the prompt's whole sequence, any page, serving's /v1/score).

Prompts: every user's latest training positives (as evaluation and serving write for) and
the SFT cut points of their training history (`pagellm.rl.prompts.prompt_rows`). No
validation or test item is read; the simulator's truth never is.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

FAMILY = "onpolicy"
_COLUMNS = ["user_index", "window", "family", "prompt", "chosen", "rejected", "filled", "margin"]


def sample_pairs(values: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, float]]:
    """Disjoint random pairs (better, worse, value difference) of sample indices: the
    samples shuffled and taken two by two, the higher value first; a tie makes no pair.

    Why random pairs with their margin, and not "the better half above the worse half"
    (session 30): every sample is in one pair, so no page's score is fitted many times
    over; the margins run from nearly equal pages to the widest, as the differences
    between a policy's pages do; and the heads regress each margin (`pair_losses`), so
    they learn how much better a page is. Halves with Bradley–Terry's hard target taught
    only "which side of the median" (docs/BENCHMARKS.md, "On-policy pairs")."""
    values = np.asarray(values, dtype=np.float64)
    order = rng.permutation(len(values))
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        if values[a] != values[b]:
            better, worse = (a, b) if values[a] > values[b] else (b, a)
            pairs.append((int(better), int(worse), float(values[better] - values[worse])))
    return pairs


def write_pairs(sft_dir: Path, prompt_rows: list[tuple[int, list[int], list[int]]], prior_dir: Path,
                item_cat: np.ndarray, samples: int, page_len: int, seed: int, device: str = "cpu",
                batch_prompts: int = 32, progress_every: int = 10) -> pd.DataFrame:
    """The pairs of `prompt_rows` = [(user, prompt items, excluded items)]: `samples` sampled
    pages each (constrained, temperature 1, as PPO's rollouts), scored by the page prior in
    `prior_dir` and paired by `sample_pairs`. Columns as the data stage's pairs.parquet,
    family "onpolicy", `window` the prompt's row in `prompt_rows`, plus `margin`, the prior's
    R_p(chosen) − R_p(rejected). Deterministic in `seed` on one device, so a resumed reward
    stage trains on the same pairs. Runs where it is called (the reward stage calls it in a
    worker that exits after)."""
    import torch

    from pagellm.models.decoding import generate_pages
    from pagellm.models.page_prior import PagePrior, first_item_preferences
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    prior = PagePrior.load(prior_dir)
    if prior is None:
        raise FileNotFoundError(f"{prior_dir}: no page prior to rank on-policy pages with")
    model, tokenizer, layout = load_policy(sft_dir, trainable=False, device=device)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    generator = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)  # the pairing: CPU-side, the same on every device
    rows = []
    t0 = time.perf_counter()
    for batch_no, start in enumerate(range(0, len(prompt_rows), batch_prompts)):
        if batch_no % progress_every == 0:  # a worker's prints reach the driver's log
            print(f"[reward] on-policy pages: {start:,}/{len(prompt_rows):,} prompts x {samples} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        chunk = prompt_rows[start : start + batch_prompts]
        prompts = [encoder.encode_prompt(u, p) for u, p, _ in chunk for _ in range(samples)]
        with torch.inference_mode():
            pages = generate_pages(model, layout, prompts, k=page_len, mode="sample",
                                   exclude=[ex for _, _, ex in chunk for _ in range(samples)],
                                   generator=generator).items
        values = prior.score(first_item_preferences(model, layout, prompts), pages, item_cat)
        for n, (user, items, _) in enumerate(chunk):
            own = pages[n * samples : (n + 1) * samples]
            rows += [(user, start + n, FAMILY, list(items), list(own[better]), list(own[worse]), 0, margin)
                     for better, worse, margin in sample_pairs(values[n * samples : (n + 1) * samples], rng)]
    return pd.DataFrame(rows, columns=_COLUMNS)


def onpolicy_prompts(cfg, run_dir: Path) -> list[tuple[int, list[int], list[int]]]:
    """(user, prompt items, excluded items) for every user: the latest prompt and each SFT cut."""
    from pagellm.rl.prompts import prompt_rows

    return [(user, prompt, banned) for kind in ("latest", "cuts")
            for user, prompt, banned, _ in prompt_rows(cfg, run_dir, kind) if prompt]
