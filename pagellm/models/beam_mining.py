"""DeGRe's offline miner: beam search over the policy's proposals, scored by the lookahead
evaluator (pagellm/models/lookahead.py), for high-value pages to distill into the policy.

At each step every beam proposes the policy's `expand` most likely next items (constrained
as decoding is: known items, none twice, none excluded); each proposal is scored by the
beam's value plus the evaluator's gain for it given the beam's prefix, and the `beam` best
(beam, item) pairs over all proposals go on. The policy proposes and the evaluator
chooses: pages stay within what the policy would plausibly write, so distillation moves
it a short way, towards what the evaluator values. Every step also records the proposals
and their gains, the soft labels of the distillation (pagellm/train/distill_loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.models.decoding import _EvalMode, _forward, _step_logprobs, exclusion_mask, first_item_logits, left_pad
from pagellm.models.positions import position_ids, prompt_anchor


@dataclass
class MinedPage:
    items: list[int]
    value: float  # the evaluator's V_K
    proposals: list[list[int]]  # per step: the items the beam chose among
    gains: list[list[float]]  # per step: the evaluator's gain of each proposal


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


@torch.no_grad()
def mine_pages(policy, evaluator, layout, prompts: list[list[int]], exclude: list, k: int, beam: int, expand: int,
               ) -> list[list[MinedPage]]:
    """`beam` distinct pages of k items per prompt (best value first). `prompts`: token ids
    (PromptEncoder.encode_prompt); `exclude[p]`: items prompt p's pages may not hold."""
    device = next(policy.parameters()).device
    n = layout.n_items
    base_blocked = exclusion_mask(exclude, len(prompts), n, device)
    # One beam per prompt at the start (an empty prefix): distinct pages follow, since two
    # beams of one prompt never share a prefix and never extend by the same item.
    beams: list[list[MinedPage]] = [[MinedPage([], 0.0, [], [])] for _ in prompts]
    with _EvalMode(policy), _EvalMode(evaluator):
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
            row_first = None if first is None else first[owner]
            logp = _step_logprobs(logits, layout, blocked, t, k, 1.0, row_first)[:, :n]
            width = min(expand, int((~blocked).sum(dim=1).min()))
            if width < 1:
                raise ValueError(f"step {t}: a prompt has no item left to place (k={k} too large for its exclusions)")
            proposal_logp, proposal = logp.topk(width, dim=1)
            gains = _last_gains(evaluator, row_prompts, prefix, layout.pad_id).float().gather(1, proposal)
            new_beams: list[list[MinedPage]] = [[] for _ in prompts]
            for p in range(len(prompts)):
                mine = [r for r, (q, _) in enumerate(rows) if q == p]
                scored = [(beams[p][rows[r][1]].value + float(gains[r, j]), r, j)
                          for r in mine for j in range(width) if torch.isfinite(proposal_logp[r, j])]
                for value, r, j in sorted(scored, key=lambda s: -s[0])[:beam]:
                    parent = beams[p][rows[r][1]]
                    new_beams[p].append(MinedPage(parent.items + [int(proposal[r, j])], value,
                                                  parent.proposals + [proposal[r].tolist()],
                                                  parent.gains + [gains[r].tolist()]))
            beams = new_beams
    return beams
