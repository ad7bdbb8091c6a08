"""Reward actor: the page reward's parts (the learned R_c + R_f, the verifiable hit NDCG) and
logprobs under the frozen SFT reference.

The reference is a copy of the SFT policy held here only under full fine-tuning; under
LoRA the rollout actors compute its outputs with their adapter disabled
(pagellm/rl/reference.py) and they arrive with the pages."""

from __future__ import annotations

import time

import ray
import torch

from pagellm.config import Config
from pagellm.models.decoding import constrained_logprobs
from pagellm.models.page_prior import PagePrior, first_item_preferences, item_categories
from pagellm.models.policy import load_policy, reference_is_base
from pagellm.models.reward_scorer import RewardScorer
from pagellm.rl.ppo_update import ScoredBatch, combine_parts, sequence_reward
from pagellm.rl.verifiable import hit_ndcg
from pagellm.vocab import load_tokenizer


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)
class RewardActor:
    """Stateless between calls (frozen models), so a restart plus a retried task gives the
    same scores: nothing is double-counted or lost."""

    def __init__(self, reward_dir: str, reference_dir: str, cfg: dict, data_dir: str) -> None:
        torch.set_num_threads(1)
        self.cfg = Config.model_validate(cfg)
        device = "cuda" if self.cfg.ppo.use_gpu and torch.cuda.is_available() else "cpu"
        # With model_reward_weight 0 the learned reward is not needed (nor trained).
        self.scorer = RewardScorer.load(reward_dir, device=device) if self.cfg.ppo.model_reward_weight > 0 else None
        self.reference = None
        if reference_is_base(reference_dir, self.cfg.model):
            _, self.layout = load_tokenizer(reference_dir)
        else:
            self.reference, _, self.layout = load_policy(reference_dir, trainable=False, device=device)
            self.reference.to(device).eval()
        self.prior = None
        if self.cfg.ppo.prior_reward_weight > 0:
            self.prior = PagePrior.load(reward_dir)
            if self.prior is None:
                raise FileNotFoundError(f"{reward_dir}: no page prior; rerun `pagellm reward` with reward.page_prior=true")
            self.item_cat = item_categories(data_dir)

    def score(self, rollout: dict) -> ScoredBatch:
        t0 = time.perf_counter()
        prompts, responses, exclude = rollout["prompts"], rollout["response_ids"], rollout["exclude"]
        ppo = self.cfg.ppo
        components, parts = {}, {}
        with torch.inference_mode():
            if self.scorer is not None:
                r_c, r_f = self.scorer.score_tokens(prompts, responses)
                r_c, r_f = torch.as_tensor(r_c, dtype=torch.float32), torch.as_tensor(r_f, dtype=torch.float32)
                components["model"] = sequence_reward(r_c, r_f, ppo.reward)
                parts.update(r_c=float(r_c.mean()), r_f=float(r_f.mean()))
            if self.prior is not None or ppo.hits_reward_weight > 0:
                pages = [[int(t) - self.layout.item_offset for t in row if self.layout.is_item_token(int(t))]
                         for row in responses.tolist()]
            if self.prior is not None:
                # The preference feature is the reference (SFT) policy's, as when the prior was fitted.
                pref = (rollout["preferences"] if self.reference is None
                        else first_item_preferences(self.reference, self.layout, prompts))
                components["prior"] = torch.as_tensor(self.prior.score(pref, pages, self.item_cat))
                parts["prior"] = float(components["prior"].mean())
            if ppo.hits_reward_weight > 0:
                components["hits"] = torch.as_tensor(hit_ndcg(pages, rollout["targets"], self.cfg.data.page_len))
                parts["hits"] = float(components["hits"].mean())
            if self.reference is None:
                ref_logprobs = rollout["ref_logprobs"]
            else:
                ref_logprobs, _, _ = constrained_logprobs(self.reference, self.layout, prompts, responses,
                                                          exclude=[set(e) for e in exclude],
                                                          temperature=self.cfg.ppo.temperature)
                ref_logprobs = ref_logprobs.cpu()
        return ScoredBatch(
            batch_id=rollout["batch_id"], policy_version=rollout["policy_version"], prompts=prompts,
            exclude=exclude, response_ids=responses, logprobs=rollout["logprobs"], ref_logprobs=ref_logprobs,
            reward=combine_parts(components, ppo), components=components,
            group_ids=torch.as_tensor(rollout["group_ids"], dtype=torch.long), reward_parts=parts,
            timings={"generate_s": rollout["generate_s"], "reference_s": rollout.get("reference_s", 0.0),
                     "score_s": time.perf_counter() - t0},
        )
