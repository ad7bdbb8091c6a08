"""DeGRe's offline miner: beam search over the policy's proposals, scored by a page value
model, for high-value pages to distill into the policy.

At each step every beam proposes the policy's `expand` most likely next items (constrained
as decoding is: known items, none twice, none excluded); each proposal is scored by the
beam's value plus the value model's gain for it given the beam's prefix (plus
`policy_weight` x its log-probability under the policy), and the `beam` best (beam, item)
pairs over all proposals go on. The policy proposes and the value model chooses: pages stay
within what the policy would plausibly write, so distillation moves it a short way, towards
what the value model values. Every step also records the proposals and their gains, the
soft labels of the distillation (pagellm/train/distill_loss.py).

Two value models (`degre.value_model`): DeGRe's lookahead evaluator
(pagellm/models/lookahead.py, `EvaluatorGains`) and the page prior fitted in the reward
stage (pagellm/models/page_prior.py, `PriorGains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagellm.models.decoding import (_EvalMode, _forward, _step_logprobs, exclusion_mask, first_item_logits,
                                     first_item_logprobs, left_pad)
from pagellm.models.positions import position_ids, prompt_anchor


@dataclass
class MinedPage:
    items: list[int]
    value: float  # the value model's V_K: the summed gains of its items
    proposals: list[list[int]]  # per step: the items the beam chose among
    gains: list[list[float]]  # per step: the value model's gain of each proposal
    logp: float = 0.0  # the page's log-probability under the policy's constrained decoding


def _last_logits(model, prompts: list[list[int]], prefix_tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The policy's logits after [prompt, prefix] (prefixes all of one length)."""
    device = prefix_tokens.device
    ids, mask, _ = left_pad(prompts, pad_id, device)
    full_ids = torch.cat([ids, prefix_tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(prefix_tokens)], dim=1)
    positions = position_ids(full_mask, [len(p) for p in prompts], prompt_anchor(model))
    return _forward(model, full_ids, full_mask, positions, keep=1, cache=False).logits[:, -1]


def _last_gains(evaluator, prompts: list[list[int]], prefix_tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The evaluator's gains of every item as the next one after [prompt, prefix]."""
    ids, mask, _ = left_pad(prompts, pad_id, prefix_tokens.device)
    full_ids = torch.cat([ids, prefix_tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(prefix_tokens)], dim=1)
    return evaluator.last_gains(full_ids, full_mask)


class EvaluatorGains:
    """The lookahead evaluator's gains (DeGRe's value model)."""

    def __init__(self, evaluator, pad_id: int):
        self.evaluator, self.pad_id = evaluator, pad_id

    def __call__(self, prompts: list[list[int]], prefix_tokens: torch.Tensor, prefixes: list[list[int]],
                 first_logp: torch.Tensor) -> torch.Tensor:
        with _EvalMode(self.evaluator):
            return _last_gains(self.evaluator, prompts, prefix_tokens, self.pad_id).float()


class PriorGains:
    """The page prior's gains (pagellm/models/page_prior.py step_gains): the user's preference
    is the policy's own first-item log-probabilities, as the prior was fitted on."""

    def __init__(self, prior, item_cat: np.ndarray):
        self.prior, self.item_cat = prior, np.asarray(item_cat)

    def __call__(self, prompts: list[list[int]], prefix_tokens: torch.Tensor, prefixes: list[list[int]],
                 first_logp: torch.Tensor) -> torch.Tensor:
        from pagellm.models.page_prior import standardise, step_gains

        gains = step_gains(self.prior, standardise(first_logp.double().cpu().numpy()), prefixes, self.item_cat)
        return torch.as_tensor(gains, dtype=torch.float32, device=prefix_tokens.device)


@torch.no_grad()
def mine_pages(policy, gains_of, layout, prompts: list[list[int]], exclude: list, k: int, beam: int, expand: int,
               policy_weight: float = 0.0) -> list[list[MinedPage]]:
    """`beam` distinct pages of k items per prompt (best first). `prompts`: token ids
    (PromptEncoder.encode_prompt); `exclude[p]`: items prompt p's pages may not hold;
    `gains_of`: the value model (EvaluatorGains or PriorGains). Beams are ranked by value +
    policy_weight x log-probability: 0 lets the value model alone choose among the
    proposals (DeGRe); larger keeps the mined pages closer to what the policy writes."""
    if layout.repeat_penalty or layout.evaluator_weight or layout.quality_weight:  # DeGRe mines from SFT; a guided one
        # would need per-beam category counts and its evaluator's scores
        raise ValueError("mine_pages: the policy carries the guided stage's decoding terms; mine from the SFT policy")
    device = next(policy.parameters()).device
    n = layout.n_items
    base_blocked = exclusion_mask(exclude, len(prompts), n, device)
    # One beam per prompt at the start (an empty prefix): distinct pages follow, since two
    # beams of one prompt never share a prefix and never extend by the same item.
    beams: list[list[MinedPage]] = [[MinedPage([], 0.0, [], [])] for _ in prompts]
    with _EvalMode(policy):
        for t in range(k):
            rows = [(p, b) for p, bs in enumerate(beams) for b in range(len(bs))]
            owner = [p for p, _ in rows]  # the prompt of each row
            row_prompts = [prompts[p] for p in owner]
            prefix = torch.tensor([[layout.item_token(i) for i in beams[p][b].items] for p, b in rows],
                                  dtype=torch.long, device=device).reshape(len(rows), t)
            blocked = base_blocked[owner].clone()
            for r, (p, b) in enumerate(rows):
                blocked[r, beams[p][b].items] = True
            logits = _last_logits(policy, row_prompts, prefix, layout.pad_id)
            if t == 0:  # one row per prompt: its first position, for model.ranking_prior
                first = first_item_logits(logits, layout)
                first_logp = first_item_logprobs(logits, layout)  # the page prior's user preference
            row_first = None if first is None else first[owner]
            logp = _step_logprobs(logits, layout, blocked, t, k, 1.0, row_first)[:, :n]
            width = min(expand, int((~blocked).sum(dim=1).min()))
            if width < 1:
                raise ValueError(f"step {t}: a prompt has no item left to place (k={k} too large for its exclusions)")
            proposal_logp, proposal = logp.topk(width, dim=1)
            gains = gains_of(row_prompts, prefix, [beams[p][b].items for p, b in rows],
                             first_logp[owner]).gather(1, proposal)
            new_beams: list[list[MinedPage]] = [[] for _ in prompts]
            for p in range(len(prompts)):
                mine = [r for r, (q, _) in enumerate(rows) if q == p]
                scored = []
                for r in mine:
                    parent = beams[p][rows[r][1]]
                    for j in range(width):
                        if torch.isfinite(proposal_logp[r, j]):
                            value = parent.value + float(gains[r, j])
                            page_logp = parent.logp + float(proposal_logp[r, j])
                            scored.append((value + policy_weight * page_logp, value, page_logp, r, j))
                for _, value, page_logp, r, j in sorted(scored, key=lambda s: -s[0])[:beam]:
                    parent = beams[p][rows[r][1]]
                    new_beams[p].append(MinedPage(parent.items + [int(proposal[r, j])], value,
                                                  parent.proposals + [proposal[r].tolist()],
                                                  parent.gains + [gains[r].tolist()], page_logp))
            beams = new_beams
    return beams
