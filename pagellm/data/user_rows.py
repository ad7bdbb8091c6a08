"""Per-user construction of SFT rows and preference pairs (runs inside Ray Data map_groups).

One call sees one user's interactions (all splits). Only training positives ever enter
a prompt, a target or a chosen page, and every item the user touched in any split is
forbidden as filler, so nothing from val/test leaks into training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagellm.data.pages import (
    diversity_negative,
    golden_page,
    preference_negative,
    ranking_negative,
    rating_pair,
    redundancy_negative,
)
from pagellm.names import PAIR_FAMILIES

FAMILIES = PAIR_FAMILIES  # pagellm/names.py
ROW_COLUMNS = ["user_index", "window", "kind", "prompt", "chosen", "rejected", "filled"]


@dataclass
class ItemContext:
    """What every user's call needs to know about items (broadcast once to workers)."""

    item_cat: np.ndarray  # int category per item, -1 when none
    item_score: np.ndarray  # s_i: mean training rating (or popularity share when implicit)
    cat_pool: dict[int, np.ndarray]  # category -> its items, best s_i first
    low_pool: np.ndarray  # all items, lowest s_i first (preference filler)
    page_len: int
    history_len: int
    category_cap: float
    page_order: str
    ranking_swaps: int
    negative_threshold: float
    windows: int
    seed: int
    rating_pairs: bool = False  # also build rating-graded pairs (pages.rating_pair)
    rating_gap: float = 1.0


def sft_windows(n_pos: int, page_len: int, windows: int) -> list[tuple[int, int]]:
    """Cut points (start, end) into a user's training positives for each SFT row.

    The target window is the positives in [start, end); the prompt is what comes before
    `start`. The window takes up to 2 * page_len positives (so the golden page has a
    choice to make) but never more than half of what precedes `end`.
    """
    cuts = []
    for j in range(windows):
        end = n_pos - j * page_len
        span = min(2 * page_len, end // 2)
        start = end - span
        if start < 1 or span < 2:
            break
        cuts.append((start, end))
    return cuts


def build_user_rows(group: dict[str, np.ndarray], ctx: ItemContext) -> list[tuple]:
    """SFT rows and pairs of one user, as tuples in ROW_COLUMNS order."""
    order = np.argsort(group["seq"], kind="stable")
    items = group["item_index"][order].astype(np.int64)
    ratings = group["rating"][order].astype(np.float64)
    split = group["split"][order]
    pos = group["pos"][order].astype(bool)
    user = int(group["user_index"][0])
    rng = np.random.default_rng([ctx.seed, user])

    train = split == 0
    pos_items, pos_ratings = items[train & pos], ratings[train & pos]
    disliked = items[train & (ratings < ctx.negative_threshold)]  # NaN (implicit) is never < t
    disliked = disliked[np.argsort(ratings[train & (ratings < ctx.negative_threshold)], kind="stable")]
    forbidden = set(items.tolist())

    rows = []
    for window, (start, end) in enumerate(sft_windows(len(pos_items), ctx.page_len, ctx.windows)):
        prompt = pos_items[max(0, start - ctx.history_len) : start].tolist()
        chosen = golden_page(
            pos_items[start:end], pos_ratings[start:end], ctx.item_score, ctx.item_cat, ctx.page_len, ctx.category_cap,
            order_by=ctx.page_order,
        )
        if len(chosen) < 2:
            continue
        rows.append((user, window, "sft", prompt, chosen, [], 0))
        pref, filled = preference_negative(disliked, len(chosen), ctx.low_pool, forbidden, rng)
        negatives = {
            "preference": pref if len(pref) == len(chosen) else None,
            "ranking": ranking_negative(chosen, ctx.ranking_swaps, rng),
            "diversity": diversity_negative(chosen, ctx.item_cat, ctx.cat_pool, forbidden),
            "redundancy": redundancy_negative(chosen, ctx.item_cat),
        }
        for family in FAMILIES[:4]:
            rejected = negatives[family]
            if rejected is not None:
                rows.append((user, window, family, prompt, chosen, rejected, filled if family == "preference" else 0))
        graded = rating_pair(pos_items[start:end], pos_ratings[start:end], ctx.item_score, ctx.page_len,
                             ctx.rating_gap) if ctx.rating_pairs else None
        if graded is not None:
            rows.append((user, window, "rating", prompt, graded[0], graded[1], 0))
    return rows
