"""Baseline recommenders scored on the same tracks as the policy.

Every baseline works on dense item indices 0..n_items-1 and answers through one
interface: `fit` on training sequences, `score` every item for a batch of histories.
The page track ranks those scores (`rank`); the full-ranking track feeds them to
`pagellm.eval.metrics.evaluate_full_ranking`. A baseline whose users are graph nodes
(LightGCN) sets `by_user` and also takes each sequence's user index (`users=`) in `fit`
and `score`; `scores_of` is the one call that hands them over.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Baseline(Protocol):
    name: str

    def fit(self, train_sequences: list[list[int]], n_items: int, val_histories: list[list[int]] | None = None,
            val_targets: list[list[int]] | None = None) -> None:
        """Learn from each user's training items in time order. A trained baseline selects
        its epoch on the validation step (history -> held-out items) when one is given."""

    def score(self, histories: list[list[int]]) -> np.ndarray:
        """[len(histories), n_items] float scores, higher = recommend first."""


def scores_of(baseline: Baseline, histories: Sequence[Sequence[int]], users: Sequence[int] | None) -> np.ndarray:
    """`baseline.score`, with the users' indices for a baseline that scores users (`by_user`)."""
    if getattr(baseline, "by_user", False):
        if users is None:
            raise ValueError(f"{baseline.name} scores users: pass their indices")
        return baseline.score(list(histories), users=list(users))
    return baseline.score(list(histories))


def check_sequences(sequences: Sequence[Sequence[int]], n_items: int, what: str) -> None:
    """Raise a clear error for an item index outside 0..n_items-1."""
    for u, seq in enumerate(sequences):
        for x in seq:
            if not 0 <= int(x) < n_items:
                raise ValueError(f"{what}[{u}] holds item {x}, outside 0..{n_items - 1}")


def rank(
    baseline: Baseline,
    histories: Sequence[Sequence[int]],
    k: int,
    exclude: Sequence[Iterable[int]] | None = None,
    batch_size: int = 1024,
    users: Sequence[int] | None = None,
) -> list[list[int]]:
    """Top-k item indices per user, best first, never an excluded item.

    exclude[u] lists items user u must not get (usually the history); when fewer than k
    items remain the list is shorter rather than padded with excluded items.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude is not None and len(exclude) != len(histories):
        raise ValueError(f"{len(exclude)} exclude lists for {len(histories)} histories")
    out: list[list[int]] = []
    for start in range(0, len(histories), batch_size):
        batch = [list(h) for h in histories[start : start + batch_size]]
        batch_users = None if users is None else users[start : start + batch_size]
        scores = np.array(scores_of(baseline, batch, batch_users), dtype=np.float64, copy=True)
        n_items = scores.shape[1]
        if exclude is not None:
            for r, items in enumerate(exclude[start : start + batch_size]):
                idx = np.fromiter((int(x) for x in items), dtype=np.int64)
                scores[r, idx[(idx >= 0) & (idx < n_items)]] = -np.inf
        kk = min(k, n_items)
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        valid = np.isfinite(np.take_along_axis(scores, top, axis=1))
        out.extend(row[ok].tolist() for row, ok in zip(top, valid))
    return out


def validation_ndcg(baseline: Baseline, histories: list[list[int]], targets: list[list[int]], chunk_size: int,
                    users: list[int] | None = None) -> float:
    """Full-ranking NDCG@10 with each user's history items masked: what a trained baseline
    selects its epoch (SASRec, LightGCN) or lambda (EASE) on."""
    from pagellm.eval.metrics import evaluate_full_ranking, history_mask

    res = evaluate_full_ranking(
        lambda a, b: scores_of(baseline, histories[a:b], None if users is None else users[a:b]),
        history_mask(histories, baseline.n_items), targets,
        n_items=baseline.n_items, recall_ks=(), ndcg_ks=(10,), prefix="", chunk_size=chunk_size,
    )
    return float(res["ndcg@10"] or 0.0)


def make_baseline(name: str, params: dict[str, Any] | None = None) -> Baseline:
    """A baseline by its config name (pagellm/eval/baselines/params.py) with its hyperparameters."""
    from pagellm.eval.baselines.params import BASELINE_PARAMS

    params = dict(params or {})
    if name not in BASELINE_PARAMS:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINE_PARAMS)}")
    unknown = sorted(set(params) - set(BASELINE_PARAMS[name]))
    if unknown:
        known = ", ".join(BASELINE_PARAMS[name]) or "none"
        raise ValueError(f"unknown {name} parameters {unknown}; known: {known}")
    if name == "popularity":
        from pagellm.eval.baselines.popularity import PopularityBaseline

        return PopularityBaseline()
    if name == "ease":
        from pagellm.eval.baselines.ease import EASE

        return EASE(params)
    if name == "lightgcn":
        from pagellm.eval.baselines.lightgcn import LightGCN

        return LightGCN(params)
    from pagellm.eval.baselines.sasrec import SASRec

    return SASRec(params)


__all__ = ["Baseline", "check_sequences", "make_baseline", "rank", "scores_of", "validation_ndcg"]
