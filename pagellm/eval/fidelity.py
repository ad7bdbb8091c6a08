"""Reward fidelity: does a page score track the page's true value? (docs/ARCHITECTURE.md §7)

Stage 3 can only turn a reward into better pages if, for one user, a higher-scored page is
a better page. On the simulator the true value of every page is known, so each evaluation
measures it directly: S pages sampled from the policy stage 3 starts from, plus its greedy
page and the simulator's oracle page, are scored by the reward and by the truth.

- `spearman/<signal>`: within-user Spearman correlation between a signal and the true
  utility over the S sampled pages, averaged over users (users whose S pages all tie on
  either side are skipped and counted). This is what a policy-gradient step sees: it only
  compares pages of the same prompt.
- `oracle_above_greedy/<signal>`: share of users whose oracle page outscores the policy's
  greedy page. Below 1/2, the reward prefers the policy's own page to the best one.
- `best_of_S/<signal>`: mean true utility of the sampled page the signal ranks first,
  beside `best_of_S/truth` (the page the truth ranks first) and `sampled_mean`: how much
  of the gain that best-of-S sampling could give the signal actually captures.

The truth only judges; nothing here feeds training. Plain numpy, no Ray, no models.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def within_user_spearman(scores: np.ndarray, truth: np.ndarray) -> tuple[float | None, int]:
    """(mean over users of Spearman(scores[u], truth[u]), users skipped). Both [U, S].

    Ties get average ranks; a user whose scores or truths are all equal has no correlation
    and is skipped (the second value counts them). None when every user is skipped."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"scores and truth must both be [users, samples], got {scores.shape} and {truth.shape}")
    if scores.shape[1] < 2:
        raise ValueError(f"need at least 2 samples per user, got {scores.shape[1]}")
    a = rankdata(scores, axis=1)
    b = rankdata(truth, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    ok = norm > 0
    if not ok.any():
        return None, int(len(ok))
    rho = (a * b).sum(axis=1)[ok] / norm[ok]
    return float(rho.mean()), int((~ok).sum())


def share_above(first: np.ndarray, second: np.ndarray) -> float:
    """Share of users where `first` scores strictly above `second` (ties count as not)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1 or not len(first):
        raise ValueError(f"need two equal, non-empty [users] vectors, got {first.shape} and {second.shape}")
    return float((first > second).mean())


def best_of(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over users of the truth of the page that `scores` ranks first (first on ties)."""
    scores, truth = np.asarray(scores), np.asarray(truth)
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"scores and truth must both be [users, samples], got {scores.shape} and {truth.shape}")
    pick = scores.argmax(axis=1)
    return float(truth[np.arange(len(truth)), pick].mean())


def fidelity_block(sampled: dict[str, np.ndarray], sampled_truth: np.ndarray,
                   greedy: dict[str, np.ndarray], oracle: dict[str, np.ndarray],
                   greedy_truth: np.ndarray, oracle_truth: np.ndarray) -> dict:
    """The `reward_fidelity` block of eval/metrics.json.

    `sampled[name]` is [U, S], one signal's score of every sampled page; `greedy[name]`
    and `oracle[name]` are [U] (a signal missing there, such as the policy's own
    log-likelihood of the oracle page when it is not computed, is left out of that part)."""
    users, samples = sampled_truth.shape
    block: dict = {"users": int(users), "samples_per_user": int(samples),
                   "sampled_mean": float(sampled_truth.mean()), "greedy_utility": float(greedy_truth.mean()),
                   "oracle_utility": float(oracle_truth.mean()),
                   "best_of_S/truth": best_of(sampled_truth, sampled_truth)}
    for name, scores in sampled.items():
        rho, skipped = within_user_spearman(scores, sampled_truth)
        block[f"spearman/{name}"] = rho
        block[f"spearman_skipped/{name}"] = skipped
        block[f"best_of_S/{name}"] = best_of(scores, sampled_truth)
        if name in greedy and name in oracle:
            block[f"oracle_above_greedy/{name}"] = share_above(oracle[name], greedy[name])
    block["oracle_above_greedy/truth"] = share_above(oracle_truth, greedy_truth)
    return block
