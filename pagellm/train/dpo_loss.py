"""The DPO objective on pages (Rafailov et al. 2023), plain torch, no Ray.

A page's log-likelihood is what constrained decoding gives it: the sum over its items of
the item's log-probability among the items still allowed there (the prompt's items and
the items already on the page blocked), the very terms SFT's item loss averages
(`pagellm/train/sft.py::item_loss_terms`), with the policy's model.ranking_prior applied as
decoding applies it: DPO moves the distribution that is decoded and served. The policy and
the frozen reference are scored by the same function, `page_logprobs`, so their difference
is a log-ratio of one likelihood.
"""

from __future__ import annotations

import torch

from pagellm.train.sft import _labelled_hidden, item_logits, item_loss_terms, with_ranking_prior
from pagellm.train.sft_rows import IGNORE


def row_sums(losses: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] summed log-probability per row from per-position losses.

    `collate` numbers the labelled tokens row-major (row 0's, then row 1's, ...), so the
    row of position p is found by repeating each row index once per labelled token. A
    row's <eos> position has no target, and so no term (its constrained logprob is 0)."""
    per_row = (labels[:, 1:] != IGNORE).sum(dim=1)
    row_of = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), per_row)
    return torch.zeros(labels.shape[0], device=losses.device).index_add(0, row_of[positions], -losses)


def page_logprobs(model, batch: dict, layout) -> torch.Tensor:
    """[B] constrained log-likelihood of each row's page (`collate` output of
    `page_rows(..., user_dropout=0)` rows). `model`: a DeepSpeed engine or the bare model;
    runs in the caller's grad mode."""
    hidden, _ = _labelled_hidden(model, batch)
    module = getattr(model, "module", model)
    logits = with_ranking_prior(item_logits(module, hidden, layout), batch, layout)
    losses, positions = item_loss_terms(logits, batch["targets"], batch["blocked"])
    return row_sums(losses, positions, batch["labels"])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, chosen_items: torch.Tensor | None = None,
             sft_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean -log σ(β [(π_c − ref_c) − (π_r − ref_r)]) over the pairs, plus with `sft_coef`
    > 0 sft_coef × the chosen page's NLL per item (RPO: `chosen_items` [P] item counts).

    Inputs [P]: summed page log-probabilities. Metrics (detached): accuracy (share of pairs
    whose margin is > 0), margin (mean β-scaled margin), chosen_reward / rejected_reward
    (mean implicit rewards β (π − ref)), and sft_nll when the term is on."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    metrics = {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach(),
               "chosen_reward": chosen_reward.mean().detach(), "rejected_reward": rejected_reward.mean().detach()}
    if sft_coef > 0:
        if chosen_items is None:
            raise ValueError("sft_coef > 0 needs chosen_items (the chosen pages' item counts)")
        nll = (-policy_chosen / chosen_items.to(policy_chosen.dtype).clamp(min=1)).mean()
        loss = loss + sft_coef * nll
        metrics["sft_nll"] = nll.detach()
    return loss, metrics
