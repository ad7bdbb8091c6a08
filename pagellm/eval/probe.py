"""The validation probe that picks checkpoints: greedy, constrained pages for a fixed
sample of validation users, scored against their validation positives with the
evaluation's own metric functions. SFT early-stops and selects on it; stage 3 selects its
published checkpoint on it. Validation positives only judge: no stage trains on them.

SFT and stage 3 select on disjoint halves of the validation users (PROBE_PARTS). SFT's
published epoch is the best of up to ~30 noisy scores on its users, so its score there is
biased upwards (on MovieLens leave-one-out its best page-phase epoch scored 0.049 against
0.038-0.043 for the other nine): a stage-3 checkpoint measured on the same users has to beat
SFT's luck as well as SFT, and validation selection published SFT every time. On users SFT
never selected on, SFT's score is an honest bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pagellm.vocab import PromptEncoder

# Which stage selects on which half of the validation sample: every other user of one
# evenly spread sample, so both halves span the data alike.
PROBE_PARTS = ("sft", "stage3")


def evenly_spread(n: int, count: int) -> np.ndarray:
    """Up to `count` distinct positions in range(n), evenly spread over it (all n when count >= n)."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def probe_rows(n: int, users: int, part: str) -> np.ndarray:
    """Rows (of the n validation users, load_eval_set's order) of probe half `part` when each
    half holds up to `users`: every other row of one evenly spread sample."""
    return evenly_spread(n, len(PROBE_PARTS) * users)[PROBE_PARTS.index(part)::len(PROBE_PARTS)]


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
    def from_data(cls, data_dir: Path, encoder: PromptEncoder, page_len: int, users: int,
                  part: str) -> "RankingProbe":
        """`users` validation users (fewer if the data has fewer than 2 × users) from the
        half `part` (one of PROBE_PARTS) of an evenly spread sample."""
        from pagellm.eval.runner import load_eval_set

        if part not in PROBE_PARTS:
            raise ValueError(f"probe part {part!r}: expected one of {PROBE_PARTS}")
        es = load_eval_set(data_dir, "val", None)
        n = len(es.prompts)
        if n < len(PROBE_PARTS):
            raise ValueError(f"{data_dir}: {n} user(s) with validation positives; checkpoint selection needs "
                             f"at least {len(PROBE_PARTS)} (one per selecting stage)")
        keep = probe_rows(n, users, part)
        return cls({int(es.user_index[i]) for i in keep},
                   [encoder.encode_prompt(int(es.user_index[i]), es.prompts[i]) for i in keep],
                   [es.exclude[i] for i in keep], [es.targets[i] for i in keep], page_len)

    def __call__(self, model, layout, batch_size: int = 256) -> dict[str, float]:
        """`ndcg@k` / `hr@k` of the written pages (what selects), and `full_ndcg@k` /
        `full_hr@k` of the top k of the first page position's item scores (the policy as a
        next-item ranker, eval's `full/*`; what the next-item phase selects on)."""
        import torch

        from pagellm.eval.metrics import hr_at_k, ndcg_at_k
        from pagellm.models.decoding import exclusion_mask, first_item_scores, generate_pages

        k = min(10, self.page_len)
        pages: list[list[int]] = []
        ranked: list[list[int]] = []
        for a in range(0, len(self.prompts), batch_size):
            prompts, exclude = self.prompts[a : a + batch_size], self.exclude[a : a + batch_size]
            pages += generate_pages(model, layout, prompts, k=self.page_len, exclude=exclude).items
            scores = first_item_scores(model, layout, prompts)
            scores = scores.masked_fill(exclusion_mask(exclude, len(prompts), layout.n_items, scores.device),
                                        float("-inf"))
            ranked += torch.topk(scores, min(k, layout.n_items), dim=-1).indices.tolist()

        def mean(metric, lists) -> float:
            return float(np.mean([metric(p, t, k) for p, t in zip(lists, self.targets)]))

        return {f"ndcg@{k}": mean(ndcg_at_k, pages), f"hr@{k}": mean(hr_at_k, pages),
                f"full_ndcg@{k}": mean(ndcg_at_k, ranked), f"full_hr@{k}": mean(hr_at_k, ranked)}


def val_metric(page_len: int, ranking: bool = False) -> str:
    """The history key SFT and PPO select on (SFT also stops on it): the written pages'
    NDCG@10, or with `ranking` the next-item ranking's (`full_ndcg@10`)."""
    return f"val_{'full_' if ranking else ''}ndcg@{min(10, page_len)}"


def best_record(history: list[dict], metric: str, order: str = "max") -> dict | None:
    """The record (an epoch of SFT, a checkpoint of PPO) with the highest `metric` (lowest
    with order="min"), the first of equals (so the earlier one wins a tie), None if no
    record has it."""
    scored = [h for h in history if metric in h]
    pick = max if order == "max" else min
    return pick(scored, key=lambda h: h[metric]) if scored else None
