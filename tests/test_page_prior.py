"""The page prior's value by hand, and its Bradley-Terry fit (pagellm/models/page_prior.py)."""

import math

import numpy as np
import pytest
import torch

from pagellm.models.page_prior import (PagePrior, fit_page_prior, page_tensors, quality_from_next_items,
                                         satiation_from_logs, standardise, step_gains)


def test_page_tensors_count_earlier_items_of_the_same_category():
    cat = np.array([0, 0, 1, -1, 0])
    items, mask, repeats = page_tensors([[0, 1, 2, 4], [3, 3]], cat)
    assert items.tolist() == [[0, 1, 2, 4], [3, 3, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert repeats.tolist() == [[0, 1, 0, 2], [0, 0, 0, 0]]  # an uncategorised item repeats nothing


def test_score_by_hand():
    cat = np.array([0, 0, 1])
    quality = [1.0, -1.0, 0.0]
    prior = PagePrior(pref_weight=0.5, quality_weight=2.0, satiation=0.25, quality=quality)
    pref = np.log(np.array([[0.5, 0.25, 0.25]]))
    z = standardise(pref)[0]  # [+sqrt(2), -1/sqrt(2), -1/sqrt(2)]
    # Page [1, 0, 2]: exam 1, 1/log2(3), 1/2; item 0 follows item 1 of its category: x 0.75.
    want = (math.exp(0.5 * z[1] - 2.0) + 0.75 * math.exp(0.5 * z[0] + 2.0) / math.log2(3)
            + 0.5 * math.exp(0.5 * z[2]))
    got = prior.score(pref, [[1, 0, 2]], cat)
    assert got[0] == pytest.approx(math.log(want), rel=1e-6)


def test_step_gains_by_hand_and_they_sum_to_the_page_value():
    cat = np.array([0, 0, 1, -1])
    prior = PagePrior(pref_weight=0.5, quality_weight=2.0, satiation=0.25, quality=[1.0, -1.0, 0.0, 0.5])
    z = np.array([[1.0, -1.0, 0.0, 2.0]])
    # Empty prefix: a z + b q (exam(1) = 1, the empty page counts as 0).
    assert step_gains(prior, z, [[]], cat)[0].tolist() == pytest.approx([2.5, -2.5, 0.0, 2.0])
    # After item 0: S = e^2.5; item 1 (same category, position 2) adds 0.75 e^-2.5 / log2(3);
    # item 2 (another category) e^0 / log2(3); item 3 (uncategorised) e^2 / log2(3); item 0
    # itself (the caller blocks it) would repeat its own category.
    s = math.exp(2.5)
    want = [math.log(1 + t / s) for t in (0.75 * math.exp(2.5) / math.log2(3), 0.75 * math.exp(-2.5) / math.log2(3),
                                          1.0 / math.log2(3), math.exp(2.0) / math.log2(3))]
    assert step_gains(prior, z, [[0]], cat)[0].tolist() == pytest.approx(want, rel=1e-9)
    # Along any page, the gains of its items add up to R_p(page).
    page, total = [3, 0, 1, 2], 0.0
    for t, item in enumerate(page):
        total += step_gains(prior, z, [page[:t]], cat)[0, item]
    assert total == pytest.approx(float(prior.value(z[:, page], [page], cat)[0]), rel=1e-9)


def test_fit_recovers_the_parameters_that_made_the_preferences():
    """Pairs whose chosen page is the better one under known (a, b, c), made noisy by a
    logistic draw: the fit finds parameters that order held-out pairs like the truth does."""
    rng = np.random.default_rng(0)
    n_items, k, pairs = 30, 4, 4000
    cat = rng.integers(0, 5, n_items)
    quality = standardise(rng.normal(size=n_items))
    truth = PagePrior(1.0, 2.0, 0.6, quality.tolist())
    pref = rng.normal(size=(pairs, n_items))
    pages = [rng.choice(n_items, size=(2, k), replace=False) for _ in range(pairs)]
    first, second = [p[0].tolist() for p in pages], [p[1].tolist() for p in pages]
    margin = truth.score(pref, first, cat) - truth.score(pref, second, cat)
    first_wins = rng.random(pairs) < 1 / (1 + np.exp(-margin))  # the Bradley-Terry model itself
    chosen = [a if w else b for a, b, w in zip(first, second, first_wins)]
    rejected = [b if w else a for a, b, w in zip(first, second, first_wins)]
    z = standardise(pref)
    gather = lambda pages_: np.array([z[i, p] for i, p in enumerate(pages_)])  # noqa: E731
    a, b, c = fit_page_prior(gather(chosen), chosen, gather(rejected), rejected, quality, cat, fit_pref=True)
    assert a > 0 and b > 0 and 0 < c < 1
    assert a == pytest.approx(1.0, abs=0.3) and b == pytest.approx(2.0, abs=0.5)
    assert c == pytest.approx(0.6, abs=0.15)
    fitted = PagePrior(a, b, c, quality.tolist())
    agree = np.sign(fitted.score(pref, first, cat) - fitted.score(pref, second, cat)) == np.sign(margin)
    assert agree.mean() > 0.9
    assert torch.is_grad_enabled()  # the fit leaves autograd as it found it


def test_the_default_fit_keeps_the_preference_weight_at_one():
    rng = np.random.default_rng(1)
    cat, quality = rng.integers(0, 3, 12), standardise(rng.normal(size=12))
    pages = [rng.choice(12, size=(2, 3), replace=False) for _ in range(200)]
    chosen, rejected = [p[0].tolist() for p in pages], [p[1].tolist() for p in pages]
    z = rng.normal(size=(200, 3)) * 5  # a feature that separates nothing, at any scale
    a, b, c = fit_page_prior(z, chosen, z, rejected, quality, cat)
    assert a == 1.0 and np.isfinite(b) and 0 < c < 1


def _markov_logs(odds: float, seed: int, users: int = 300, length: int = 60, cats: int = 6) -> list[np.ndarray]:
    """Users with their own category tastes whose next item repeats the previous one's
    category `odds` times as often as the taste alone would make it."""
    rng = np.random.default_rng(seed)
    logs = []
    for _ in range(users):
        taste = rng.dirichlet(np.full(cats, 0.5))
        seq = [rng.choice(cats, p=taste)]
        for _ in range(length - 1):
            w = taste.copy()
            w[seq[-1]] *= odds
            seq.append(rng.choice(cats, p=w / w.sum()))
        logs.append(np.array(seq))
    return logs


def test_satiation_from_logs_reads_how_rarely_a_category_repeats():
    # A user who simply likes one category is no evidence: without an effect the odds are 1.
    null = satiation_from_logs(_markov_logs(1.0, seed=0))
    assert null["odds"] == pytest.approx(1.0, abs=0.08) and null["satiation"] < 0.08
    strong, weak = satiation_from_logs(_markov_logs(0.1, seed=1)), satiation_from_logs(_markov_logs(0.5, seed=2))
    assert 0.75 < strong["satiation"] < 0.95 and 0.3 < weak["satiation"] < 0.6
    # Logs that cluster (binge a category) give no discount at all, not a negative one.
    binge = satiation_from_logs(_markov_logs(2.0, seed=3))
    assert binge["satiation"] == 0.0 and binge["odds"] > 1.5
    # Logs that never repeat a category in a row read as a full discount.
    alternating = [np.array([0, 1] * 10), np.array([2, 0, 1] * 7)]
    assert satiation_from_logs(alternating)["satiation"] > 0.99
    # No categories (or one item per user): nothing to read, no discount.
    assert satiation_from_logs([np.array([], dtype=np.int64), np.array([3])]) == {"satiation": 0.0, "odds": 1.0, "steps": 0}


def test_a_held_satiation_is_kept_and_the_quality_weight_still_fits():
    rng = np.random.default_rng(4)
    cat, quality = rng.integers(0, 3, 12), standardise(rng.normal(size=12))
    pages = [rng.choice(12, size=(2, 3), replace=False) for _ in range(300)]
    better = [p[int(np.argmax([quality[p[0]].sum(), quality[p[1]].sum()]))].tolist() for p in pages]
    worse = [p[int(np.argmin([quality[p[0]].sum(), quality[p[1]].sum()]))].tolist() for p in pages]
    z = np.zeros((300, 3))
    for held in (0.0, 0.3):
        a, b, c = fit_page_prior(z, better, z, worse, quality, cat, satiation=held)
        assert a == 1.0 and c == held and b > 1.0  # pairs that favour quality: b grows


def test_the_quality_weight_is_recovered_from_next_items_drawn_with_it():
    rng = np.random.default_rng(7)
    rows, n = 4000, 40
    z, quality = rng.normal(size=(rows, n)), standardise(rng.normal(size=n))
    allowed = rng.random((rows, n)) > 0.2  # each user's other items are no candidates
    for true_b in (0.0, 0.7, -0.5):
        logits = np.where(allowed, z + true_b * quality, -np.inf)
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        targets = np.array([rng.choice(n, p=row) for row in prob])
        assert quality_from_next_items(z, quality, targets, allowed) == pytest.approx(true_b, abs=0.08)
    allowed[0, targets[0]] = False
    with pytest.raises(ValueError, match="not among its allowed"):
        quality_from_next_items(z, quality, targets, allowed)


def test_a_held_quality_weight_is_kept_and_the_discount_still_fits():
    rng = np.random.default_rng(5)
    cat, quality = np.repeat(np.arange(4), 3), standardise(rng.normal(size=12))
    diverse = [[0, 3, 6], [1, 4, 9], [2, 5, 10]] * 50  # three categories per page
    clustered = [[0, 1, 2], [3, 4, 5], [6, 7, 8]] * 50  # one
    z = np.zeros((150, 3))
    a, b, c = fit_page_prior(z, diverse, z, clustered, quality, cat, quality_weight=0.4)
    assert a == 1.0 and b == 0.4 and c > 0.5  # the pairs favour diversity: c grows, b is held
    assert fit_page_prior(z, diverse, z, clustered, quality, cat, quality_weight=0.4, satiation=0.2) == (1.0, 0.4, 0.2)
