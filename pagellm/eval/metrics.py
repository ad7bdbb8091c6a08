"""Evaluation metrics, exactly as docs/ARCHITECTURE.md §7 defines them, as plain functions.

Per-user functions return a float, or None where the metric is undefined for that user
(empty test set, too few common items, ...); aggregators average over the users where a
metric is defined and report that count next to it as `<key>_users`.

Conventions shared by every function here:
- `k` is the nominal cutoff K of the formula. A list shorter than k is scored as is: its
  missing slots simply earn nothing, and K-based normalisers keep using k.
- An item repeated inside a list earns credit only at its first position (a repeat is
  not a new hit); `duplicate_rate` reports repeats separately. Likewise an item repeated
  in the ordered test sequence G takes the position of its first occurrence.
- w_i = 1 / log2(i + 1), positions 1-based.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from scipy import sparse
from scipy.stats import weightedtau

Item = Hashable


def _w(n: int) -> np.ndarray:
    """Position discounts w_1..w_n."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def _first_positions(seq: Iterable[Item], k: int | None = None) -> dict[Item, int]:
    """item -> 1-based position of its first occurrence within the first k entries."""
    pos: dict[Item, int] = {}
    for i, x in enumerate(seq, start=1):
        if k is not None and i > k:
            break
        pos.setdefault(x, i)
    return pos


def _check_k(k: int, minimum: int = 1) -> None:
    if int(k) != k or k < minimum:
        raise ValueError(f"cutoff k must be an integer >= {minimum}, got {k!r}")


# ----------------------------------------------------------------------------- accuracy


def recall_at_k(ranked: Sequence[Item], test_set: Collection[Item], k: int) -> float | None:
    """|P[:K] ∩ T| / min(K, |T|); None when T is empty."""
    _check_k(k)
    t = set(test_set)
    if not t:
        return None
    hits = sum(1 for x in _first_positions(ranked, k) if x in t)
    return hits / min(k, len(t))


def ndcg_at_k(ranked: Sequence[Item], test_set: Collection[Item], k: int) -> float | None:
    """Σ_{i≤K} 1[p_i ∈ T] w_i / Σ_{i≤min(K,|T|)} w_i; None when T is empty."""
    _check_k(k)
    t = set(test_set)
    if not t:
        return None
    w = _w(k)
    dcg = sum(w[i - 1] for x, i in _first_positions(ranked, k).items() if x in t)
    return float(dcg / w[: min(k, len(t))].sum())


def hr_at_k(ranked: Sequence[Item], test_set: Collection[Item], k: int) -> float | None:
    """1 if any of the first K items is a test item; None when T is empty."""
    _check_k(k)
    t = set(test_set)
    if not t:
        return None
    return float(any(x in t for x in ranked[:k]))


def mrr_at_k(ranked: Sequence[Item], test_set: Collection[Item], k: int) -> float | None:
    """1 / (1-based rank of the first hit within K), 0 if none; None when T is empty."""
    _check_k(k)
    t = set(test_set)
    if not t:
        return None
    for i, x in enumerate(ranked[:k], start=1):
        if x in t:
            return 1.0 / i
    return 0.0


# ------------------------------------------------------------------ ranking consistency


def _common(page: Sequence[Item], ordered_test: Sequence[Item], k: int):
    """C = P[:K] ∩ G as (item, r_P, r_G) triples in page order."""
    rp = _first_positions(page, k)
    rg = _first_positions(ordered_test)
    return [(x, i, rg[x]) for x, i in rp.items() if x in rg]


def _order_norm(ordered_test: Sequence[Item], k: int) -> float | None:
    """Z = Σ_{i≤min(K,M)} w_i, the normaliser of DPA and WAS; None when G is empty."""
    _check_k(k)
    m = len(ordered_test)
    return float(_w(k)[: min(k, m)].sum()) if m else None


def dpa_at_k(page: Sequence[Item], ordered_test: Sequence[Item], k: int) -> float | None:
    """(1/Z) Σ_{i≤K} w_i 1[p_i = g_i], Z = Σ_{i≤min(K,M)} w_i; None when G is empty."""
    z = _order_norm(ordered_test, k)
    if z is None:
        return None
    w = _w(k)
    seen: set[Item] = set()
    num = 0.0
    for i, (p, g) in enumerate(zip(page[:k], ordered_test[:k])):
        if p == g and p not in seen:
            num += w[i]
        seen.add(p)
    return float(num / z)


def was_at_k(page: Sequence[Item], ordered_test: Sequence[Item], k: int) -> float | None:
    """(1/Z) Σ_{x∈C} w_{r_P(x)} max(0, 1 − |r_P(x) − r_G(x)| / K), Z as in DPA; None when G is empty."""
    z = _order_norm(ordered_test, k)
    if z is None:
        return None
    w = _w(k)
    num = sum(w[rp - 1] * max(0.0, 1.0 - abs(rp - rg) / k) for _, rp, rg in _common(page, ordered_test, k))
    return float(num / z)


def wmrd_at_k(page: Sequence[Item], ordered_test: Sequence[Item], k: int) -> float | None:
    """Σ_C w_{r_P} |r_P − r_G| / ((K − 1) Σ_C w_{r_P}); lower is better; None when |C| = 0.

    r_G runs over the whole test sequence, so a page item that the user reached late in
    G (r_G > K) can push the value above 1; that is the formula, not a bug.
    """
    _check_k(k, minimum=2)
    c = _common(page, ordered_test, k)
    if not c:
        return None
    w = _w(k)
    num = sum(w[rp - 1] * abs(rp - rg) for _, rp, rg in c)
    den = (k - 1) * sum(w[rp - 1] for _, rp, _ in c)
    return float(num / den)


def pwkt_at_k(page: Sequence[Item], ordered_test: Sequence[Item], k: int) -> float | None:
    """Vigna's additive hyperbolic weighted tau between the page order and the test order
    of the items of C = P[:K] ∩ G; None when |C| < 2.

    How positions reach scipy.stats.weightedtau: for each x in C we pass
    score_x = −r_P(x) and score_y = −r_G(x) (1-based positions, negated because
    weightedtau treats larger scores as more important, so page position 1 is the most
    important element). With the default rank=True, scipy ranks the items of C by the
    page order (0 = first of C on the page), computes tau with exchange weight
    1/(r+1) + 1/(s+1) — i.e. 1/r + 1/s for 1-based ranks r, s within C — then does the
    same ranking C by the test order, and returns the average of the two. Positions are
    unique inside C, so there are no ties. Identical order gives 1, reversed order −1.
    """
    _check_k(k)
    c = _common(page, ordered_test, k)
    if len(c) < 2:
        return None
    x = np.array([-rp for _, rp, _ in c], dtype=np.float64)
    y = np.array([-rg for _, _, rg in c], dtype=np.float64)
    return float(weightedtau(x, y).statistic)


# ------------------------------------------------------------------------- diversity


def _jaccard(a: set, b: set) -> float:
    # Two category-less items share nothing we know of: similarity 0.
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def ild_at_k(page: Sequence[Item], cats_of: Mapping[Item, Collection[str]], k: int) -> float | None:
    """Mean over item pairs of the first K of 1 − Jaccard(cats(p_i), cats(p_j)); None under 2 items.

    The mean uses the pairs actually present (2 / (n(n−1)) with n = len(page[:k])), which
    equals docs/ARCHITECTURE.md §7's 2 / (K(K−1)) whenever the page is full. Items missing from cats_of
    have no categories.
    """
    _check_k(k)
    items = list(page[:k])
    if len(items) < 2:
        return None
    cats = [set(cats_of.get(x, ())) for x in items]
    dist = [1.0 - _jaccard(a, b) for a, b in combinations(cats, 2)]
    return float(np.mean(dist))


def entropy_at_k(page: Sequence[Item], cats_of: Mapping[Item, Collection[str]], k: int) -> float | None:
    """− Σ_c q_c ln q_c over the first K items (natural log); None if no item has a category.

    An item with n categories adds 1/n to each; items without a category are left out of
    the distribution rather than forming a pseudo-category.
    """
    _check_k(k)
    mass: dict[str, float] = {}
    for x in page[:k]:
        cs = set(cats_of.get(x, ()))
        for c in cs:
            mass[c] = mass.get(c, 0.0) + 1.0 / len(cs)
    if not mass:
        return None
    q = np.fromiter(mass.values(), dtype=np.float64)
    q /= q.sum()
    return float(-(q * np.log(q)).sum())


# ------------------------------------------------------------------------ corpus level


def coverage(pages: Iterable[Sequence[Item]], n_items: int) -> float:
    """|∪_u P_u| / |I|."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    return len({x for p in pages for x in p}) / n_items


def _slot_share(pages: Iterable[Sequence[Item]], pred: Callable[[Item], bool]) -> float:
    slots = hit = 0
    for p in pages:
        for x in p:
            slots += 1
            hit += bool(pred(x))
    return hit / slots if slots else 0.0


def tail_share(pages: Iterable[Sequence[Item]], tail_items: Collection[Item]) -> float:
    """Share of page slots holding a tail item (0.0 when there are no slots)."""
    tail = set(tail_items)
    return _slot_share(pages, lambda x: x in tail)


def invalid_rate(pages: Iterable[Sequence[Item]], known_items: Collection[Item]) -> float:
    """Share of page slots holding an item outside the catalogue (0.0 when there are no slots)."""
    known = known_items if isinstance(known_items, (set, frozenset)) else set(known_items)
    return _slot_share(pages, lambda x: x not in known)


def duplicate_rate(pages: Iterable[Sequence[Item]]) -> float:
    """Share of page slots repeating an earlier item of the same page (0.0 when there are no slots)."""
    slots = dup = 0
    for p in pages:
        seen: set[Item] = set()
        for x in p:
            slots += 1
            dup += x in seen
            seen.add(x)
    return dup / slots if slots else 0.0


def tail_items_from_counts(counts: Mapping[Item, int] | np.ndarray, share: float = 0.1) -> set:
    """The `share` least popular items (at least one). `counts` is item -> training count, or
    an array indexed by dense item id; items with zero count must be present to be eligible.
    Ties at the cut are broken by item order, so the result is deterministic."""
    if isinstance(counts, np.ndarray):
        keys = list(range(len(counts)))
        vals = counts.tolist()
    else:
        keys, vals = list(counts.keys()), list(counts.values())
    if not keys:
        return set()
    n_tail = max(1, int(round(share * len(keys))))
    order = np.argsort(np.asarray(vals, dtype=np.float64), kind="stable")[:n_tail]
    return {keys[i] for i in order}


# ------------------------------------------------------------------------- aggregators


def _mean(values: list[float | None]) -> tuple[float | None, int]:
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)) if vals else None, len(vals))


def evaluate_lists(
    lists: Sequence[Sequence[Item]],
    test_sequences: Sequence[Sequence[Item]],
    cats_of: Mapping[Item, Collection[str]],
    n_items: int,
    known_items: Collection[Item],
    page_len: int = 10,
    prefix: str = "",
    tail_items: Collection[Item] | None = None,
) -> dict[str, Any]:
    """Score generated lists (the page track; docs/ARCHITECTURE.md §7 keys).

    lists[u] is user u's ranked list (the 100-item list; its first `page_len` items are the
    served page); test_sequences[u] the held-out test items in time order. Accuracy uses
    the whole list for recall@20/40 and ndcg@100 and the page for the @page_len metrics;
    consistency and diversity use the page. Each per-user metric comes with
    `<key>_users`, the number of users where it is defined. tail_share@page_len is None
    unless `tail_items` (see tail_items_from_counts) is given.
    """
    if len(lists) != len(test_sequences):
        raise ValueError(f"{len(lists)} lists but {len(test_sequences)} test sequences")
    _check_k(page_len, minimum=2)
    pk = page_len
    known = set(known_items)
    per_user: dict[str, Callable[[Sequence[Item], Sequence[Item]], float | None]] = {
        "recall@20": lambda lst, g: recall_at_k(lst, g, 20),
        "recall@40": lambda lst, g: recall_at_k(lst, g, 40),
        "ndcg@100": lambda lst, g: ndcg_at_k(lst, g, 100),
        f"hr@{pk}": lambda lst, g: hr_at_k(lst, g, pk),
        f"ndcg@{pk}": lambda lst, g: ndcg_at_k(lst, g, pk),
        f"mrr@{pk}": lambda lst, g: mrr_at_k(lst, g, pk),
        f"was@{pk}": lambda lst, g: was_at_k(lst, g, pk),
        f"pwkt@{pk}": lambda lst, g: pwkt_at_k(lst, g, pk),
        f"wmrd@{pk}": lambda lst, g: wmrd_at_k(lst, g, pk),
        f"dpa@{pk}": lambda lst, g: dpa_at_k(lst, g, pk),
        f"ild@{pk}": lambda lst, g: ild_at_k(lst, cats_of, pk),
        f"entropy@{pk}": lambda lst, g: entropy_at_k(lst, cats_of, pk),
    }
    values: dict[str, list[float | None]] = {key: [] for key in per_user}
    for lst, g in zip(lists, test_sequences):
        lst, g = list(lst), list(g)
        for key, fn in per_user.items():
            values[key].append(fn(lst, g))
    out: dict[str, Any] = {}
    for key, vals in values.items():
        out[prefix + key], out[prefix + key + "_users"] = _mean(vals)
    pages = [list(lst)[:pk] for lst in lists]
    out[prefix + f"coverage@{pk}"] = coverage(([x for x in p if x in known] for p in pages), n_items)
    out[prefix + f"tail_share@{pk}"] = tail_share(pages, tail_items) if tail_items is not None else None
    out[prefix + "invalid_rate"] = invalid_rate(pages, known)
    out[prefix + "duplicate_rate"] = duplicate_rate(pages)
    out[prefix + "users"] = len(lists)
    return out


def history_mask(histories: Sequence[Sequence[int]], n_items: int) -> sparse.csr_matrix:
    """[len(histories), n_items] sparse bool matrix of each user's seen items (a train_mask)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.fromiter((int(x) for h in histories for x in h), dtype=np.int64, count=len(rows))
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"history item index outside 0..{n_items - 1}")
    data = np.ones(len(rows), dtype=bool)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(histories), n_items))


def _as_csr(mask: Any, n_rows: int, n_items: int) -> sparse.csr_matrix | None:
    if mask is None:
        return None
    m = sparse.csr_matrix(mask, dtype=bool)
    if m.shape != (n_rows, n_items):
        raise ValueError(f"train_mask has shape {m.shape}, expected {(n_rows, n_items)}")
    return m


def evaluate_full_ranking(
    scores: np.ndarray | Callable[[int, int], np.ndarray],
    train_mask: Any,
    test_item_idx: Sequence[Sequence[int]],
    n_items: int | None = None,
    recall_ks: Sequence[int] = (20, 40),
    ndcg_ks: Sequence[int] = (100,),
    hr_ks: Sequence[int] = (),
    prefix: str = "full/",
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Full-ranking track: rank every item per user, training items masked.

    scores: a [U, n_items] array (may be a memmap), or a callable (start, stop) -> the
    [stop − start, n_items] block, so a 22k × 12k run never holds more than one block.
    train_mask: [U, n_items] bool array or scipy sparse matrix (or None) of items to push
    to −inf; a user's own test items are never masked (a repeat purchase still counts).
    test_item_idx[u]: dense indices of u's test items; users with none are skipped and
    the count of evaluated users is `<prefix>users`. Recall@K divides by min(K, |T|).
    """
    n_users = len(test_item_idx)
    if n_items is None:
        if callable(scores):
            raise ValueError("n_items is required when scores is a callable")
        n_items = scores.shape[1]
    if not callable(scores) and scores.shape != (n_users, n_items):
        raise ValueError(f"scores has shape {scores.shape}, expected {(n_users, n_items)}")
    if not (recall_ks or ndcg_ks or hr_ks):
        raise ValueError("evaluate_full_ranking needs at least one cutoff")
    mask = _as_csr(train_mask, n_users, n_items)
    k_max = min(max([*recall_ks, *ndcg_ks, *hr_ks]), n_items)
    w = _w(k_max)
    sums = {("recall", k): 0.0 for k in recall_ks} | {("ndcg", k): 0.0 for k in ndcg_ks}
    sums |= {("hr", k): 0.0 for k in hr_ks}
    evaluated = 0
    for start in range(0, n_users, chunk_size):
        stop = min(start + chunk_size, n_users)
        block = scores(start, stop) if callable(scores) else scores[start:stop]
        block = np.array(block, dtype=np.float32, copy=True)
        if block.shape != (stop - start, n_items):
            raise ValueError(f"score block {start}:{stop} has shape {block.shape}, expected {(stop - start, n_items)}")
        if np.isnan(block).any():
            raise ValueError(f"scores for users {start}:{stop} contain NaN")
        truth = np.zeros((stop - start, n_items), dtype=bool)
        for r, items in enumerate(test_item_idx[start:stop]):
            idx = np.asarray(list(items), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n_items):
                raise ValueError(f"user {start + r}: test item index outside 0..{n_items - 1}")
            truth[r, idx] = True
        if mask is not None:
            block[mask[start:stop].toarray() & ~truth] = -np.inf
        top = np.argpartition(-block, k_max - 1, axis=1)[:, :k_max]
        order = np.argsort(-np.take_along_axis(block, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        hits = np.take_along_axis(truth, top, axis=1).astype(np.float64)
        n_true = truth.sum(axis=1)
        keep = n_true > 0
        evaluated += int(keep.sum())
        hits, n_true = hits[keep], n_true[keep]
        for kind, k in sums:
            kk = min(k, n_items)
            if kind == "recall":
                sums[kind, k] += float((hits[:, :kk].sum(axis=1) / np.minimum(kk, n_true)).sum())
            elif kind == "hr":
                sums[kind, k] += float((hits[:, :kk].sum(axis=1) > 0).sum())
            else:
                idcg = np.cumsum(w[:kk])[np.minimum(kk, n_true) - 1]
                sums[kind, k] += float(((hits[:, :kk] @ w[:kk]) / idcg).sum())
    out: dict[str, Any] = {f"{prefix}{kind}@{k}": (v / evaluated if evaluated else None) for (kind, k), v in sums.items()}
    out[f"{prefix}users"] = evaluated
    return out


# ------------------------------------------------------------- evaluator-ranked hit rate


def hr_at_pct(generated: np.ndarray, random: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """HR@k% (docs METRICS.md): the share of users whose generated page beats all but k% of
    N random pages from the same candidate pool, as a judge values them.

    generated[u] is the judge's value of user u's generated page, random[u, j] that of its
    j-th random page ([users, N]). User u hits at k when at most k% of its random pages are
    valued strictly above its generated page. Ties count for the generated page (a random
    page beats it only by being better): with ties resolved in its favour, the generated
    page's rank among the N + 1 pages is at most 1 + k% of N. The test is done in integers
    (100 · above ≤ k · N), so k% of N needs no rounding. Keys "hr@1%", "hr@10%", ...
    """
    generated, random = np.asarray(generated, dtype=np.float64), np.asarray(random, dtype=np.float64)
    if random.ndim != 2 or generated.shape != (random.shape[0],) or random.shape[1] < 1:
        raise ValueError(f"expected generated [users] and random [users, N>=1], got {generated.shape} and {random.shape}")
    for k in ks:
        _check_k(k)
        if k > 100:
            raise ValueError(f"k is a percentage, at most 100; got {k}")
    above = (random > generated[:, None]).sum(axis=1)
    n = random.shape[1]
    return {f"hr@{k}%": float((100 * above <= k * n).mean()) for k in ks}


def random_pages(rng: np.random.Generator, n_items: int, exclude: Collection[int], n_pages: int, k: int) -> np.ndarray:
    """n_pages random pages for one user, [n_pages, k] item indices: each page holds k
    distinct items drawn uniformly from the user's candidate pool (items 0..n_items-1 not in
    `exclude`, the history). A pool of fewer than k items gives the whole pool in random
    order, padded with -1."""
    pool = np.setdiff1d(np.arange(n_items), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    if len(pool) <= 4 * k:  # most rows of a rejection draw would repeat an item: permute instead
        picks = np.argsort(rng.random((n_pages, len(pool))), axis=1)[:, :k]
    else:  # redrawing a whole row with a repeat keeps every ordered distinct page equally likely
        picks = rng.integers(0, len(pool), (n_pages, k))
        while True:
            ordered = np.sort(picks, axis=1)
            bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
            if not len(bad):
                break
            picks[bad] = rng.integers(0, len(pool), (len(bad), k))
    pages = np.full((n_pages, k), -1, dtype=np.int64)
    pages[:, : picks.shape[1]] = pool[picks]
    return pages


def expected_relevance(logits: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """A page's value under an item-scoring model: Σ_i softmax(logits)[p_i] · w_i.

    logits [users, n_items] are the model's scores after each user's history; pages
    [users, M, K] item indices (-1 = an empty slot, worth 0) -> values [users, M]. Why this
    form: the softmax reads the scores as the probability that each item is the user's next
    positive, so the sum is the page's expected relevance with NDCG's position discount
    w_i = 1 / log2(i + 1). Under a model no stage-3 algorithm trained against (the SASRec
    baseline) it is an independent judge for HR@k% on real data. Only the order of one
    user's pages matters there, so the per-user normaliser is harmless; items are assumed
    distinct within a page (random pages are, constrained decoding and ranking write them so).
    """
    z = np.asarray(logits, dtype=np.float64)
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    pages = np.asarray(pages)
    gathered = prob[np.arange(len(prob))[:, None, None], np.where(pages >= 0, pages, 0)] * (pages >= 0)
    return gathered @ _w(pages.shape[2])
