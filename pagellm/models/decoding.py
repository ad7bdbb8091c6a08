"""Constrained page decoding: a page is K distinct, allowed item tokens and then <eos>.

The rule at response position t (t = 0..K), given the items already on the page:
  - an item is allowed iff t < K, it is not on the page yet and not excluded;
  - <eos> is allowed iff no item is allowed (t == K, or every item is used or excluded).
So <eos> is always the only choice when it is allowed, and a page is shorter than K only
when fewer than K items were allowed for that prompt (its row then ends early, padded).

Every token's log-probability is taken under that constrained distribution (masked, then
temperature-scaled, renormalised over item tokens + eos). `generate_pages` and
`constrained_logprobs` share `_step_logprobs`, so a teacher-forced pass reproduces the
behaviour logprobs of a rollout exactly (up to float noise between cached and uncached
attention) — the PPO ratio starts at 1.

The loop is written out instead of using HF generate + LogitsProcessors: it is short,
batched with left padding and a KV cache, and hands back the exact constrained logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.models.positions import check_context, position_ids, prompt_anchor
from pagellm.vocab import TokenLayout

MODES = ("greedy", "sample")


@dataclass
class PageBatch:
    """Pages for a batch of prompts; tensors live on the model's device.

    items:          item indices per page (length k, fewer only if fewer were allowed)
    sequences:      [B, L + k + 1] left-padded prompt followed by the response
    attention_mask: [B, L + k + 1] 1 on prompt and response tokens, 0 on padding
    response_ids:   [B, k + 1] item tokens then eos, pad after an early eos
    logprobs:       [B, k + 1] constrained log-probability of each response token (0 on pad)
    response_mask:  [B, k + 1] True on real response tokens (items and eos)
    prompt_lens:    unpadded prompt lengths (the prompt occupies sequences[b, L - len:L])
    """

    items: list[list[int]]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    logprobs: torch.Tensor
    response_mask: torch.Tensor
    prompt_lens: list[int]

    @property
    def prompt_width(self) -> int:
        return self.sequences.shape[1] - self.response_ids.shape[1]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def left_pad(prompts: list[list[int]], pad_id: int, device, anchor: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) with prompts right-aligned, so every row's
    next token sits at the same column and one cached step serves the whole batch.
    Positions follow the model's scheme (`positions.prompt_anchor`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = position_ids(mask, [len(p) for p in prompts], anchor)
    return ids.to(device), mask.to(device), positions.to(device)


def exclusion_mask(exclude, batch: int, n_items: int, device) -> torch.Tensor:
    """Bool [B, n_items], True where the item may not appear on that row's page."""
    mask = torch.zeros((batch, n_items), dtype=torch.bool)
    if exclude is None:
        return mask.to(device)
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} entries for {batch} prompts")
    for row, items in enumerate(exclude):
        items = [int(i) for i in items]
        bad = [i for i in items if not 0 <= i < n_items]
        if bad:
            raise ValueError(f"exclude[{row}] holds item indices outside 0..{n_items - 1}: {bad[:5]}")
        mask[row, items] = True
    return mask.to(device)


def first_item_logits(logits: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
    """The item logits [N, n_items] of a page's first position, which model.ranking_prior
    adds to every later position's; None when the policy has no ranking prior."""
    if not layout.ranking_prior:
        return None
    return logits[:, layout.item_offset : layout.item_offset + layout.n_items].float()


class RepeatCounter:
    """Per row, how many placed page items share each category: the state of
    layout.repeat_penalty (the guided stage's page term). A no-op when the layout has none."""

    def __init__(self, layout: TokenLayout, rows: int, device):
        self.active = bool(layout.repeat_penalty) and layout.item_category is not None
        if not self.active:
            return
        self.layout = layout
        cat = torch.as_tensor(layout.item_category, dtype=torch.long, device=device)
        self.has_cat = cat >= 0
        self.cat = cat.clamp(min=0)
        self.counts = torch.zeros((rows, int(self.cat.max()) + 1 if len(cat) else 1), device=device)

    def penalty(self, t: int) -> torch.Tensor | None:
        """[N, n_items] to subtract from the item logits at position t (None: nothing)."""
        if not self.active or t >= self.layout.page_positions:
            return None
        return self.layout.repeat_penalty * self.counts[:, self.cat] * self.has_cat

    def place(self, rows: torch.Tensor, items: torch.Tensor) -> None:
        """Rows `rows` placed item indices `items` (eos rows left out by the caller)."""
        if self.active and len(rows):
            keep = self.has_cat[items]
            self.counts.index_put_((rows[keep], self.cat[items[keep]]), torch.ones_like(rows[keep], dtype=self.counts.dtype),
                                   accumulate=True)


class ItemBias:
    """The guided stage's additive item terms, in units of the policy's own ranking:

        w x s x z_e(i)        every position: the evaluator's scores for the row's user,
                              standardised over items (layout.evaluator_weight);
        b x s x q(i)          page positions only (the first layout.page_positions): the page
                              prior's standardised item quality, alike for every user
                              (layout.quality_weight, layout.item_quality).

    s: the standard deviation of the row's first-position item logits, so that w and b are in
    the units of the policy's own ranking (w = 0.5: half a policy-ranking standard deviation
    per evaluator one, whatever either model's scale). From t = 1 on the decoding also adds
    layout.ranking_prior x the first-position logits, so the terms grow by the same factor
    (1 + ranking_prior) and keep their weight against the policy's ranking at every position.
    A no-op when the layout has neither weight; an error when it has an evaluator weight and
    no scores were given (a guided policy decoded without its evaluator would be another
    policy)."""

    def __init__(self, layout: TokenLayout, scores: torch.Tensor | None, rows: int, device):
        self.weight = float(layout.evaluator_weight or 0.0)
        self.quality_weight = float(layout.quality_weight or 0.0)
        self.ranking_prior = float(layout.ranking_prior or 0.0)
        self.page_positions = int(layout.page_positions)
        self.item_bias = self.page_bias = None
        self.z = self.q = None
        if self.quality_weight:
            if layout.item_quality is None or len(layout.item_quality) != layout.n_items:
                raise ValueError(f"layout.quality_weight is {self.quality_weight:g} but item_quality has "
                                 f"{'no' if layout.item_quality is None else len(layout.item_quality)} entries "
                                 f"for {layout.n_items} items")
            self.q = torch.as_tensor(layout.item_quality, dtype=torch.float32, device=device)[None, :]
        if not self.weight:
            return
        if scores is None:
            raise ValueError(f"this policy's layout adds an evaluator's item scores at weight {self.weight:g} "
                             "(the guided stage); pass evaluator_scores (pagellm.models.evaluator.ItemEvaluator)")
        scores = torch.as_tensor(scores, dtype=torch.float32, device=device)
        if scores.shape != (rows, layout.n_items):
            raise ValueError(f"evaluator_scores has shape {tuple(scores.shape)}, expected ({rows}, {layout.n_items})")
        std = scores.std(dim=-1, keepdim=True)
        self.z = (scores - scores.mean(dim=-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))

    def start(self, first_logits: torch.Tensor, layout: TokenLayout) -> None:
        """Scale the terms by each row's first-position item logits [N, V] (called once)."""
        self.start_items(first_logits[:, layout.item_offset : layout.item_offset + layout.n_items])

    def start_items(self, item_logits: torch.Tensor) -> None:
        """`start` from the first position's item logits (or log-probabilities: same spread) [N, n_items]."""
        if not (self.weight or self.quality_weight):
            return
        spread = item_logits.float().std(dim=-1, keepdim=True)
        if self.weight:
            self.item_bias = self.weight * spread * self.z
        if self.quality_weight:
            self.page_bias = self.quality_weight * spread * self.q

    def at(self, t: int) -> torch.Tensor | None:
        bias = self.item_bias
        if self.page_bias is not None and t < self.page_positions:
            bias = self.page_bias if bias is None else bias + self.page_bias
        if bias is None:
            return None
        return bias if t == 0 else bias * (1.0 + self.ranking_prior)


def _step_logprobs(
    logits: torch.Tensor, layout: TokenLayout, blocked: torch.Tensor, t: int, k: int, temperature: float,
    first: torch.Tensor | None = None, penalty: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Constrained log-probabilities over [item_0..item_{n-1}, eos] at position t.

    logits [N, V]; blocked [N, n_items] (used or excluded); `first`: the page's first
    position's item logits (first_item_logits), added with weight layout.ranking_prior from
    t = 1 on: the page model times its own next-item ranking; `penalty` [N, n_items]:
    subtracted from the item logits (RepeatCounter.penalty); `bias` [N, n_items]: added to
    them (ItemBias.at). Returns [N, n_items + 1].
    """
    lo, hi = layout.item_offset, layout.item_offset + layout.n_items
    items = logits[:, lo:hi].float()
    if first is not None and t > 0:
        items = items + layout.ranking_prior * first
    if penalty is not None:
        items = items - penalty
    if bias is not None:
        items = items + bias
    scores = torch.cat([items, logits[:, layout.eos_id : layout.eos_id + 1].float()], dim=-1)
    scores = scores / temperature
    items_ok = ~blocked if t < k else torch.zeros_like(blocked)
    eos_ok = ~items_ok.any(dim=-1, keepdim=True)
    allowed = torch.cat([items_ok, eos_ok], dim=-1)
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)


def _forward(model, ids, mask, positions, past=None, keep: int = 1, cache: bool = True, hidden: bool = False):
    # logits_to_keep: only the positions that are scored get the (vocab-wide) lm_head.
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=past,
        use_cache=cache,
        logits_to_keep=keep,
        output_hidden_states=hidden,
    )


class _EvalMode:
    """Dropout off while decoding; every submodule's own train/eval flag comes back afterwards
    (a wrapper and the model inside it may differ)."""

    def __init__(self, model):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


def generate_pages(
    model,
    layout: TokenLayout,
    prompts: list[list[int]],
    k: int,
    mode: str = "greedy",
    exclude: list | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    evaluator_scores: torch.Tensor | None = None,
) -> PageBatch:
    """Write one page of k items per prompt. Greedy = argmax (evaluation, serving), sample =
    multinomial (PPO rollouts; pass a `generator` on the model's device for reproducibility).
    `evaluator_scores` [B, n_items]: the guided stage's evaluator's scores per prompt, needed
    (and only used) when layout.evaluator_weight > 0 (ItemBias)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = _device(model)
    check_context(model, max(len(p) for p in prompts), k + 1)
    ids, mask, positions = left_pad(prompts, layout.pad_id, device, prompt_anchor(model))
    blocked = exclusion_mask(exclude, len(prompts), layout.n_items, device)
    guide = ItemBias(layout, evaluator_scores, len(prompts), device)
    with _EvalMode(model), torch.no_grad():
        tokens, logps, done_at = _token_by_token(model, layout, ids, mask, positions, blocked, k,
                                                 temperature, mode, generator, guide)
    steps = torch.arange(k + 1, device=device)
    response_mask = steps[None, :] <= done_at[:, None]
    tokens = tokens.masked_fill(~response_mask, layout.pad_id)
    logps = logps.masked_fill(~response_mask, 0.0)
    items = [[int(t) - layout.item_offset for t in row[: int(n)]] for row, n in zip(tokens.tolist(), done_at.tolist())]
    return PageBatch(
        items=items,
        sequences=torch.cat([ids, tokens], dim=1),
        attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        response_ids=tokens,
        logprobs=logps,
        response_mask=response_mask,
        prompt_lens=[len(p) for p in prompts],
    )


def _token_of(choice: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Slot in [items..., eos] -> token id."""
    return torch.where(choice == layout.n_items, torch.full_like(choice, layout.eos_id), choice + layout.item_offset)


def _token_by_token(model, layout, ids, mask, positions, blocked, k, temperature, mode, generator, guide):
    batch, device = ids.shape[0], ids.device
    rows = torch.arange(batch, device=device)
    tokens = torch.full((batch, k + 1), layout.pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, k + 1), device=device)
    done_at = torch.full((batch,), k, dtype=torch.long, device=device)  # position of each row's eos
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    blocked = blocked.clone()
    out = _forward(model, ids, mask, positions)
    past, last_pos = out.past_key_values, positions[:, -1:]
    first = first_item_logits(out.logits[:, -1], layout)
    guide.start(out.logits[:, -1], layout)
    repeats = RepeatCounter(layout, batch, device)
    for t in range(k + 1):
        logp = _step_logprobs(out.logits[:, -1], layout, blocked, t, k, temperature, first, repeats.penalty(t),
                              guide.at(t))
        if mode == "greedy":
            choice = logp.argmax(dim=-1)
        else:
            choice = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tokens[:, t] = _token_of(choice, layout)
        logps[:, t] = logp[rows, choice]
        is_eos = (choice == layout.n_items) & ~done
        done_at = torch.where(is_eos, torch.full_like(done_at, t), done_at)
        done |= is_eos
        item_rows = ~done
        blocked[rows[item_rows], choice[item_rows]] = True
        repeats.place(rows[item_rows], choice[item_rows])
        if bool(done.all()) or t == k:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        out = _forward(model, tokens[:, t : t + 1], mask, last_pos, past=past)
        past = out.past_key_values
    return tokens, logps, done_at


def _response_tensor(responses, layout: TokenLayout, width: int | None, device) -> torch.Tensor:
    if isinstance(responses, torch.Tensor):
        return responses.to(device=device, dtype=torch.long)
    width = width or max(len(r) for r in responses)
    out = torch.full((len(responses), width), layout.pad_id, dtype=torch.long)
    for row, resp in enumerate(responses):
        if len(resp) > width:
            raise ValueError(f"response {row} has {len(resp)} tokens, more than k + 1 = {width}")
        out[row, : len(resp)] = torch.as_tensor(list(resp), dtype=torch.long)
    return out.to(device)


def constrained_logprobs(
    model,
    layout: TokenLayout,
    prompts: list[list[int]],
    responses,
    exclude: list | None = None,
    k: int | None = None,
    temperature: float = 1.0,
    return_hidden: bool = False,
    evaluator_scores: torch.Tensor | None = None,
):
    """Teacher-forced constrained logprobs of given pages in one forward pass.

    responses: token ids per page (items then eos; a [B, T] tensor may carry padding after
    eos, as PageBatch.response_ids does; lists are padded to the longest). k defaults to
    T - 1, which is the k a PageBatch was generated with.
    Returns (logprobs [B, T], entropy [B, T], mask [B, T]) and, with return_hidden, the last
    hidden layer [B, T, H] at the positions that predict each response token (the state a
    value head scores). Runs with the caller's grad mode and train/eval mode: the learner
    takes gradients through it; put the model in eval() to match rollout logprobs.
    `evaluator_scores`: as in generate_pages, for a layout with an evaluator weight.
    """
    device = _device(model)
    resp = _response_tensor(responses, layout, None if k is None else k + 1, device)
    batch, width = resp.shape
    if batch != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {batch} responses")
    is_eos = resp == layout.eos_id
    ended = is_eos.cumsum(dim=1)
    mask = (ended == 0) | (is_eos & (ended == 1))  # up to and including the first eos
    is_item = layout.is_item_token(resp) & mask
    bad = mask & ~is_item & ~is_eos
    if bad.any():
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"response {row} holds non-item token {int(resp[row, col])} at position {col}")
    k = width - 1 if k is None else k
    if width > k + 1:
        raise ValueError(f"responses are {width} tokens wide, more than k + 1 = {k + 1}")

    check_context(model, max(len(p) for p in prompts), width)
    ids, prompt_mask, _ = left_pad(prompts, layout.pad_id, device)
    full_ids = torch.cat([ids, resp.masked_fill(~mask, layout.pad_id)], dim=1)
    full_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    positions = position_ids(full_mask, [len(p) for p in prompts], prompt_anchor(model))
    out = _forward(model, full_ids, full_mask, positions, keep=width + 1, cache=False, hidden=return_hidden)
    logits = out.logits[:, :width]  # position L-1+t predicts response token t

    blocked = exclusion_mask(exclude, batch, layout.n_items, device)
    slot = torch.where(is_item, resp - layout.item_offset, torch.full_like(resp, layout.n_items))
    rows = torch.arange(batch, device=device)
    logps, entropies = [], []
    first = first_item_logits(logits[:, 0], layout)
    guide = ItemBias(layout, evaluator_scores, batch, device)
    guide.start(logits[:, 0], layout)
    repeats = RepeatCounter(layout, batch, device)
    for t in range(width):
        step = _step_logprobs(logits[:, t], layout, blocked, t, k, temperature, first, repeats.penalty(t),
                              guide.at(t))
        logps.append(step[rows, slot[:, t]])
        entropies.append(_entropy(step))
        item_rows = is_item[:, t]
        blocked[rows[item_rows], slot[item_rows, t]] = True
        repeats.place(rows[item_rows], slot[item_rows, t])
    logprobs = torch.stack(logps, dim=1).masked_fill(~mask, 0.0)
    entropy = torch.stack(entropies, dim=1).masked_fill(~mask, 0.0)
    if torch.isinf(logprobs).any():
        row, col = torch.isinf(logprobs).nonzero()[0].tolist()
        raise ValueError(f"response {row}, position {col}: token breaks the page constraints (repeat, excluded or eos)")
    if not return_hidden:
        return logprobs, entropy, mask
    prompt_width = ids.shape[1]
    hidden = out.hidden_states[-1][:, prompt_width - 1 : prompt_width - 1 + width]
    return logprobs, entropy, mask, hidden


def first_item_logprobs(logits: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """[N, n_items] from the logits [N, V] after a prompt: each item's log-probability as the
    page's first token, normalised over item tokens (the constrained first step with nothing
    excluded)."""
    blocked = torch.zeros((logits.shape[0], layout.n_items), dtype=torch.bool, device=logits.device)
    return _step_logprobs(logits, layout, blocked, 0, 1, 1.0)[:, : layout.n_items]


def first_position_terms(layout: TokenLayout, first_logprobs: torch.Tensor,
                         evaluator_scores: torch.Tensor | None = None) -> torch.Tensor:
    """first_logprobs [N, n_items] (first_item_scores) plus the guided terms the decoding adds at
    a page's first position (ItemBias.at(0)): the published policy's ranking of every item,
    which the full-ranking track scores. Unchanged for a layout without guided terms."""
    guide = ItemBias(layout, evaluator_scores, first_logprobs.shape[0], first_logprobs.device)
    guide.start_items(first_logprobs)
    bias = guide.at(0)
    return first_logprobs if bias is None else first_logprobs + bias


def first_item_scores(model, layout: TokenLayout, prompts: list[list[int]]) -> torch.Tensor:
    """[B, n_items] first_item_logprobs of each prompt (one forward pass); the full-ranking
    track masks training items itself."""
    device = _device(model)
    check_context(model, max(len(p) for p in prompts), 1)
    ids, mask, positions = left_pad(prompts, layout.pad_id, device, prompt_anchor(model))
    with _EvalMode(model), torch.no_grad():
        logits = _forward(model, ids, mask, positions, cache=False).logits[:, -1]
    return first_item_logprobs(logits, layout)
