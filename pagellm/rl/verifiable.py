"""The verifiable reward: did the page hold what the user went on to engage with?

As MiniOneRec and Rec-R1 reward a generated recommendation by checking it against logged
behaviour instead of a learned judge, a page written for a prompt cut at some point of a
user's *training* history is scored by its binary NDCG against the training positives
after the cut. Only training interactions are ever checked (never validation or test),
so the reward is safe to optimise; it cannot be gamed by looking like the SFT policy,
only by naming items the user really took.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def hit_ndcg(pages: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], k: int) -> np.ndarray:
    """[B] binary NDCG@k of each page against its target set, in [0, 1].

    DCG = sum over the page's first k items of [item in targets] / log2(position + 1); the
    ideal DCG fills min(k, |targets|) positions. A repeated item counts once (constrained
    decoding never repeats, but a caller's page may). An empty target set scores 0."""
    if len(pages) != len(targets):
        raise ValueError(f"{len(pages)} pages but {len(targets)} target sets")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.concatenate([[0.0], np.cumsum(discount)])
    out = np.zeros(len(pages), dtype=np.float32)
    for row, (page, wanted) in enumerate(zip(pages, targets)):
        wanted = set(int(t) for t in wanted)
        if not wanted:
            continue
        seen: set[int] = set()
        dcg = 0.0
        for pos, item in enumerate(list(page)[:k]):
            item = int(item)
            if item in wanted and item not in seen:
                dcg += discount[pos]
            seen.add(item)
        out[row] = dcg / ideal[min(k, len(wanted))]
    return out
