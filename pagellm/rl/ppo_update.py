"""One PPO update on a scored batch of pages: the learner's arithmetic, without Ray.

`PolicyWithValue` is the module DeepSpeed wraps: its forward takes a mini-batch and
returns the PPO loss, so every parameter the loss touches goes through the engine's
forward (which ZeRO-3's parameter gathering needs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagellm.config import PPOConfig
from pagellm.models.decoding import constrained_logprobs
from pagellm.rl.advantages import token_rewards
from pagellm.rl.losses import clipped_value_loss
from pagellm.rl.registry import get_advantage, get_policy_loss
from pagellm.rl.stats import RunningMoments, masked_mean, masked_whiten
from pagellm.rl.value_head import ValueHead
from pagellm.vocab import TokenLayout


@dataclass
class ScoredBatch:
    """Pages sampled by a rollout actor and scored by a reward actor."""

    batch_id: int
    policy_version: int  # the weights the pages were sampled with
    prompts: list[list[int]]
    exclude: list[list[int]]
    response_ids: torch.Tensor  # [B, T] items + eos, padded after eos
    logprobs: torch.Tensor  # [B, T] behaviour logprobs under the constrained distribution
    ref_logprobs: torch.Tensor  # [B, T] frozen SFT reference, same constraints
    reward: torch.Tensor  # [B] page reward before normalisation: the weighted sum of `components`
    components: dict[str, torch.Tensor]  # [B] per part: "model" (learned R), "hits" (verifiable), "prior"
    group_ids: torch.Tensor  # [B] batch-local prompt group: pages of one prompt share it
    reward_parts: dict[str, float]  # batch means of r_c / r_f / hits, for logging
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for logging

    def __len__(self) -> int:
        return len(self.prompts)


def merge_shards(shards: list[ScoredBatch]) -> ScoredBatch:
    """One batch from per-actor shards; its version is the oldest shard's (staleness is
    judged by the stalest pages in it)."""
    width = max(s.response_ids.shape[1] for s in shards)

    def cat(attr: str, pad: float) -> torch.Tensor:
        parts = [torch.nn.functional.pad(getattr(s, attr), (0, width - getattr(s, attr).shape[1]), value=pad)
                 for s in shards]
        return torch.cat(parts)

    n = sum(len(s) for s in shards)
    return ScoredBatch(
        batch_id=shards[0].batch_id,
        policy_version=min(s.policy_version for s in shards),
        prompts=[p for s in shards for p in s.prompts],
        exclude=[e for s in shards for e in s.exclude],
        response_ids=cat("response_ids", 0),  # anything after a page's eos is masked out
        logprobs=cat("logprobs", 0.0),
        ref_logprobs=cat("ref_logprobs", 0.0),
        reward=torch.cat([s.reward for s in shards]),
        components={k: torch.cat([s.components[k] for s in shards]) for k in shards[0].components},
        group_ids=torch.cat([s.group_ids for s in shards]),
        reward_parts={k: sum(s.reward_parts[k] * len(s) for s in shards) / n for k in shards[0].reward_parts},
        # Shards run side by side, so a stage took as long as its slowest shard.
        timings={k: max(s.timings.get(k, 0.0) for s in shards) for k in shards[0].timings},
    )


def admit_batch(batch_id: int, sampled_version: int, *, learner_version: int, next_batch: int,
                trained_ids: list[int], max_staleness: int) -> tuple[bool, int]:
    """(train it?, staleness) for a batch reaching the learner. Batches must arrive in id
    order and never twice (either would mean the driver lost track of the run's position);
    one sampled more than `max_staleness` versions ago is refused, to be dropped and counted."""
    if batch_id != next_batch:
        raise RuntimeError(f"batch {batch_id} arrived, expected {next_batch}: batches must be consumed in order")
    if batch_id in trained_ids:
        raise RuntimeError(f"batch {batch_id} would be trained twice")
    staleness = learner_version - sampled_version
    return staleness <= max_staleness, staleness


class PolicyWithValue(nn.Module):
    """The trainable policy plus a value head on its last hidden layer."""

    def __init__(self, policy: nn.Module, layout: TokenLayout, value_head: ValueHead, cfg: PPOConfig):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.layout = layout
        self.cfg = cfg

    def evaluate(self, prompts, response_ids, exclude):
        """(logprobs, entropy, mask, values) of the given pages under the current weights."""
        logprobs, entropy, mask, hidden = constrained_logprobs(
            self.policy, self.layout, prompts, response_ids, exclude=[set(e) for e in exclude],
            temperature=self.cfg.temperature, return_hidden=True,
        )
        return logprobs, entropy, mask, self.value_head(hidden)

    def forward(self, mb: dict) -> tuple[torch.Tensor, dict]:
        logprobs, entropy, mask, values = self.evaluate(mb["prompts"], mb["response_ids"], mb["exclude"])
        pg_loss, pg_stats = get_policy_loss(self.cfg.policy_loss)(
            logprobs, mb["old_logprobs"], mb["advantages"], mask, clip=self.cfg.clip)
        v_loss, v_stats = clipped_value_loss(values, mb["old_values"], mb["returns"], mask, self.cfg.value_clip)
        ent = masked_mean(entropy, mask)
        loss = pg_loss + self.cfg.vf_coef * v_loss - self.cfg.entropy_coef * ent
        stats = {"policy_loss": float(pg_loss.detach()), "value_loss": float(v_loss.detach()), "entropy": float(ent.detach()),
                 **{k: v for k, v in {**pg_stats, **v_stats}.items()}}
        return loss, stats


def sequence_reward(r_c: torch.Tensor, r_f: torch.Tensor, which: str) -> torch.Tensor:
    """The learned reward PPO optimises: R_c + R_f (the method), or one head (ablation)."""
    return {"sum": r_c + r_f, "coarse": r_c, "fine": r_f}[which]


def part_weights(cfg: PPOConfig) -> dict[str, float]:
    """Config weight of each reward part."""
    return {"model": cfg.model_reward_weight, "hits": cfg.hits_reward_weight, "prior": cfg.prior_reward_weight}


def combine_parts(components: dict[str, torch.Tensor], cfg: PPOConfig,
                  moments: dict[str, RunningMoments] | None = None) -> torch.Tensor:
    """[B] page reward: sum over parts of weight x part. With `moments`, each part is first
    updated into and normalised by its own running statistics, so a weight means relative
    importance whatever each part's scale (R is in logits, hits in [0, 1])."""
    weights = part_weights(cfg)
    total = None
    for name, value in components.items():
        value = value.float()
        if moments is not None:
            stats = moments.setdefault(name, RunningMoments())
            stats.update(value)
            value = stats.normalize(value)
        term = weights[name] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("a scored batch holds no reward part")
    return total


@torch.no_grad()
def prepare_batch(module: PolicyWithValue, batch: ScoredBatch, moments: dict[str, RunningMoments], cfg: PPOConfig,
                  kl_beta: float | None = None) -> dict:
    """Old values, per-token rewards (KL-penalised with `kl_beta`, default cfg.kl_beta),
    advantages and returns of a batch."""
    _, _, mask, old_values = module.evaluate(batch.prompts, batch.response_ids, batch.exclude)
    # Running statistics, not per-batch: a batch of uniformly good pages should still push
    # the policy further than a batch of bad ones.
    reward = combine_parts(batch.components, cfg, moments if cfg.normalize_reward else None)
    beta = cfg.kl_beta if kl_beta is None else kl_beta
    rewards, kl = token_rewards(reward, batch.logprobs, batch.ref_logprobs, mask, beta, cfg.kl_estimator)
    advantages, returns = get_advantage(cfg.advantage)(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                                       group_ids=batch.group_ids, seq_reward=reward)
    advantages = masked_whiten(advantages, mask)
    kl_per_page = (kl * mask).sum(dim=1)
    return {
        "prompts": batch.prompts, "exclude": batch.exclude, "response_ids": batch.response_ids,
        "old_logprobs": batch.logprobs, "old_values": old_values, "advantages": advantages,
        "returns": returns, "mask": mask, "kl": float(kl_per_page.mean()),
    }


def minibatches(prepared: dict, size: int, generator: torch.Generator):
    """Shuffled mini-batches of a prepared batch (same keys, row subsets)."""
    n = len(prepared["prompts"])
    order = torch.randperm(n, generator=generator).tolist()
    for a in range(0, n, size):
        rows = order[a : a + size]
        yield {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows])
               for k, v in prepared.items() if k != "kl"}
