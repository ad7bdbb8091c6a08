"""How far a stage-3 policy moved from the SFT policy it started from, measured the same way
for every algorithm (PPO's own KL is per training batch; DPO and DeGRe have none):

    KL(π ‖ π_SFT) per page ≈ mean over pages y ~ π of  log π(y | x) − log π_SFT(y | x)

with pages sampled at temperature 1 under the evaluation's constraints (history excluded),
both log-likelihoods the constrained decoding ones (pagellm/models/decoding.py). Unbiased
(the k1 estimator); nats per page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def kl_to_reference(policy_dir: Path, reference_dir: Path, prompts: list[list[int]], exclude: list[set[int]],
                    k: int, samples: int, batch_size: int, seed: int) -> dict[str, float]:
    """`samples` pages per prompt from the policy; returns the mean and standard error of
    the per-page log-ratio (prompts: token ids; exclude: each prompt's banned items)."""
    from pagellm.models.decoding import constrained_logprobs, generate_pages
    from pagellm.models.evaluator import Guidance, prompt_items
    from pagellm.models.policy import load_policy

    policy, _, layout = load_policy(policy_dir, trainable=False)
    guidance = Guidance.load(policy_dir, layout)  # a guided policy's item term, as it serves
    # Each policy decodes with its own layout: the guided stage's page term lives there.
    reference, _, ref_layout = load_policy(reference_dir, trainable=False)
    policy.eval()
    reference.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = [i for i in range(len(prompts)) for _ in range(samples)]
    ratios: list[np.ndarray] = []
    with torch.inference_mode():
        for a in range(0, len(rows), batch_size):
            r = rows[a : a + batch_size]
            p, banned = [prompts[i] for i in r], [exclude[i] for i in r]
            batch = generate_pages(policy, layout, p, k=k, mode="sample", exclude=banned, generator=generator,
                                   evaluator_scores=guidance.scores([prompt_items(layout, x) for x in p]))
            ref, _, _ = constrained_logprobs(reference, ref_layout, p, batch.response_ids, exclude=banned, k=k)
            ratios.append((batch.logprobs.sum(dim=1) - ref.sum(dim=1)).float().numpy())
    values = np.concatenate(ratios)
    return {"kl_to_sft": float(values.mean()), "kl_to_sft_se": float(values.std(ddof=1) / np.sqrt(len(values)))
            if len(values) > 1 else 0.0}
