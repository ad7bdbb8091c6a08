"""The validation probe that picks checkpoints: greedy, constrained pages for a fixed
sample of validation users, scored against their validation positives with the
evaluation's own metric functions. SFT early-stops and selects on it; PPO selects the
published stage-3 checkpoint on it. Validation positives only judge: no stage trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pagellm.vocab import PromptEncoder


@dataclass
class RankingProbe:
    """Validation users as the evaluation sees them: the pages the policy writes for them
    (greedy, constrained, their training items excluded) scored against their validation
    positives. One fixed, evenly spread sample so every epoch is judged on the same users."""

    users: set[int]  # user indices of the sample
    prompts: list[list[int]]
    exclude: list[set[int]]
    targets: list[list[int]]
    page_len: int

    @classmethod
    def from_data(cls, data_dir: Path, encoder: PromptEncoder, page_len: int, users: int) -> "RankingProbe":
        from pagellm.eval.runner import load_eval_set

        es = load_eval_set(data_dir, "val", None)
        if not len(es.prompts):
            raise ValueError(f"{data_dir}: no user has validation positives; SFT cannot pick a checkpoint")
        keep = np.unique(np.linspace(0, len(es.prompts) - 1, min(users, len(es.prompts))).round().astype(int))
        return cls({int(es.user_index[i]) for i in keep},
                   [encoder.encode_prompt(int(es.user_index[i]), es.prompts[i]) for i in keep],
                   [es.exclude[i] for i in keep], [es.targets[i] for i in keep], page_len)

    def __call__(self, model, layout, batch_size: int = 256) -> dict[str, float]:
        from pagellm.eval.metrics import hr_at_k, ndcg_at_k
        from pagellm.models.decoding import generate_pages

        pages: list[list[int]] = []
        for a in range(0, len(self.prompts), batch_size):
            pages += generate_pages(model, layout, self.prompts[a : a + batch_size], k=self.page_len,
                                    exclude=self.exclude[a : a + batch_size]).items
        k = min(10, self.page_len)
        return {f"ndcg@{k}": float(np.mean([ndcg_at_k(p, t, k) for p, t in zip(pages, self.targets)])),
                f"hr@{k}": float(np.mean([hr_at_k(p, t, k) for p, t in zip(pages, self.targets)]))}


def val_metric(page_len: int) -> str:
    """The history key SFT and PPO select on (SFT also stops on it)."""
    return f"val_ndcg@{min(10, page_len)}"


def best_record(history: list[dict], metric: str) -> dict | None:
    """The record (an epoch of SFT, a checkpoint of PPO) with the highest `metric`, the first
    of equals (so the earlier one wins a tie), None if no record has it."""
    scored = [h for h in history if metric in h]
    return max(scored, key=lambda h: h[metric]) if scored else None
