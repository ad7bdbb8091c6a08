"""Distilling a next-item ranking into every page position (plain torch, unit-tested).

On every real table the page a policy writes greedily hits less often than the top of its
own first-position scores (docs/BENCHMARKS.md: Beauty validation, the next-item phase's
ranking NDCG@10 0.057 against its written page's 0.042): after the first item, each
position conditions on guesses that are mostly misses. `sft.rank_distill` pulls each page
position's constrained distribution toward a teacher's next-item distribution over the
items still allowed there, the teacher being the frozen model the page phase started from
(the next-item phase's checkpoint). With nothing else known, position t then writes the
ranking's t-th item; the golden-page loss beside it says when the page should differ.

For page position p of row r, with the same blocked items B_p masked in both,

    q_p = softmax(teacher logits of row r's first page position, B_p masked)
    KL_p = Σ_j q_pj (log q_pj - log π_p(j))

and the loss is the mean of KL_p over the page's item positions.
"""

from __future__ import annotations

import torch


def row_starts(label_rows: torch.Tensor) -> torch.Tensor:
    """Index of each row's first labelled position in [P] row ids (row-major, as collate
    orders them), and for every position the number of the row it belongs to."""
    change = torch.ones_like(label_rows, dtype=torch.bool)
    change[1:] = label_rows[1:] != label_rows[:-1]
    return change.nonzero().squeeze(1), change.long().cumsum(0) - 1


def ranking_kl(student_logp: torch.Tensor, teacher_first: torch.Tensor, row_of: torch.Tensor,
               blocked: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean KL_p over `positions` (module doc). student_logp [P, n_items]: the student's
    constrained log-probabilities (`sft.constrained_log_softmax`, `blocked` masked) at every
    labelled position; teacher_first [R, n_items], the teacher's logits at each row's first
    page position; row_of [P] the row number of each position; blocked [2, *] (position,
    item) pairs masked at that position."""
    from pagellm.train.sft import constrained_log_softmax

    logp = student_logp[positions]
    logq = constrained_log_softmax(teacher_first[row_of].detach(), blocked)[positions]
    q = logq.exp()
    allowed = q > 0  # blocked items: q = 0 and log π = -inf, whose product must read 0
    kl = torch.where(allowed, q * (logq - logp), torch.zeros_like(q)).sum(dim=1)
    return kl.mean()
