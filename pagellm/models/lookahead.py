"""DeGRe's lookahead evaluator: a small causal transformer over (prompt, page prefix) that
says, after every item of a page, what the page is worth so far (docs/ARCHITECTURE.md §6).

It reads the policy's own token ids (user token, history items, template, page items) and
at each position t outputs a gain for every item as the page's next one, g_t(i); the value
of a prefix is the sum of the gains of the items on it, V_k = Σ_{t<k} g_t(i_{t+1}). Because
the gains are conditioned on the prefix, a gain can fall when the page already holds
similar items: what a per-item score cannot express, and what beam search needs to plan a
whole page. Beam search reads the gains of every candidate in one forward per beam.

Trained on what the run's data holds, never on the simulator's truth:
  dense cumulative regression: each item of a logged or constructed page is valued by the
    user's own training rating of it (`rating_value`: +1 at the top of the scale, 0 at the
    positive threshold or when unrated, -1 at the bottom), discounted by position
    (1 / log2(t + 2), as DCG), and every prefix value V_k is regressed on the cumulative
    target y_k = Σ_{t<k} value_t / log2(t + 2) — one target per step, the "dense" part;
  a page-level Bradley–Terry term on the data's pairs, BT(V_K(chosen) - V_K(rejected)):
    the pairs say what per-item labels cannot (order, a one-category page, clustering).
Plain functions below (targets, losses) are unit-tested without Ray.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import GPT2Config, GPT2Model, GPT2PreTrainedModel


def rating_value(rating: float, threshold: float, low: float, high: float) -> float:
    """A training rating on a [-1, 1] scale: +1 at `high`, 0 at the positive `threshold`,
    -1 at `low`, linear in between; NaN (implicit feedback: no rating) counts as +1, since
    an interaction is the only signal there is."""
    if math.isnan(rating):
        return 1.0
    if rating >= threshold:
        return (rating - threshold) / (high - threshold) if high > threshold else 1.0
    return -(threshold - rating) / (threshold - low) if threshold > low else -1.0


def position_discount(k: int) -> np.ndarray:
    """1 / log2(t + 2) for t = 0..k-1: DCG's discount, so the same items earn more in a
    better order."""
    return 1.0 / np.log2(np.arange(k) + 2.0)


def cumulative_targets(values: np.ndarray) -> np.ndarray:
    """y_k = Σ_{t<k} values_t / log2(t + 2), k = 1..K, for one page's per-item values."""
    values = np.asarray(values, dtype=np.float64)
    return np.cumsum(values * position_discount(len(values)))


def prefix_values(picked: torch.Tensor, page_mask: torch.Tensor) -> torch.Tensor:
    """V_k for every prefix: picked [B, K] the gain of page item t at the position that
    predicts it, page_mask [B, K] (False past a short page's end). Returns [B, K] cumulative
    values (constant after the page ends)."""
    return (picked * page_mask).cumsum(dim=1)


def cumulative_regression_loss(values: torch.Tensor, targets: torch.Tensor, page_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of every prefix value against its cumulative target: each step
    of each page is a supervised example (the dense supervision)."""
    err = (values - targets) ** 2 * page_mask
    return err.sum() / page_mask.sum().clamp(min=1)


def pair_loss(chosen_value: torch.Tensor, rejected_value: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry on the pages' final values: -log σ(V(chosen) - V(rejected))."""
    return -torch.nn.functional.logsigmoid(chosen_value - rejected_value).mean()


class LookaheadEvaluator(GPT2PreTrainedModel):
    """GPT-2 blocks (a config of its own, small by default) over the policy's token ids and a
    linear gain head over the items; saved and loaded with save_pretrained/from_pretrained."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.gain = torch.nn.Linear(config.n_embd, config.n_items)
        self.post_init()

    @classmethod
    def build(cls, vocab_size: int, n_items: int, n_positions: int, n_layer: int, n_embd: int, n_head: int,
              seed: int) -> "LookaheadEvaluator":
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd,
                            n_head=n_head, n_items=n_items, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        return cls(config)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H] last hidden states (left padding: real tokens' positions start at 0)."""
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=positions).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, n_items]: at position t, the gain of each item as token t + 1."""
        return self.gain(self.hidden(input_ids, attention_mask))

    def last_gains(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, n_items]: every item's gain as the next token after the last one (what beam
        search reads); the head runs at that position only."""
        return self.gain(self.hidden(input_ids, attention_mask)[:, -1])

    def picked_gains(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, K] the gains of the given items only (hidden [B, K, H], items [B, K], -1 =
        none): one row of the head each, so fitting never builds the [B, K, n_items] gains
        of every item (thousands of items at every page position)."""
        rows = items.clamp(min=0)
        return (hidden * self.gain.weight[rows]).sum(dim=-1) + self.gain.bias[rows]


def page_batch(prompts: list[list[int]], pages: list[list[int]], item_offset: int, pad_id: int, device=None):
    """Left-padded [prompt tokens, page item tokens] and what `prefix_values` needs.

    Returns (input_ids, attention_mask, page_items [B, K], page_mask [B, K], first): the
    gains predicting page item t sit at column first + t (the prompt's last token for t = 0).
    Pages are right-padded to the longest (K); a page may be empty only if all are."""
    width_p = max(len(p) for p in prompts)
    k = max((len(p) for p in pages), default=0)
    ids = torch.full((len(prompts), width_p + k), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    items = torch.full((len(prompts), k), -1, dtype=torch.long)
    for row, (prompt, page) in enumerate(zip(prompts, pages)):
        ids[row, width_p - len(prompt) : width_p] = torch.as_tensor(prompt)
        mask[row, width_p - len(prompt) : width_p] = 1
        if page:
            ids[row, width_p : width_p + len(page)] = torch.as_tensor(page) + item_offset
            mask[row, width_p : width_p + len(page)] = 1
            items[row, : len(page)] = torch.as_tensor(page)
    # Padding after a short page's end sits right of real tokens; the causal mask keeps
    # it from reaching them, and page_mask drops its gains.
    return (ids.to(device), mask.to(device), items.to(device), (items >= 0).float().to(device), width_p - 1)


def page_values(evaluator: LookaheadEvaluator, prompts, pages, item_offset: int, pad_id: int) -> torch.Tensor:
    """[B, K] prefix values of the given pages under the evaluator (caller's grad mode)."""
    ids, mask, items, page_mask, first = page_batch(prompts, pages, item_offset, pad_id,
                                                    next(evaluator.parameters()).device)
    k = items.shape[1]
    return prefix_values(evaluator.picked_gains(evaluator.hidden(ids, mask)[:, first : first + k], items), page_mask)
