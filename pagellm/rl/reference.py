"""The frozen SFT reference of stage 3, computed inside the policy it wraps.

Under LoRA the stage-3 policy is the merged SFT policy plus a fresh adapter
(`pagellm/models/policy.py::stage3_policy`), so the SFT policy is that same model with its
adapter disabled: the process that holds the policy computes the reference's outputs
without a second copy of the base. Full fine-tuning has no such view and keeps a separate
reference copy (the reward actor's).
"""

from __future__ import annotations

import torch

from pagellm.models.decoding import constrained_logprobs
from pagellm.models.page_prior import first_item_preferences
from pagellm.vocab import TokenLayout


def reference_outputs(model, layout: TokenLayout, prompts: list[list[int]], response_ids: torch.Tensor,
                      exclude: list[list[int]], temperature: float, preferences: bool = False) -> dict:
    """{"ref_logprobs": [B, T] CPU, and with `preferences` "preferences": the page prior's
    [B, n_items] feature} of the pages under `model` with its adapter disabled: the SFT
    policy, whatever the adapter has learned since."""
    out = {}
    with torch.inference_mode(), model.disable_adapter():
        ref, _, _ = constrained_logprobs(model, layout, prompts, response_ids,
                                         exclude=[set(e) for e in exclude], temperature=temperature)
        out["ref_logprobs"] = ref.cpu()
        if preferences:
            out["preferences"] = first_item_preferences(model, layout, prompts)
    return out
