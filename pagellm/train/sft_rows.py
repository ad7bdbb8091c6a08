"""The rows SFT trains on and their batches (pagellm/train/sft.py trains on them; DeGRe's
distillation and the benches build them the same way).

A row is one token sequence: a prompt, then either a page (the page phase: golden pages,
or the policy's own greedy page with golden targets, sft.own_prefix) or nothing more (the
next-item phase: a user's training history, every item after the first a target). `collate`
pads a batch and turns the per-position targets and blocked items into index pairs the
item losses read.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from pagellm.models.positions import position_ids
from pagellm.vocab import PromptEncoder

IGNORE = -100


class TokenRows(Dataset):
    """Training rows (see `Row`); an empty list is a data problem, said so at once."""

    def __init__(self, rows: list["Row"]):
        if not rows:
            raise ValueError("no training rows: the data stage produced none for this configuration")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class Row(NamedTuple):
    """One training sequence.

    ids / labels: token ids, labels IGNORE where no loss is taken (label t is predicted
    from position t - 1). targets / blocked: one list per labelled token, in order: the
    item indices any of which is a right answer there (empty for <eos>), and the items
    masked out of that position's softmax (the page's constraints). The full-vocabulary
    loss reads `labels`; the item loss reads `targets` and `blocked`.
    """

    ids: list[int]
    labels: list[int]
    targets: list[list[int]]
    blocked: list[list[int]]
    prompt_len: int  # tokens before the page (a meta row's page is its last item)
    page: bool = True  # a prompt → page row; False: a next-item history row (history_rows)


def page_rows(encoder: PromptEncoder, users, prompts, pages, user_dropout: float, seed: int,
              page_loss: str = "sequence") -> list[Row]:
    """prompt → page rows; a seeded `user_dropout` share is added again without the user
    token, so the policy can serve a user it has never seen from their history alone.

    Position t of the page may not repeat the prompt or items 0..t-1 (what constrained
    decoding allows); its target is item t (`sequence`) or any of items t.. (`set`)."""
    if page_loss not in ("sequence", "set"):
        raise ValueError(f"page_loss must be 'sequence' or 'set', got {page_loss!r}")
    rng = np.random.default_rng(seed)
    with_users = encoder.layout.user_tokens
    rows = []
    for user, prompt, page in zip(users, prompts, pages):
        page, prompt = [int(i) for i in page], [int(i) for i in prompt]
        page_ids = encoder.encode_page(page)
        targets = [page[t:] if page_loss == "set" else [page[t]] for t in range(len(page))] + [[]]
        blocked = [prompt + page[:t] for t in range(len(page) + 1)]
        copies = [int(user)] + ([None] if with_users and rng.random() < user_dropout else [])
        for u in copies:
            prompt_ids = encoder.encode_prompt(u, prompt)
            rows.append(Row(prompt_ids + page_ids, [IGNORE] * len(prompt_ids) + page_ids, targets, blocked,
                            len(prompt_ids)))
    return rows


def own_prefix_rows(model, layout, encoder: PromptEncoder, rows: list[Row]) -> list[Row]:
    """Page rows (`set` targets) rewritten on the policy's own greedy page (sft.own_prefix).

    Teacher forcing conditions position t on golden items 0..t-1, but decoding conditions it
    on the model's own guesses, mostly wrong on held-out data: a policy trained only on
    golden prefixes reads its first guess as a hit and fills the page with its neighbours,
    and the written page loses to its own next-item ranking (docs/BENCHMARKS.md). Here the
    prefix is what greedy decoding writes (the prompt's items excluded, as in training) and
    position t's targets are the golden items not on it yet: after a wrong guess every
    golden item is still the answer. Greedy pages are prefix-consistent, so one pass of the
    longest page serves every row."""
    from pagellm.models.decoding import generate_pages

    prompts = [row.ids[: row.prompt_len] for row in rows]
    golden = [row.targets[0] for row in rows]  # under `set`, position 0's targets are the whole page
    banned = [row.blocked[0] for row in rows]  # the prompt's items
    with torch.no_grad():
        written = generate_pages(model, layout, prompts, k=max(len(g) for g in golden), exclude=banned).items
    out = []
    for row, prompt, page, gold, ban in zip(rows, prompts, written, golden, banned):
        page = page[: len(gold)]
        targets = [[g for g in gold if g not in page[:t]] for t in range(len(page))] + [[]]
        blocked = [ban + page[:t] for t in range(len(page) + 1)]
        page_ids = encoder.encode_page(page)
        out.append(Row(prompt + page_ids, [IGNORE] * len(prompt) + page_ids, targets, blocked, row.prompt_len))
    return out


def own_prefix_batch(model, layout, encoder: PromptEncoder, batch: list[Row], share: float) -> list[Row]:
    """A step's rows with its first `share` rewritten by `own_prefix_rows` (the batch order
    is shuffled each epoch, so they are a random share); replayed history rows
    (sft.history_replay) among them have no page to rewrite and stay as they are."""
    n = round(share * len(batch))
    rewrite = [row for row in batch[:n] if row.page]
    kept = [row for row in batch[:n] if not row.page] + batch[n:]
    return (own_prefix_rows(model, layout, encoder, rewrite) if rewrite else []) + kept


def history_rows(encoder: PromptEncoder, users, histories, max_items: int, scored=None,
                 block_seen: bool = False) -> list[Row]:
    """Meta pre-training rows: SASRec's task on the policy's own prompt format.

    The history but its last item is the prompt and the last item is a one-item page, so
    every history item after the first predicts the next one and the prompt's end (where
    every page starts) predicts the last; no item is masked, as in SASRec.
    `scored`: per row, how many of its last items carry a loss (validation rows score only
    the held-out items: their training items are in the training rows already).
    `block_seen` (sft.meta_block_seen): each position's softmax masks the items before it,
    as decoding and the evaluation mask the history; the target itself stays allowed."""
    layout = encoder.layout
    rows = []
    for n, (user, items) in enumerate(zip(users, histories)):
        items = [int(i) for i in list(items)[-max_items:]]
        if len(items) < 2:
            continue
        ids = encoder.encode_prompt(int(user), items[:-1]) + [layout.item_token(items[-1])]
        labels = [t if layout.is_item_token(t) else IGNORE for t in ids]
        labels[labels.index(layout.item_token(items[0]))] = IGNORE  # nothing before it to predict from
        if scored is not None:
            keep = [i for i, t in enumerate(labels) if t != IGNORE][-int(scored[n]):] if scored[n] else []
            labels = [t if i in keep else IGNORE for i, t in enumerate(labels)]
        targets = [[layout.token_to_item(t)] for t in labels if t != IGNORE]
        blocked = [[] for _ in targets]
        if block_seen:
            # Label k is predicted at token k - 1; the items among ids[:k] came before it.
            at = [k for k, t in enumerate(labels) if t != IGNORE]
            blocked = [sorted({layout.token_to_item(t) for t in ids[:k] if layout.is_item_token(t)} - set(target))
                       for k, target in zip(at, targets)]
        rows.append(Row(ids, labels, targets, blocked, len(ids) - 1, page=False))
    return rows


def replay_sample(rows: list[Row], share: float, seed: int) -> list[Row]:
    """A fixed, seeded `share` of `rows` (sft.history_replay), in their original order."""
    if share >= 1.0:
        return list(rows)
    keep = np.random.default_rng(seed).random(len(rows)) < share
    return [row for row, k in zip(rows, keep) if k]


def _coo(lists: list[list[int]], base: int) -> list[tuple[int, int]]:
    return [(base + n, item) for n, items in enumerate(lists) for item in items]


def collate(batch: list[Row], pad_id: int, anchor: int | None = None):
    """Right-pad to the longest row; position ids follow the policy's scheme (`anchor`:
    positions.prompt_anchor); targets and blocked become (position, item) index pairs over
    the batch's labelled tokens in row-major order (the order of labels != IGNORE)."""
    width = max(len(row.ids) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    targets, blocked, label_rows, base = [], [], [], 0
    for r, row in enumerate(batch):
        input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
        labels[r, : len(row.labels)] = torch.tensor(row.labels)
        attention[r, : len(row.ids)] = 1
        n_labels = sum(label != IGNORE for label in row.labels[1:])
        if n_labels != len(row.targets) or n_labels != len(row.blocked):
            raise ValueError(f"row {r}: {n_labels} labelled tokens but {len(row.targets)} target lists")
        targets += _coo(row.targets, base)
        blocked += _coo(row.blocked, base)
        label_rows += [r] * n_labels
        base += n_labels

    def pairs(coo):
        return torch.tensor(coo, dtype=torch.long).reshape(-1, 2).T.contiguous()

    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "position_ids": position_ids(attention, [row.prompt_len for row in batch], anchor),
            "targets": pairs(targets), "blocked": pairs(blocked),
            "label_rows": torch.tensor(label_rows, dtype=torch.long),  # the row of each labelled token
            "page_rows": torch.tensor([row.page for row in batch], dtype=torch.bool)}
