"""Most-popular baseline: every user gets the items ranked by training interaction count."""

from __future__ import annotations

import numpy as np

from pagellm.eval.baselines import check_sequences


class PopularityBaseline:
    name = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, train_sequences: list[list[int]], n_items: int, val_histories: list[list[int]] | None = None,
            val_targets: list[list[int]] | None = None) -> None:
        """Counts of the training items; nothing is trained, so a validation step is unused."""
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        check_sequences(train_sequences, n_items, "train_sequences")
        flat = np.fromiter((int(x) for seq in train_sequences for x in seq), dtype=np.int64)
        self.counts = np.bincount(flat, minlength=n_items).astype(np.float32)

    def score(self, histories: list[list[int]]) -> np.ndarray:
        if self.counts is None:
            raise RuntimeError("PopularityBaseline.score called before fit")
        # The same row for everyone; broadcast_to avoids copying it per user.
        return np.broadcast_to(self.counts, (len(histories), self.counts.size))
