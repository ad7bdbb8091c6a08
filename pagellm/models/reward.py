"""The multi-grained reward model (docs/ARCHITECTURE.md §4): the SFT policy's transformer + two heads.

Input contract: one row per page, `[prompt || page]` where page = item tokens + eos, padded
on either side (`pad_pages` pads on the right). Position ids come from the attention mask
and the policy's position scheme (`positions.position_ids`, the prompt being what precedes
the first page item), so a row scores the same whatever its padding and whatever else is
in the batch, and at the positions the policy saw it at in SFT.

  coarse  R_c = w_c · h[last real token]        (the page's eos: it has seen the whole row)
  fine    r_k = w_slot(k) · h[k] + g_slot(k) · ℓ_k at each page item position k, where
          slot = 0 for the page's first item, 1 for the next..., and ℓ_k = h[k−1] · e_out(item_k)
          is the backbone's own (unnormalised) logit for putting that item there;
          R_f = mean over the page's real items

Why per-slot weights: a ranking pair holds the same items in a different order, so its
two pages differ only in *where* each item sits. A single linear r_k must read the page
slot out of h[k], whose absolute position shifts with the prompt's length; per-slot
weights let r_k value an item differently by slot (a learned, item-aware DCG discount).
All slots start from the same vector; slots past the table share its last row.

Why the logit term (gain initialised to 1, so the fine head starts as the SFT policy's
own placement score): the SFT policy was trained to write golden pages in order, and its
logit for "this item, here, after these" already separates ranking pairs (0.89 of
held-out ranking pairs on the tiny simulator run, before any reward training); a linear
readout of h[k] cannot compute that bilinear h[k−1]·e(item) score. Measured on the tiny
run (held-out users, R_f accuracy ranking / redundancy): one vector 0.59 / 0.73, per-slot
vectors 0.71 / 0.80 (5 epochs, 30% held out); per-slot vectors + logit term 0.87 / 0.98
(2 epochs, 10% held out; per-slot vectors alone 0.80 / 0.84 there).

Disabled heads are not built at all, so they hold no parameters to train or save.
The backbone is the policy's causal LM (kept whole so `save_policy`/`load_policy` handle
full and LoRA checkpoints), called through its inner transformer: only the page's item
positions go through the output layer (one [items, vocab] product for ℓ, never the
[rows, length, vocab] logits). An untied output layer is frozen (it only supplies ℓ).

A reward directory = a `save_policy` checkpoint (tokenizer + layout + backbone weights) plus
`reward_heads.safetensors` and `pagellm_reward.json` (heads, hidden size, slots, logit term).
`reward.logit_term: false` builds the fine head without ℓ_k: a reward that cannot score a
page by how likely the policy it judges was to write it (docs/BENCHMARKS.md has the
measured effect on reward fidelity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagellm.config import ModelConfig
from pagellm.models.policy import is_adapter_model, load_policy, save_policy
from pagellm.models.positions import position_ids, prompt_anchor
from pagellm.names import REWARD_HEADS
from pagellm.vocab import TokenLayout

HEADS_FILE = "reward_heads.safetensors"
REWARD_FILE = "pagellm_reward.json"
HEAD_CHOICES = REWARD_HEADS  # `reward.heads` value -> the heads built (pagellm/names.py)
DEFAULT_SLOTS = 16


def heads_for(choice: str) -> tuple[str, ...]:
    """Config value (`reward.heads`: sum | coarse | fine) -> the heads that exist."""
    if choice not in HEAD_CHOICES:
        raise ValueError(f"reward heads must be one of {sorted(HEAD_CHOICES)}, got {choice!r}")
    return HEAD_CHOICES[choice]


class CoarseHead(nn.Module):
    """hidden [N, H] at each row's last token -> R_c [N], in the head's own dtype (fp32 when
    scoring, so a bf16 backbone does not quantise the score)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(last_hidden.to(self.linear.weight.dtype)).squeeze(-1)


class FineHead(nn.Module):
    """Per-item scores from the hidden state at each item and the backbone's own logit for
    placing that item there; (R_f [N], r [N, T] with 0 off the items)."""

    def __init__(self, hidden_size: int, slots: int = DEFAULT_SLOTS, logit_term: bool = True):
        super().__init__()
        if slots < 1:
            raise ValueError(f"the fine head needs at least one slot, got {slots}")
        # No bias: a constant per item cancels in every Bradley–Terry difference.
        first = torch.randn(hidden_size) / math.sqrt(hidden_size + 1)
        self.slot_weight = nn.Parameter(first.repeat(slots, 1))
        # Without the logit term the gain is a fixed 0 (a buffer, not trained): the head reads
        # only h[k], so it cannot score a page by how likely the policy was to write it.
        self.logit_term = logit_term
        if logit_term:
            self.logit_gain = nn.Parameter(torch.ones(slots))
        else:
            self.register_buffer("logit_gain", torch.zeros(slots))

    def forward(
        self, hidden: torch.Tensor, item_mask: torch.Tensor, item_logit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = item_mask.bool()
        slot = (mask.long().cumsum(-1) - 1).clamp(0, self.slot_weight.shape[0] - 1)
        weights = self.slot_weight[slot]  # [N, T, H]
        per_item = (hidden.to(weights.dtype) * weights).sum(-1) + self.logit_gain[slot] * item_logit.to(weights.dtype)
        per_item = per_item * mask
        count = mask.sum(-1)
        # A page with no items has no fine-grained evidence: R_f = 0 (the mean of nothing).
        return per_item.sum(-1) / count.clamp(min=1), per_item


@dataclass
class RewardScores:
    """Per-row scores; a disabled head is None."""

    coarse: torch.Tensor | None
    fine: torch.Tensor | None
    per_item: torch.Tensor | None = None  # r_k [N, T] (fine head only)

    def by_head(self) -> dict[str, torch.Tensor]:
        return {name: s for name, s in (("coarse", self.coarse), ("fine", self.fine)) if s is not None}


def inner_transformer(policy) -> nn.Module:
    """The decoder stack without the LM head (GPT2Model, LlamaModel, ...), LoRA layers included."""
    model = policy.get_base_model() if is_adapter_model(policy) else policy
    inner = model.base_model
    if inner is model:
        raise TypeError(f"{type(model).__name__} has no inner transformer (base_model_prefix)")
    return inner


def _freeze_untied_output(policy) -> None:
    model = policy.get_base_model() if is_adapter_model(policy) else policy
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        return
    out_w, emb_w = getattr(out, "weight", None), getattr(emb, "weight", None)
    if out_w is not None and out_w is emb_w:
        return  # tied: the rows train through the input embedding
    out.requires_grad_(False)


class RewardModel(nn.Module):
    def __init__(self, policy, heads: Sequence[str], slots: int = DEFAULT_SLOTS, logit_term: bool = True):
        super().__init__()
        heads = tuple(heads)
        unknown = set(heads) - {"coarse", "fine"}
        if not heads or unknown:
            raise ValueError(f"heads must be a non-empty subset of (coarse, fine), got {heads}")
        self.policy = policy
        self.hidden_size = int(policy.config.hidden_size)
        self.slots = slots
        self.coarse = CoarseHead(self.hidden_size) if "coarse" in heads else None
        self.fine = FineHead(self.hidden_size, slots, logit_term) if "fine" in heads else None
        _freeze_untied_output(policy)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(n for n in ("coarse", "fine") if getattr(self, n) is not None)

    @property
    def config(self):  # what check_context and DeepSpeed look for on a model
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_mask: torch.Tensor) -> RewardScores:
        attention_mask = attention_mask.long()
        # The prompt is what precedes the first page item (every scored row has one).
        first_item = (item_mask & attention_mask.bool()).long().argmax(-1, keepdim=True)
        prompt_lens = attention_mask.cumsum(-1).gather(1, first_item).squeeze(1) - 1
        positions = position_ids(attention_mask, prompt_lens, prompt_anchor(self.policy))
        out = inner_transformer(self.policy)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        hidden = out.last_hidden_state
        coarse = fine = per_item = None
        if self.coarse is not None:
            # Last real token of each row, whichever side the padding is on.
            columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask * columns).argmax(-1)
            coarse = self.coarse(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        if self.fine is not None:
            items = item_mask & attention_mask.bool()
            logit = (self._item_logits(hidden, input_ids, items) if self.fine.logit_term
                     else torch.zeros(items.shape, dtype=hidden.dtype, device=hidden.device))
            fine, per_item = self.fine(hidden, items, logit)
        return RewardScores(coarse, fine, per_item)

    def _item_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[N, T]: the policy's (unnormalised) logit for each page item, read from the hidden
        state just before it; 0 elsewhere. Only item positions go through the output layer."""
        rows, cols = items.nonzero(as_tuple=True)
        if (cols == 0).any():
            raise ValueError("a page item sits at column 0: the row has no prompt before it")
        logits = self.policy.get_output_embeddings()(hidden[rows, cols - 1])
        picked = logits.gather(1, input_ids[rows, cols].unsqueeze(1)).squeeze(1)
        out = torch.zeros(items.shape, dtype=picked.dtype, device=picked.device)
        return out.index_put((rows, cols), picked)


def pad_pages(rows: Sequence[tuple[Sequence[int], Sequence[int]]], layout: TokenLayout) -> dict[str, torch.Tensor]:
    """[(prompt_ids, page_ids)] -> right-padded input_ids, attention_mask and item_mask.

    page_ids = item tokens then eos (PromptEncoder.encode_page). item_mask marks the page's
    item tokens (never prompt items, never eos or padding).
    """
    if not rows:
        raise ValueError("no rows to score")
    width = max(len(p) + len(q) for p, q in rows)
    ids = torch.full((len(rows), width), layout.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    items = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, page) in enumerate(rows):
        if not page or int(page[-1]) != layout.eos_id:
            raise ValueError(f"row {r}: a page must end with eos ({layout.eos_id}), got {list(page)[-3:]}")
        n, m = len(prompt), len(page)
        ids[r, : n + m] = torch.as_tensor(list(prompt) + list(page), dtype=torch.long)
        mask[r, : n + m] = 1
        items[r, n : n + m] = layout.is_item_token(ids[r, n : n + m])
    return {"input_ids": ids, "attention_mask": mask, "item_mask": items}


def reward_model_from_policy(
    policy_dir: str | Path, heads: Sequence[str], model_cfg: ModelConfig | None = None,
    slots: int = DEFAULT_SLOTS, device: str | torch.device | None = None, logit_term: bool = True,
):
    """(RewardModel, tokenizer, layout): a trainable backbone from a save_policy directory
    (the SFT output) with freshly initialised heads (seed them with torch.manual_seed)."""
    policy, tokenizer, layout = load_policy(policy_dir, model_cfg, trainable=True, device=device)
    return RewardModel(policy, heads, slots, logit_term), tokenizer, layout


def save_reward_model(
    model: RewardModel, tokenizer, layout: TokenLayout, directory: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a directory `load_reward_model` reads. `state_dict`: the full weights gathered by
    the trainer (keys as in `model.state_dict()`); None takes the model's own."""
    directory = Path(directory)
    if state_dict is None:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    backbone = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
    head_weights = {k: v.contiguous() for k, v in state_dict.items() if k.split(".")[0] in ("coarse", "fine")}
    missing = [h for h in model.heads if not any(k.startswith(h + ".") for k in head_weights)]
    if missing:
        raise ValueError(f"state_dict holds no weights for head(s) {missing}")
    save_policy(model.policy, tokenizer, layout, directory, state_dict=backbone)
    save_file(head_weights, str(directory / HEADS_FILE))
    meta = {"heads": list(model.heads), "hidden_size": model.hidden_size, "slots": model.slots,
            "logit_term": model.fine.logit_term if model.fine is not None else None}
    (directory / REWARD_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def load_reward_model(
    directory: str | Path, device: str | torch.device = "cpu", trainable: bool = False,
    model_cfg: ModelConfig | None = None,
):
    """(RewardModel, tokenizer, layout) from a `save_reward_model` directory, on `device`;
    frozen and in eval mode unless `trainable`."""
    directory = Path(directory)
    meta_path = directory / REWARD_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} missing: not a reward model directory (run `pagellm reward`)")
    meta = json.loads(meta_path.read_text())
    policy, tokenizer, layout = load_policy(directory, model_cfg, trainable=trainable, device=device)
    model = RewardModel(policy, meta["heads"], meta.get("slots", DEFAULT_SLOTS), meta.get("logit_term") is not False)
    if model.hidden_size != meta["hidden_size"]:
        raise ValueError(
            f"{directory}: backbone hidden size {model.hidden_size} != {meta['hidden_size']} in {REWARD_FILE}"
        )
    heads = load_file(str(directory / HEADS_FILE))
    for name in model.heads:
        part = {k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")}
        getattr(model, name).load_state_dict(part)
    model.to(device)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model, tokenizer, layout
