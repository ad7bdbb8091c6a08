"""bench/page_frontier.py's page rewrite: the discount moves a repeated category down the page,
only the page is rewritten, and no item is lost or repeated."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from page_frontier import ranking_lists, reranked  # noqa: E402


def test_no_discount_keeps_a_list_already_in_value_order():
    value = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    lists = [[0, 1, 2, 3, 4, 5]]
    assert reranked(value, lists, top=6, cat=np.array([0, 0, 0, 1, 1, 2]), c=0.0, page_len=3) == lists


def test_discount_lifts_another_category_into_the_page_and_keeps_the_rest_in_order():
    # Items 0-2 share category 0 and are worth a little more than item 3 (category 1): with a
    # 0.5 discount the second category-0 item is worth e^4.9 * 0.5 < e^4.5, so item 3 comes second.
    value = np.array([[5.0, 4.9, 4.8, 4.5, 0.0, -1.0]])
    cat = np.array([0, 0, 0, 1, 2, 2])
    out = reranked(value, [[0, 1, 2, 3, 4, 5]], top=6, cat=cat, c=0.5, page_len=3)[0]
    assert out[:3] == [0, 3, 1]
    assert out[3:] == [2, 4, 5]  # the rest of the list, in its own order
    assert sorted(out) == list(range(6))


def test_page_is_drawn_only_from_the_first_top_items():
    value = np.array([[1.0, 0.9, 0.8, 9.0]])  # item 3 is worth most but sits outside the top 2
    out = reranked(value, [[0, 1, 2, 3]], top=2, cat=np.array([0, 1, 2, 3]), c=0.0, page_len=2)[0]
    assert out == [0, 1, 2, 3]


def test_ranking_lists_skip_excluded_items():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert ranking_lists(scores, [{1}], width=3) == [[3, 2, 0]]
