"""Scoring API of the reward model, for PPO reward actors and serving (pure torch, no Ray).

    scorer = RewardScorer.load("runs/demo/reward", device="cpu")
    r_c, r_f = scorer.score([7, None], [[3, 91], [5]], [[12, 5, 40], [8, 2]])
    r_c, r_f = scorer.score_tokens(prompt_ids, response_ids)     # PPO: ids from a rollout

Both return float32 numpy arrays of one score per page, in input order; a head the model
was trained without returns zeros (so R = R_c + R_f is always their sum). The model is
frozen and in eval mode; every call runs under no_grad. Rows are scored in batches of
similar length (sorted by length) so short pages are not padded to the longest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pagellm.models.positions import check_context
from pagellm.models.reward import RewardModel, load_reward_model, pad_pages
from pagellm.vocab import PromptEncoder, TokenLayout


class RewardScorer:
    def __init__(self, model: RewardModel, tokenizer, layout: TokenLayout, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.layout = layout
        self.encoder = PromptEncoder(tokenizer, layout)
        self.device = torch.device(device)

    @classmethod
    def load(cls, reward_dir: str | Path, device: str | torch.device = "cpu") -> "RewardScorer":
        model, tokenizer, layout = load_reward_model(reward_dir, device=device)
        return cls(model, tokenizer, layout, device)

    @property
    def heads(self) -> tuple[str, ...]:
        return self.model.heads

    def score(
        self,
        user_indices: Sequence[int | None],
        prompt_items: Sequence[Sequence[int]],
        pages: Sequence[Sequence[int]],
        batch_size: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R_c, R_f) of each page for its user (None = no user token) and history.

        Items are dense item indices; an out-of-range index raises ValueError.
        """
        if not len(user_indices) == len(prompt_items) == len(pages):
            raise ValueError(
                f"lengths differ: {len(user_indices)} users, {len(prompt_items)} prompts, {len(pages)} pages"
            )
        rows = [
            (self.encoder.encode_prompt(None if u is None else int(u), items), self.encoder.encode_page(page))
            for u, items, page in zip(user_indices, prompt_items, pages)
        ]
        return self._score_rows(rows, batch_size)

    def score_tokens(
        self, prompt_ids: Sequence[Sequence[int]] | torch.Tensor, response_ids: Sequence[Sequence[int]] | torch.Tensor,
        batch_size: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R_c, R_f) for token ids a caller already holds (e.g. a PPO rollout).

        A prompt row loses its leading pad tokens (left padding; a prompt never starts with
        pad). A response row is cut at its first eos (what follows is padding); a response
        with no eos (cut at the length limit) gets one. Any other non-item token raises.
        """
        prompts = [self._strip_left_pad(_as_list(p)) for p in prompt_ids]
        responses = [self._page_ids(_as_list(r), n) for n, r in enumerate(response_ids)]
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self._score_rows(list(zip(prompts, responses)), batch_size)

    def _strip_left_pad(self, ids: list[int]) -> list[int]:
        start = 0
        while start < len(ids) and ids[start] == self.layout.pad_id:
            start += 1
        if start == len(ids):
            raise ValueError("a prompt row holds only padding")
        return ids[start:]

    def _page_ids(self, ids: list[int], row: int) -> list[int]:
        eos = self.layout.eos_id
        page = ids[: ids.index(eos)] if eos in ids else ids
        bad = [t for t in page if not self.layout.is_item_token(t)]
        if bad:
            raise ValueError(f"response {row} holds non-item tokens before its eos: {bad[:5]}")
        return page + [eos]

    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], list[int]]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        coarse = np.zeros(len(rows), dtype=np.float32)
        fine = np.zeros(len(rows), dtype=np.float32)
        if not rows:
            return coarse, fine
        check_context(self.model.policy, max(len(p) for p, _ in rows), max(len(q) for _, q in rows))
        order = np.argsort([len(p) + len(q) for p, q in rows], kind="stable")
        for start in range(0, len(rows), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in pad_pages([rows[i] for i in chunk], self.layout).items()}
            scores = self.model(**batch)
            if scores.coarse is not None:
                coarse[chunk] = scores.coarse.float().cpu().numpy()
            if scores.fine is not None:
                fine[chunk] = scores.fine.float().cpu().numpy()
        return coarse, fine


def _as_list(row) -> list[int]:
    if torch.is_tensor(row):
        return [int(t) for t in row.tolist()]
    return [int(t) for t in row]
