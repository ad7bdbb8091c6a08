"""Position ids of [prompt | page] rows, and the context limit they must fit in.

Two schemes, chosen by `model.positions` and stored in the model's own config (so every
stage that loads the policy uses the one it was trained with):

- "start": positions count from each row's first real token (the LM default).
- "prompt_end": positions count back from the end of the prompt, so the first page token
  always sits at the anchor (half the context) and the most recent history item always
  just before it. With learned absolute positions (GPT-2) this is what lets a position
  embedding mean "how recent", as SASRec's right-aligned window does; counted from the
  start, the same recent item sits at a different position for every history length,
  and on leave-one-out data the model overfit where SASRec did not (docs/BENCHMARKS.md).
  Rotary models (Llama) see only distances, so for them the two schemes are the same.

Every forward of a policy or a reward model on such rows takes its position ids from
`position_ids`; every length check goes through `check_context`.
"""

from __future__ import annotations

import torch

ANCHOR_ATTR = "pagellm_prompt_anchor"  # an int in the model's config.json, absent for "start"


def _config(model):
    return getattr(getattr(model, "module", model), "config", None)


def context_limit(model) -> int | None:
    """The model's number of positions (GPT-2 n_positions, Llama max_position_embeddings)."""
    config = _config(model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def set_positions(model, scheme: str) -> None:
    """Record the scheme on the model's config (saved with it by save_pretrained)."""
    config = _config(model)
    if scheme == "start":
        if hasattr(config, ANCHOR_ATTR):
            delattr(config, ANCHOR_ATTR)
        return
    if scheme != "prompt_end":
        raise ValueError(f"model.positions must be 'start' or 'prompt_end', got {scheme!r}")
    limit = context_limit(model)
    if limit is None:
        raise ValueError("model.positions=prompt_end needs a model with a known number of positions")
    setattr(config, ANCHOR_ATTR, limit // 2)


def prompt_anchor(model) -> int | None:
    """The position of the first page token under "prompt_end"; None under "start"."""
    return getattr(_config(model), ANCHOR_ATTR, None)


def position_ids(attention_mask: torch.Tensor, prompt_lens: torch.Tensor | list[int], anchor: int | None) -> torch.Tensor:
    """[B, T] positions for rows of prompt then page, padded on either side.

    `prompt_lens`: real prompt tokens per row. Real tokens get consecutive positions; under
    an anchor, the token after the prompt gets `anchor`. Padding gets 0 (it is masked)."""
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1
    if anchor is not None:
        lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=mask.device)
        pos = pos + (anchor - lens)[:, None]
    return (pos * mask).clamp(min=0)


def prompt_room(model, response_len: int) -> int | None:
    """The longest prompt (tokens) that fits with a response of `response_len` tokens."""
    limit, anchor = context_limit(model), prompt_anchor(model)
    if limit is None:
        return None
    if anchor is None:
        return limit - response_len
    return anchor if anchor + response_len <= limit else 0


def check_context(model, prompt_len: int, response_len: int) -> None:
    """Fail with the fix in the message, not with an index error deep inside the model
    (GPT-2's learned positions stop at n_positions)."""
    room = prompt_room(model, response_len)
    if room is None or prompt_len <= room:
        return
    limit, anchor = context_limit(model), prompt_anchor(model)
    if anchor is None:
        need = f"need {prompt_len + response_len} positions but the model has {limit}"
    else:
        need = (f"do not fit: the model has {limit} positions and prompts end at position {anchor} "
                f"(model.positions=prompt_end)")
    raise ValueError(
        f"a prompt of {prompt_len} tokens and a page of {response_len} {need}; raise the "
        "model's n_positions/max_position_embeddings (model.init) or shorten the history or the page"
    )
