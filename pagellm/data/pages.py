"""Golden pages, the four families of worse pages and rating-graded pairs
(docs/ARCHITECTURE.md §3). Plain numpy.

Items are dense indices. `item_cat[i]` is item i's diversity category as an int, or -1
when the item has none (then every such item counts as its own category, so the cap
never binds and the diversity/redundancy families cannot be built).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def _cat_key(item: int, item_cat: np.ndarray) -> int:
    c = int(item_cat[item])
    return c if c >= 0 else -(item + 2)  # uncategorised items: each its own category


def golden_page(
    candidates: np.ndarray,
    ratings: np.ndarray,
    item_score: np.ndarray,
    item_cat: np.ndarray,
    page_len: int,
    category_cap: float,
    order_by: str = "rating",
) -> list[int]:
    """Rank unseen positives by rating, then item mean rating, then index; cap categories.

    `order_by="time"` keeps the candidates' own (interaction) order instead.
    No category may hold more than `category_cap` of the page (at least one slot each).
    The cap trades a small score gap for coverage: a capped item waits until the page
    cannot be filled otherwise, so a page is only over the cap when the candidates
    leave no choice.
    """
    if len(candidates) == 0:
        return []
    if order_by == "time":
        order = np.arange(len(candidates))  # a re-interacted item keeps its first time
    elif order_by == "rating":
        # Duplicates in candidates (a re-rated item) keep their best rating.
        order = np.lexsort((candidates, -item_score[candidates], -np.nan_to_num(ratings, nan=5.0)))
    else:
        raise ValueError(f"order_by must be 'rating' or 'time', got {order_by!r}")
    ranked, seen = [], set()
    for i in order:
        item = int(candidates[i])
        if item not in seen:
            seen.add(item)
            ranked.append(item)
    cap = max(1, int(np.floor(category_cap * page_len + 1e-9)))
    page, waiting, per_cat = [], [], Counter()
    for item in ranked:
        if len(page) == page_len:
            break
        key = _cat_key(item, item_cat)
        if per_cat[key] < cap:
            page.append(item)
            per_cat[key] += 1
        else:
            waiting.append(item)
    page.extend(waiting[: page_len - len(page)])
    return page


def ranking_negative(golden: list[int], swaps: int, rng: np.random.Generator) -> list[int] | None:
    """Same items, broken order: `swaps` adjacent swaps at random positions."""
    if len(golden) < 2:
        return None
    page = list(golden)
    for _ in range(swaps):
        j = int(rng.integers(0, len(page) - 1))
        page[j], page[j + 1] = page[j + 1], page[j]
    if page == golden:  # two swaps of the same pair cancel out; force one real swap
        page[0], page[1] = page[1], page[0]
    return page


def redundancy_negative(golden: list[int], item_cat: np.ndarray) -> list[int] | None:
    """Same items, reordered so same-category items sit together (first-seen order)."""
    keys = [_cat_key(i, item_cat) for i in golden]
    first_seen = {k: n for n, k in reversed(list(enumerate(keys)))}
    order = sorted(range(len(golden)), key=lambda n: (first_seen[keys[n]], n))
    page = [golden[n] for n in order]
    return page if page != golden else None  # already clustered: nothing to contrast


def diversity_negative(
    golden: list[int],
    item_cat: np.ndarray,
    cat_pool: dict[int, np.ndarray],
    forbidden: set[int],
) -> list[int] | None:
    """Items of other categories replaced by items of the page's dominant category.

    Replacements come from `cat_pool[c]` (items of category c, best first) minus the
    user's forbidden items (everything the user ever saw, so no val/test leak).
    """
    cats = [int(item_cat[i]) for i in golden]
    if min(cats, default=-1) < 0 or len(set(cats)) < 2:
        return None
    dominant = Counter(cats).most_common(1)[0][0]
    used = set(golden) | forbidden
    fill = (int(i) for i in cat_pool.get(dominant, ()) if int(i) not in used)
    page = []
    for item, cat in zip(golden, cats):
        if cat == dominant:
            page.append(item)
            continue
        replacement = next(fill, None)
        if replacement is None:
            return None
        page.append(replacement)
    return page


def preference_negative(
    disliked: np.ndarray,
    page_len: int,
    low_pool: np.ndarray,
    forbidden: set[int],
    rng: np.random.Generator,
) -> tuple[list[int], int]:
    """A page of items the user rated low, filled with low-rated unseen items.

    Returns the page and how many slots came from the fill pool (reported in stats).
    `low_pool` is ordered worst first; the fill samples from its worst part so pages
    differ between users.
    """
    page = list(dict.fromkeys(int(i) for i in disliked))[:page_len]
    need = page_len - len(page)
    if need <= 0:
        return page, 0
    used = set(page) | forbidden
    window = [int(i) for i in low_pool[: max(4 * page_len, need * 4)] if int(i) not in used]
    if len(window) < need:
        window += [int(i) for i in low_pool[len(window) :] if int(i) not in used and int(i) not in window][
            : need - len(window)
        ]
    picks = rng.choice(len(window), size=min(need, len(window)), replace=False) if window else []
    filled = [window[int(j)] for j in sorted(picks)]
    return page + filled, len(filled)


def rating_pair(
    candidates: np.ndarray,
    ratings: np.ndarray,
    item_score: np.ndarray,
    page_len: int,
    min_gap: float,
) -> tuple[list[int], list[int]] | None:
    """(higher-rated page, lower-rated page) from one window of the user's own positives.

    The other families corrupt the golden page, so a reward trained on them learns "looks
    like the golden page". Here both pages hold items the user liked and went on to take;
    only how much they liked them differs, which is what the page's value depends on once
    a policy writes plausible pages. The positives are ranked by rating (then item mean
    rating); the top n form the higher page and the bottom n the lower, n = min(page_len,
    half the window), each in that ranked order so order is not the difference. None when
    ratings are missing (implicit feedback), n < 2, or the two pages' mean ratings differ
    by less than `min_gap`.
    """
    _, first = np.unique(candidates, return_index=True)
    keep = np.sort(first)
    items, rated = candidates[keep].astype(np.int64), ratings[keep].astype(np.float64)
    n = min(page_len, len(items) // 2)
    if n < 2 or np.isnan(rated).any():
        return None
    order = np.lexsort((items, -item_score[items], -rated))
    high, low = order[:n], order[len(order) - n :]
    if rated[high].mean() - rated[low].mean() < min_gap:
        return None
    return [int(i) for i in items[high]], [int(i) for i in items[low]]
