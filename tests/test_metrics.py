"""Metrics against hand-computed values (arithmetic in the comments).

w_i = 1 / log2(i + 1): w1 = 1, w2 = 0.630930, w3 = 0.5, w4 = 0.430677, w5 = 0.386853.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse

from pagellm.eval import metrics as M

W = [None, 1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5), 1 / math.log2(6)]


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- accuracy


def test_recall():
    ranked, t = [1, 2, 3, 4, 5], {2, 5, 9}
    assert M.recall_at_k(ranked, t, 2) == approx(1 / 2)  # hits {2}; min(2, 3) = 2
    assert M.recall_at_k(ranked, t, 3) == approx(1 / 3)  # hits {2}; min(3, 3) = 3
    assert M.recall_at_k(ranked, t, 5) == approx(2 / 3)  # hits {2, 5}
    assert M.recall_at_k(ranked, t, 10) == approx(2 / 3)  # k past the list: still 2 / min(10, 3)
    assert M.recall_at_k([2, 2, 2], {2, 5}, 3) == approx(1 / 2)  # a repeated hit counts once


def test_ndcg():
    ranked, t = [1, 2, 3, 4, 5], {2, 5, 9}
    # k=5: DCG = w2 + w5 = 1.017783; IDCG = w1 + w2 + w3 = 2.130930 -> 0.477624
    assert M.ndcg_at_k(ranked, t, 5) == approx((W[2] + W[5]) / (W[1] + W[2] + W[3]))
    assert M.ndcg_at_k(ranked, t, 5) == pytest.approx(0.477624, abs=1e-6)
    # k=2: DCG = w2; IDCG over min(2, 3) = 2 slots = w1 + w2 -> 0.386853
    assert M.ndcg_at_k(ranked, t, 2) == approx(W[2] / (W[1] + W[2]))
    # repeats: only the first 2 counts -> w1 / (w1 + w2) = 0.613147
    assert M.ndcg_at_k([2, 2, 2], {2, 5}, 3) == approx(1 / (W[1] + W[2]))
    assert M.ndcg_at_k([9, 5, 2], {2, 5, 9}, 3) == approx(1.0)  # perfect


def test_hr_and_mrr():
    assert M.hr_at_k([1, 2, 3], {3}, 2) == 0.0
    assert M.hr_at_k([1, 2, 3], {3}, 3) == 1.0
    assert M.mrr_at_k([1, 2, 3], {3, 2}, 3) == approx(1 / 2)  # first hit at rank 2
    assert M.mrr_at_k([1, 2, 3], {3}, 2) == 0.0
    assert M.mrr_at_k([1, 2, 3], {3}, 50) == approx(1 / 3)  # k past the list


def test_accuracy_undefined_on_empty_test_set():
    for fn in (M.recall_at_k, M.ndcg_at_k, M.hr_at_k, M.mrr_at_k):
        assert fn([1, 2], set(), 10) is None
    with pytest.raises(ValueError, match="cutoff"):
        M.recall_at_k([1], {1}, 0)


# ------------------------------------------------------------------ ranking consistency


def test_dpa():
    # p = a b c d, g = a c b d: same item at positions 1 and 4 -> (w1 + w4) / (w1+w2+w3+w4)
    assert M.dpa_at_k("abcd", "acbd", 4) == approx((W[1] + W[4]) / sum(W[1:5]))
    assert M.dpa_at_k("abcd", "acbd", 4) == pytest.approx(0.558508, abs=1e-6)
    # M = 2 < K = 3: Z = w1 + w2; only position 1 matches
    assert M.dpa_at_k("abc", "ax", 3) == approx(1 / (W[1] + W[2]))
    assert M.dpa_at_k("abc", "", 3) is None


def test_was():
    # p = a b c, g = b a z, K = 3: C = {a: rP 1, rG 2; b: rP 2, rG 1}
    # num = w1 (1 - 1/3) + w2 (1 - 1/3) = 1.087287; Z = w1 + w2 + w3 = 2.130930
    expected = (W[1] + W[2]) * (2 / 3) / (W[1] + W[2] + W[3])
    assert M.was_at_k("abc", "baz", 3) == approx(expected)
    assert M.was_at_k("abc", "baz", 3) == pytest.approx(0.510241, abs=1e-6)
    # a sits at r_G = 5 but r_P = 1 with K = 2: 1 - 4/2 < 0, clipped to 0
    assert M.was_at_k("ab", "xyzqa", 2) == 0.0
    assert M.was_at_k("abc", "abc", 3) == approx(1.0)
    assert M.was_at_k("abc", "", 3) is None


def test_wmrd():
    # p = a b c, g = b a z, K = 3: num = w1*1 + w2*1; den = (3-1)(w1 + w2) -> 0.5
    assert M.wmrd_at_k("abc", "baz", 3) == approx(0.5)
    # p = a b c d, g = c x a, K = 4: C = {a: 1 vs 3, c: 3 vs 1}
    # num = w1*2 + w3*2 = 3; den = 3 (w1 + w3) = 4.5 -> 2/3
    assert M.wmrd_at_k("abcd", "cxa", 4) == approx(2 / 3)
    assert M.wmrd_at_k("abc", "abc", 3) == 0.0
    assert M.wmrd_at_k("abc", "xyz", 3) is None  # |C| = 0
    with pytest.raises(ValueError):
        M.wmrd_at_k("ab", "ab", 1)  # K - 1 = 0


def test_pwkt_hand_computed():
    # C = {a, b, c}; page order a b c, test order b a c.
    # Ranked by page order: weights a=1, b=1/2, c=1/3 (1/(r+1), r 0-based within C).
    #   (a,b) discordant, weight 1 + 1/2 = 3/2; (a,c) concordant 4/3; (b,c) concordant 5/6.
    #   tau = (4/3 + 5/6 - 3/2) / (3/2 + 4/3 + 5/6) = (4/6) / (22/6) = 2/11.
    # Ranked by test order: b=1, a=1/2, c=1/3 -> (a,b) disc. 3/2, (a,c) 5/6, (b,c) 4/3 -> 2/11.
    # Average of the two: 2/11 = 0.181818.
    assert M.pwkt_at_k("abc", "bac", 3) == pytest.approx(2 / 11, abs=1e-12)


def test_pwkt_identical_reversed_and_undefined():
    assert M.pwkt_at_k("abcde", "abcde", 5) == pytest.approx(1.0)
    assert M.pwkt_at_k("abcde", "edcba", 5) == pytest.approx(-1.0)
    # Only C = {a, b, c} matters; their test order is reversed -> -1.
    assert M.pwkt_at_k("abcx", "cqba", 4) == pytest.approx(-1.0)
    # A swap at the top costs more than the same swap at the bottom.
    assert M.pwkt_at_k("abcde", "bacde", 5) < M.pwkt_at_k("abcde", "abced", 5) < 1.0
    assert M.pwkt_at_k("abc", "axy", 3) is None  # |C| = 1
    assert M.pwkt_at_k("abc", "", 3) is None


# ------------------------------------------------------------------------- diversity

CATS = {"a": {"x"}, "b": {"x", "y"}, "c": {"z"}, "d": {"x"}}


def test_ild():
    # (a,b): J = 1/2 -> 0.5; (a,c): 1; (b,c): 1 -> mean 2.5 / 3 = 0.833333
    assert M.ild_at_k("abc", CATS, 3) == approx(2.5 / 3)
    assert M.ild_at_k("abc", CATS, 10) == approx(2.5 / 3)  # k past the page
    assert M.ild_at_k("abc", CATS, 2) == approx(0.5)  # only (a,b)
    assert M.ild_at_k("ad", CATS, 2) == 0.0  # same category
    assert M.ild_at_k("a", CATS, 10) is None  # no pair


def test_entropy():
    # mass x = 1 + 1/2, y = 1/2, z = 1 -> q = 1/2, 1/6, 1/3
    # H = -(1/2 ln 1/2 + 1/6 ln 1/6 + 1/3 ln 1/3) = 0.346574 + 0.298627 + 0.366204 = 1.011404
    q = [1 / 2, 1 / 6, 1 / 3]
    assert M.entropy_at_k("abc", CATS, 3) == approx(-sum(v * math.log(v) for v in q))
    assert M.entropy_at_k("abc", CATS, 3) == pytest.approx(1.011404, abs=1e-6)
    assert M.entropy_at_k("ad", CATS, 2) == 0.0
    assert M.entropy_at_k("qr", CATS, 2) is None  # no item has a category


# ------------------------------------------------------------------------ corpus level


def test_corpus_metrics():
    assert M.coverage([[0, 1], [1, 2]], 10) == approx(3 / 10)
    assert M.tail_share([[0, 1], [1, 2]], {2}) == approx(1 / 4)
    assert M.invalid_rate([[0, 1], [1, 7]], {0, 1, 2}) == approx(1 / 4)
    # [0,0,1]: one repeat; [2,2,2]: two repeats -> 3 of 6 slots
    assert M.duplicate_rate([[0, 0, 1], [2, 2, 2]]) == approx(0.5)
    assert M.duplicate_rate([]) == 0.0
    # 10 items; 10% least popular = 1 item: index 1 (count 0)
    assert M.tail_items_from_counts(np.array([5, 0, 3, 1, 9, 9, 9, 9, 9, 9])) == {1}
    assert M.tail_items_from_counts({"p": 3, "q": 1, "r": 2}, share=0.5) == {"q", "r"}


def test_evaluate_lists_keys_and_values():
    lists = [list("abcdefghij"), list("zyxabcdefg")]
    tests = [list("ba"), []]  # the second user has no test items
    out = M.evaluate_lists(lists, tests, CATS, n_items=26, known_items=set("abcdefghijxy"),
                           tail_items={"a"})
    for key in ["recall@20", "recall@40", "ndcg@100", "hr@10", "ndcg@10", "mrr@10", "was@10",
                "pwkt@10", "wmrd@10", "dpa@10", "ild@10", "entropy@10", "coverage@10",
                "tail_share@10", "invalid_rate", "duplicate_rate", "users", "pwkt@10_users"]:
        assert key in out, key
    assert out["users"] == 2
    assert out["recall@20_users"] == 1 and out["recall@20"] == approx(1.0)
    assert out["pwkt@10"] == pytest.approx(-1.0) and out["pwkt@10_users"] == 1
    assert out["ild@10_users"] == 2  # diversity needs no test items
    assert out["invalid_rate"] == approx(1 / 20)  # "z" on the second page
    assert out["coverage@10"] == approx(12 / 26)  # a..j, y, x known; z is not counted
    assert out["tail_share@10"] == approx(2 / 20)
    assert out["duplicate_rate"] == 0.0
    full = M.evaluate_lists(lists, tests, CATS, 26, set("abc"), prefix="full/")
    assert "full/recall@20" in full and full["full/tail_share@10"] is None
    with pytest.raises(ValueError, match="test sequences"):
        M.evaluate_lists(lists, tests[:1], CATS, 26, set())


# ------------------------------------------------------------------------ full ranking


def test_full_ranking_hand_computed():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    mask = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=bool)
    # user 0: item 0 masked -> ranking 1 2 3 4 (0 last); test {2}: rank 2
    # user 1: item 4 masked, but 4 is a test item so it stays: ranking 4 3 2 1 0; test {4, 0}
    test = [[2], [4, 0]]
    out = M.evaluate_full_ranking(scores, mask, test, recall_ks=(1, 2), ndcg_ks=(2,), hr_ks=(1,), prefix="")
    # recall@1: u0 0/1, u1 1/min(1,2)=1 -> 0.5; recall@2: u0 1/1, u1 1/2 -> 0.75
    assert out["recall@1"] == approx(0.5) and out["recall@2"] == approx(0.75)
    # ndcg@2: u0 w2 / w1 = 0.630930; u1 w1 / (w1 + w2) = 0.613147 -> mean 0.622038
    assert out["ndcg@2"] == approx((W[2] + 1 / (W[1] + W[2])) / 2)
    assert out["hr@1"] == approx(0.5) and out["users"] == 2


def test_full_ranking_matches_per_user_functions_and_chunks():
    rng = np.random.default_rng(0)
    u, n = 37, 60
    scores = rng.normal(size=(u, n)).astype(np.float32)
    train = [rng.choice(n, size=rng.integers(0, 10), replace=False).tolist() for _ in range(u)]
    test = [rng.choice(n, size=rng.integers(0, 5), replace=False).tolist() for _ in range(u)]
    mask = sparse.lil_matrix((u, n), dtype=bool)
    for r, items in enumerate(train):
        mask[r, items] = True
    out = M.evaluate_full_ranking(scores, mask, test, recall_ks=(20, 40), ndcg_ks=(100,), hr_ks=(10,))
    ranked = []
    for r in range(u):
        s = scores[r].astype(np.float64)
        s[[x for x in train[r] if x not in test[r]]] = -np.inf
        ranked.append(np.argsort(-s, kind="stable").tolist())
    ref = M.evaluate_lists(ranked, test, {}, n, set(range(n)))
    for key in ["recall@20", "recall@40", "ndcg@100"]:
        assert out["full/" + key] == pytest.approx(ref[key], abs=1e-9), key
    assert out["full/hr@10"] == pytest.approx(ref["hr@10"], abs=1e-9)
    assert out["full/users"] == ref["recall@20_users"] == sum(1 for t in test if t)
    streamed = M.evaluate_full_ranking(lambda a, b: scores[a:b], mask, test, n_items=n, chunk_size=5)
    assert streamed == pytest.approx(M.evaluate_full_ranking(scores, mask, test))


def test_full_ranking_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        M.evaluate_full_ranking(np.zeros((2, 3)), None, [[0]])
    with pytest.raises(ValueError, match="NaN"):
        M.evaluate_full_ranking(np.full((1, 3), np.nan), None, [[0]])
    with pytest.raises(ValueError, match="outside"):
        M.evaluate_full_ranking(np.zeros((1, 3)), None, [[5]])


def test_history_mask():
    m = M.history_mask([[0, 2], [], [1, 1]], n_items=3)
    assert m.shape == (3, 3) and m.toarray().tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="outside"):
        M.history_mask([[3]], n_items=3)


# ------------------------------------------------------------- evaluator-ranked hit rate


def test_hr_at_pct_by_hand():
    generated = np.array([0.5, 0.9, 0.3])
    random = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.6, 0.05, 0.15, 0.25, 0.35, 0.45],  # 1 of 10 above (0.6): 10 %
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.0],      # none above
        [0.3, 0.3, 0.3, 0.4, 0.5, 0.1, 0.2, 0.0, 0.1, 0.2],       # 2 above (0.4, 0.5): 20 %; ties don't count
    ])
    # hr@1%: at most 0.1 pages above -> only user 1; hr@10%: at most 1 above -> users 0 and 1.
    assert M.hr_at_pct(generated, random, (1, 10)) == {"hr@1%": approx(1 / 3), "hr@10%": approx(2 / 3)}


def test_hr_at_pct_ties_count_for_the_generated_page():
    assert M.hr_at_pct(np.array([0.3]), np.full((1, 10), 0.3), (1,)) == {"hr@1%": 1.0}


def test_hr_at_pct_k_percent_of_n_is_exact():
    random = np.zeros((2, 100))
    random[0, :1] = 1.0  # 1 of 100 above: within 1 %
    random[1, :2] = 1.0  # 2 of 100 above: not
    assert M.hr_at_pct(np.array([0.5, 0.5]), random, (1,)) == {"hr@1%": 0.5}
    with pytest.raises(ValueError):
        M.hr_at_pct(np.array([0.5]), random, (1,))  # one value for two users
    with pytest.raises(ValueError):
        M.hr_at_pct(np.array([0.5, 0.5]), random, (101,))


def test_random_pages_are_distinct_unseen_known_items_and_seeded():
    exclude = {0, 3, 7, 8}
    pages = M.random_pages(np.random.default_rng(0), 50, exclude, 2000, 5)
    assert pages.shape == (2000, 5)
    assert all(len(set(p)) == 5 for p in pages.tolist())
    assert pages.min() >= 0 and pages.max() < 50 and not exclude & set(pages.ravel().tolist())
    assert np.array_equal(pages, M.random_pages(np.random.default_rng(0), 50, exclude, 2000, 5))
    # Uniform over the 46 candidates: each is expected 2000 * 5 / 46 = 217 times.
    counts = np.bincount(pages.ravel(), minlength=50)[sorted(set(range(50)) - exclude)]
    assert counts.min() > 150 and counts.max() < 290


def test_random_pages_of_a_small_pool_permute_it_and_pad():
    pages = M.random_pages(np.random.default_rng(1), 6, {0, 1, 2}, 50, 5)
    assert pages.shape == (50, 5) and (pages[:, 3:] == -1).all()
    assert all(sorted(p[:3]) == [3, 4, 5] for p in pages.tolist())
    assert len({tuple(p) for p in pages.tolist()}) > 1  # the order is random


def test_expected_relevance_by_hand():
    logits = np.log(np.array([[1.0, 2.0, 5.0]]))  # softmax = 1/8, 2/8, 5/8
    pages = np.array([[[2, 1], [0, -1]]])
    # page 0: 5/8 * w1 + 2/8 * w2; page 1: 1/8 * w1, the empty slot earns 0
    assert M.expected_relevance(logits, pages).tolist() == [[approx(5 / 8 + 2 / 8 * W[2]), approx(1 / 8)]]
