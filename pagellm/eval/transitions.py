"""Item-to-item steps of the training rows, and how well a model recalls them (diagnosis).

    count = item_counts(histories, n_items)        training rows per item
    steps = training_steps(histories)               Counter of (a, b): b right after a
    sample = sample_steps(steps, count, rare=9)     {"rare": [...], "common": [...]} seeded
    step_recall(scores, sample["rare"])             HR@10 of b ranked from the history [a]

On Beauty the policy trailed SASRec where a test user's step was a training step between
two rare items, and its recall of the training rows' own rare steps was half SASRec's
(docs/BENCHMARKS.md, "Adam's second moment"). `bench/transition_recall.py` reads a finished
run with these; `bench/next_item_readout.py` tracks them per epoch. Plain numpy / torch:
training data only, nothing here reads a validation or test item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

STEP_BUCKETS = ("rare", "common")


def item_counts(histories: Iterable[Sequence[int]], n_items: int) -> np.ndarray:
    """[n_items] how many training rows hold each item."""
    items = [int(i) for h in histories for i in h]
    return np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items)


def training_steps(histories: Iterable[Sequence[int]]) -> Counter:
    """(a, b) -> how many rows take b right after a."""
    return Counter((int(a), int(b)) for h in histories for a, b in zip(h[:-1], h[1:]))


def sample_steps(steps: Iterable[tuple[int, int]], count: np.ndarray, rare: int = 9, per_bucket: int = 1500,
                 seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """A seeded sample of distinct steps per bucket: "rare" (both items in at most `rare`
    rows) and "common" (both in more). Steps with one rare and one common item are in
    neither: the buckets are there to separate the two regimes, not to cover every step."""
    pool = sorted(set(steps))
    keep = {"rare": lambda a, b: count[a] <= rare and count[b] <= rare,
            "common": lambda a, b: count[a] > rare and count[b] > rare}
    rng = np.random.default_rng(seed)
    out = {}
    for name in STEP_BUCKETS:  # fixed order: the one generator draws the buckets in turn
        bucket = [s for s in pool if keep[name](*s)]
        out[name] = [bucket[i] for i in rng.choice(len(bucket), min(per_bucket, len(bucket)), replace=False)]
    return out


def step_recall(scores: torch.Tensor | np.ndarray, steps: Sequence[tuple[int, int]], k: int = 10) -> float:
    """Share of steps (a, b) whose b is in the top k of scores[n] (the model's ranking from
    the one-item history [a]), a itself excluded as the evaluation excludes history items."""
    if not len(steps):
        return 0.0
    scores = torch.as_tensor(scores).float().clone()
    a = torch.tensor([s[0] for s in steps])
    b = torch.tensor([s[1] for s in steps])
    scores[torch.arange(len(steps)), a] = float("-inf")
    top = torch.topk(scores, k, dim=-1).indices
    return float((top == b[:, None]).any(1).float().mean())
