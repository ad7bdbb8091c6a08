"""Rollout actor: samples pages with constrained decoding under the newest weights it has."""

from __future__ import annotations

import time

import ray
import torch

from pagellm.config import Config
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import load_weights, reference_is_base, stage3_policy
from pagellm.rl.reference import reference_outputs


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)
class RolloutActor:
    """Ray restarts a crashed actor and retries its task; the new process re-fetches the
    newest weights from the broker, so a retried batch is sampled from current weights and
    the learner's staleness check still holds.

    Under LoRA the actor holds the merged SFT base once, with the learner's adapter on top:
    it also computes the SFT reference's outputs (adapter disabled) for the reward actors,
    which then need no copy of the policy."""

    def __init__(self, policy_dir: str, cfg: dict, broker_name: str) -> None:
        # The broker comes by name, not as a handle: an actor handle among the constructor
        # arguments of a restartable actor makes Ray warn that a restart may lose them.
        torch.set_num_threads(1)  # one core per actor; the box has few
        self.cfg = Config.model_validate(cfg)
        self.model, _, self.layout = stage3_policy(policy_dir, self.cfg.model, trainable=False, seed=self.cfg.seed)
        self.computes_reference = reference_is_base(policy_dir, self.cfg.model)
        self.device = "cuda" if self.cfg.ppo.use_gpu and torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.version = 0
        version, ref = ray.get(ray.get_actor(broker_name).latest.remote())
        if ref:
            self.set_weights(version, ray.get(ref[0]))

    def set_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        load_weights(self.model, weights)
        self.version = version
        return version

    def generate(self, batch_id: int, prompts: list[list[int]], exclude: list[list[int]], targets: list[list[int]],
                 group_ids: list[int], seed: int) -> dict:
        """Sample one page per prompt row (a prompt repeated n times gets n independent
        pages); targets and group ids ride along for the reward actor."""
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            pages = generate_pages(self.model, self.layout, prompts, k=self.cfg.data.page_len, mode="sample",
                                   exclude=[set(e) for e in exclude], temperature=self.cfg.ppo.temperature,
                                   generator=generator)
        out = {"batch_id": batch_id, "policy_version": self.version, "prompts": prompts, "exclude": exclude,
               "targets": targets, "group_ids": group_ids,
               "response_ids": pages.response_ids.cpu(), "logprobs": pages.logprobs.cpu(),
               "generate_s": time.perf_counter() - t0}
        if self.computes_reference:
            t1 = time.perf_counter()
            out.update(reference_outputs(self.model, self.layout, prompts, out["response_ids"], exclude,
                                         self.cfg.ppo.temperature, preferences=self.cfg.ppo.prior_reward_weight > 0))
            out["reference_s"] = time.perf_counter() - t1
        return out
