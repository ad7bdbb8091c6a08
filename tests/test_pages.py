"""Golden pages and the four negative families, on hand-made items."""

import numpy as np

from pagellm.data.pages import (
    diversity_negative,
    golden_page,
    preference_negative,
    ranking_negative,
    redundancy_negative,
)
from pagellm.data.user_rows import sft_windows

# Items 0..9: categories A=0 for 0-5, B=1 for 6-7, C=2 for 8-9; item 10 uncategorised.
CAT = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, -1])
SCORE = np.linspace(1.0, 0.0, 11)  # item 0 has the best mean rating


def test_golden_orders_by_rating_then_item_mean():
    cands = np.array([3, 1, 6])
    ratings = np.array([5.0, 4.0, 5.0])
    # 3 and 6 tie on rating 5: item 3 has the higher mean (SCORE[3] > SCORE[6]).
    assert golden_page(cands, ratings, SCORE, CAT, page_len=3, category_cap=1.0) == [3, 6, 1]


def test_golden_caps_categories_and_fills_only_when_forced():
    cands = np.arange(10)
    ratings = np.full(10, 5.0)
    page = golden_page(cands, ratings, SCORE, CAT, page_len=5, category_cap=0.4)
    # cap = floor(0.4 * 5) = 2 per category: two A's, then B's and C's before more A's.
    assert page == [0, 1, 6, 7, 8]
    # Only A items available: the cap cannot hold, the page is filled anyway.
    only_a = golden_page(np.arange(6), np.full(6, 5.0), SCORE, CAT, 5, 0.4)
    assert only_a == [0, 1, 2, 3, 4]


def test_golden_empty_and_short():
    assert golden_page(np.array([], dtype=int), np.array([]), SCORE, CAT, 5, 0.4) == []
    assert golden_page(np.array([7]), np.array([4.0]), SCORE, CAT, 5, 0.4) == [7]


def test_ranking_negative_same_set_other_order():
    rng = np.random.default_rng(0)
    golden = [0, 6, 8, 1, 7]
    for _ in range(20):
        neg = ranking_negative(golden, swaps=2, rng=rng)
        assert sorted(neg) == sorted(golden) and neg != golden
    assert ranking_negative([4], 2, rng) is None


def test_redundancy_negative_clusters_categories():
    golden = [0, 6, 1, 8, 7]  # A B A C B
    assert redundancy_negative(golden, CAT) == [0, 1, 6, 7, 8]
    assert redundancy_negative([0, 1, 6, 7], CAT) is None  # already clustered


def test_diversity_negative_uses_dominant_category_and_respects_forbidden():
    golden = [0, 6, 1, 8]  # A dominates
    pool = {0: np.array([0, 1, 2, 3, 4, 5]), 1: np.array([6, 7]), 2: np.array([8, 9])}
    neg = diversity_negative(golden, CAT, pool, forbidden={2})
    assert neg == [0, 3, 1, 4]  # 2 is forbidden (the user saw it)
    assert all(CAT[i] == 0 for i in neg)
    assert diversity_negative([0, 1], CAT, pool, set()) is None  # single category
    assert diversity_negative([0, 10], CAT, pool, set()) is None  # uncategorised item


def test_preference_negative_prefers_disliked_then_fills_from_low_pool():
    rng = np.random.default_rng(0)
    page, filled = preference_negative(np.array([5, 5, 9]), 4, np.arange(10)[::-1], forbidden={9, 8, 5}, rng=rng)
    assert page[:2] == [5, 9] and filled == 2 and len(set(page)) == 4
    assert not {8} & set(page[2:])


def test_sft_windows_cut_points():
    # end=40: span min(20, 20); end=30: span min(20, 15); end=20: span min(20, 10).
    assert sft_windows(40, 10, 3) == [(20, 40), (15, 30), (10, 20)]
    assert sft_windows(3, 10, 2) == []  # too short for a page of at least 2 items


def test_rating_pair_splits_a_window_of_positives_by_rating():
    from pagellm.data.pages import rating_pair

    items = np.array([5, 6, 7, 8, 9, 6])  # 6 again later: first occurrence kept
    ratings = np.array([4.0, 5.0, 4.0, 3.5, 5.0, 1.0])
    score = np.zeros(10)
    score[7] = 1.0  # breaks the 4.0 tie between 5 and 7
    high, low = rating_pair(items, ratings, score, page_len=10, min_gap=1.0)
    # n = min(10, 5 // 2) = 2: ranked 6 (5.0), 9 (5.0), 7 (4.0, better item), 5, 8
    assert high == [6, 9] and low == [5, 8]
    assert rating_pair(items, ratings, score, page_len=10, min_gap=1.5) is None  # gap 5.0 - 3.75 = 1.25
    assert rating_pair(items, np.full(6, np.nan), score, page_len=10, min_gap=0.5) is None  # implicit
    assert rating_pair(items[:3], ratings[:3], score, page_len=10, min_gap=0.5) is None  # n = 1
