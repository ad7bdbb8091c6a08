"""On-policy preference pairs for the reward heads (`reward.onpolicy_samples`).

The data stage's pairs set a golden page against a corruption of it. Neither is a page the
SFT policy writes, and stage 3 asks the reward one thing only: which of the pages this
policy writes for a user is better. Trained on the golden pairs alone the heads answer
"which looks more like what the policy writes" (docs/BENCHMARKS.md, reward fidelity). So the
policy writes S pages for each prompt, the page prior (fitted on training data only) ranks
them, and the better half is paired above the worse half: the heads learn the prior's
judgement on the policy's own pages, and can carry it where the prior cannot go (the prompt's
whole sequence, any page, serving's /v1/score).

Prompts: every user's latest training positives (as evaluation and serving write for) and
the SFT cut points of their training history (`pagellm.rl.prompts.prompt_rows`). No
validation or test item is read; the simulator's truth never is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FAMILY = "onpolicy"
_COLUMNS = ["user_index", "window", "family", "prompt", "chosen", "rejected", "filled"]


def split_pairs(values: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (better, worse) of sample indices: the samples sorted by value (stable), the i-th
    of the better half above the i-th of the worse half; a tie makes no pair.

    Why halves and not all S(S-1)/2 pairs: each sample is in one pair, so no page's score is
    fitted many times over, and the pairs' margins run from the widest (best vs middle) to
    the narrowest, as the differences between a policy's pages do."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    half = len(order) // 2
    return [(int(a), int(b)) for a, b in zip(order[:half], order[half : 2 * half]) if values[a] > values[b]]


def write_pairs(sft_dir: Path, prompt_rows: list[tuple[int, list[int], list[int]]], prior_dir: Path,
                item_cat: np.ndarray, samples: int, page_len: int, seed: int, device: str = "cpu",
                batch_prompts: int = 32) -> pd.DataFrame:
    """The pairs of `prompt_rows` = [(user, prompt items, excluded items)]: `samples` sampled
    pages each (constrained, temperature 1, as PPO's rollouts), ranked by the page prior in
    `prior_dir`. Columns as the data stage's pairs.parquet, family "onpolicy", `window` the
    prompt's row in `prompt_rows`. Deterministic in `seed` on one device, so a resumed reward
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
    rows = []
    for start in range(0, len(prompt_rows), batch_prompts):
        chunk = prompt_rows[start : start + batch_prompts]
        prompts = [encoder.encode_prompt(u, p) for u, p, _ in chunk for _ in range(samples)]
        with torch.inference_mode():
            pages = generate_pages(model, layout, prompts, k=page_len, mode="sample",
                                   exclude=[ex for _, _, ex in chunk for _ in range(samples)],
                                   generator=generator).items
        values = prior.score(first_item_preferences(model, layout, prompts), pages, item_cat)
        for n, (user, items, _) in enumerate(chunk):
            own = pages[n * samples : (n + 1) * samples]
            rows += [(user, start + n, FAMILY, list(items), list(own[better]), list(own[worse]), 0)
                     for better, worse in split_pairs(values[n * samples : (n + 1) * samples])]
    return pd.DataFrame(rows, columns=_COLUMNS)


def onpolicy_prompts(cfg, run_dir: Path) -> list[tuple[int, list[int], list[int]]]:
    """(user, prompt items, excluded items) for every user: the latest prompt and each SFT cut."""
    from pagellm.rl.prompts import prompt_rows

    return [(user, prompt, banned) for kind in ("latest", "cuts")
            for user, prompt, banned, _ in prompt_rows(cfg, run_dir, kind) if prompt]
