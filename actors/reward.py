"""Reward actor: R_c + R_f from the reward model and logprobs under the frozen SFT reference."""

from __future__ import annotations

import time

import ray
import torch

from pagellm.config import Config
from pagellm.models.decoding import constrained_logprobs
from pagellm.models.policy import load_policy
from pagellm.models.reward_scorer import RewardScorer
from pagellm.rl.ppo_update import ScoredBatch, sequence_reward


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)
class RewardActor:
    """Stateless between calls (frozen models), so a restart plus a retried task gives the
    same scores: nothing is double-counted or lost."""

    def __init__(self, reward_dir: str, reference_dir: str, cfg: dict) -> None:
        torch.set_num_threads(1)
        self.cfg = Config.model_validate(cfg)
        device = "cuda" if self.cfg.ppo.use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = RewardScorer.load(reward_dir, device=device)
        self.reference, _, self.layout = load_policy(reference_dir, trainable=False, device=device)
        self.reference.to(device).eval()

    def score(self, rollout: dict) -> ScoredBatch:
        t0 = time.perf_counter()
        prompts, responses, exclude = rollout["prompts"], rollout["response_ids"], rollout["exclude"]
        with torch.inference_mode():
            r_c, r_f = self.scorer.score_tokens(prompts, responses)
            r_c, r_f = torch.as_tensor(r_c, dtype=torch.float32), torch.as_tensor(r_f, dtype=torch.float32)
            ref_logprobs, _, _ = constrained_logprobs(self.reference, self.layout, prompts, responses,
                                                      exclude=[set(e) for e in exclude],
                                                      temperature=self.cfg.ppo.temperature)
            ref_logprobs = ref_logprobs.cpu()
        return ScoredBatch(
            batch_id=rollout["batch_id"], policy_version=rollout["policy_version"], prompts=prompts,
            exclude=exclude, response_ids=responses, logprobs=rollout["logprobs"], ref_logprobs=ref_logprobs,
            reward=sequence_reward(r_c, r_f, self.cfg.ppo.reward),
            reward_parts={"r_c": float(r_c.mean()), "r_f": float(r_f.mean())},
            timings={"generate_s": rollout["generate_s"], "score_s": time.perf_counter() - t0},
        )
