"""From scored pages to per-token advantages: the per-token KL penalty against the
frozen SFT reference, per-token rewards, and the advantage estimators.

Shapes: a batch of B pages, each a response of T tokens (K item tokens + eos, right
padded); `mask` [B,T] is 1 on real response tokens. The sequence reward of a page
(R_c + R_f) arrives at its last real token; every real token also pays -beta * KL.
"""

from __future__ import annotations

import torch

from pagellm.rl.registry import get_kl_estimator, register_advantage, register_kl
from pagellm.rl.stats import bool_mask, check_shapes

# k3 exponentiates a log-ratio; past ~20 nats the estimate is meaningless anyway and
# exp would overflow to inf in fp16/bf16, so the log-ratio is clamped first.
_MAX_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------- KL penalty
# Estimators of KL(pi || ref) from one sample of pi, per token (Schulman, "Approximating
# KL divergence"). With d = logp - ref_logp: k1 = d is unbiased but often negative;
# k2 = d^2/2 is biased low-variance; k3 = exp(-d) - 1 + d is unbiased and never negative.


@register_kl("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@register_kl("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate [B,T] by the named estimator; 0 on padding."""
    check_shapes(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = get_kl_estimator(kind)(logprobs, ref_logprobs)
    return torch.where(bool_mask(mask), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last real token; a row with none is an error."""
    m = bool_mask(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [B,T], got shape {tuple(m.shape)}")
    empty = ~m.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows[:10]} of the mask have no real token")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=1)


def token_rewards(
    seq_reward: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_beta: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B,T]: -beta * KL on each real token, plus the page's reward
    on its last real token. Returns (rewards, kl); both are 0 on padding."""
    check_shapes(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if seq_reward.shape != (mask.shape[0],):
        raise ValueError(f"seq_reward must be [B]={mask.shape[0]}, got shape {tuple(seq_reward.shape)}")
    with torch.no_grad():
        kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), mask, kl_kind)
        rewards = -kl_beta * kl
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, last_token_index(mask)] += seq_reward.to(rewards.dtype)
    return rewards, kl


# ----------------------------------------------------------------------------- advantages


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go sum_{k>=t} gamma^(k-t) r_k over real tokens; 0 on padding."""
    check_shapes(mask, rewards=rewards)
    m = bool_mask(mask)
    r = torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        # Padding keeps the running sum as it was, so holes do not reset or discount it.
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        out[:, t] = running
    return torch.where(m, out, torch.zeros_like(out))


@register_advantage("gae")
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_ids: torch.Tensor | None = None,
    seq_reward: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the real tokens of each row.

    delta_t = r_t + gamma V_{t'} - V_t with t' the next real token (V = 0 after the
    last one: the page has ended, nothing to bootstrap); A_t = delta_t + gamma lam A_{t'}.
    Returns (advantages, returns = advantages + values), 0 on padding.
    `group_ids` and `seq_reward` are accepted for a uniform signature and unused.
    """
    check_shapes(mask, rewards=rewards, values=values)
    m = bool_mask(mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    with torch.no_grad():
        r = torch.where(m, rewards, zero)
        v = torch.where(m, values.detach().to(rewards.dtype), zero)
        advantages = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        next_adv = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            real = m[:, t]
            delta = r[:, t] + gamma * next_value - v[:, t]
            adv_t = delta + gamma * lam * next_adv
            advantages[:, t] = torch.where(real, adv_t, zero)
            # Padding passes the following real token's value and advantage through.
            next_value = torch.where(real, v[:, t], next_value)
            next_adv = torch.where(real, adv_t, next_adv)
        returns = torch.where(m, advantages + v, zero)
    return advantages, returns


@register_advantage("reinforce")
def reinforce_advantages(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0, group_ids: torch.Tensor | None = None,
        seq_reward: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE: the advantage is the reward-to-go itself, no critic.

    The baseline comes from whitening across the batch (the learner does that for
    every estimator). Returns (advantages, returns), equal; `values`, `lam` unused.
    """
    with torch.no_grad():
        returns = discounted_returns(rewards, mask, gamma)
    return returns.clone(), returns


def _group_index(group_ids, batch: int, device, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's group index and the group sizes; every group must hold >= 2 pages (a lone
    page has nothing to be compared with)."""
    if group_ids is None:
        raise ValueError(f"{name} needs group_ids: [B] prompt ids, several sampled pages per prompt")
    group_ids = torch.as_tensor(group_ids, device=device)
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must be [B]={batch}, got shape {tuple(group_ids.shape)}")
    _, group = torch.unique(group_ids, return_inverse=True)
    sizes = torch.zeros(int(group.max()) + 1, dtype=torch.float64, device=device).index_add_(
        0, group, torch.ones(batch, dtype=torch.float64, device=device))
    if (sizes < 2).any():
        raise ValueError(f"{name}: {int((sizes < 2).sum())} group(s) have a single page; need >= 2 per prompt")
    return group, sizes


def _group_relative(rewards, mask, gamma, group_ids, seq_reward, name, relative):
    """Shared body of the critic-free group estimators.

    The page's own reward is compared within its group (`relative(page_reward, group,
    sizes)`); the per-token KL penalty is not: it is added back as its own reward-to-go, so
    a group whose pages tie on reward is not pushed by standardised KL noise (what putting
    the penalised return through the group statistics would do). Without `seq_reward`,
    the whole penalised page return is compared (the textbook RLOO on a scalar return)."""
    m = bool_mask(mask)
    returns = discounted_returns(rewards, m, gamma)
    rows = torch.arange(m.shape[0], device=m.device)
    if seq_reward is None:
        page_reward = returns[rows, m.float().argmax(dim=1)]  # first real token holds the page's return
        rest = torch.zeros_like(returns)
    else:
        page_reward = torch.as_tensor(seq_reward, dtype=rewards.dtype, device=rewards.device)
        penalty = rewards.clone()
        penalty[rows, last_token_index(m)] -= page_reward  # what is left is -beta * KL per token
        rest = discounted_returns(penalty, m, gamma)
    group, sizes = _group_index(group_ids, m.shape[0], m.device, name)
    score = relative(page_reward.double(), group, sizes).to(rewards.dtype)
    advantages = torch.where(m, score[:, None] + rest, torch.zeros_like(returns))
    return advantages, returns


def _leave_one_out(page_reward, group, sizes):
    sums = torch.zeros_like(sizes).index_add_(0, group, page_reward)
    return page_reward - (sums[group] - page_reward) / (sizes[group] - 1)


def _standardised(page_reward, group, sizes, eps: float = 1e-6):
    mean = torch.zeros_like(sizes).index_add_(0, group, page_reward) / sizes
    centred = page_reward - mean[group]
    var = torch.zeros_like(sizes).index_add_(0, group, centred**2) / (sizes - 1)
    return centred / (var.sqrt()[group] + eps)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0, group_ids: torch.Tensor | None = None,
        seq_reward: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): pages sampled for the same prompt
    share `group_ids`; a page's reward minus the mean reward of the other pages of its
    group, plus its KL penalty to go, is the advantage on every real token. Needs >= 2
    pages per group; no critic. Returns (advantages, reward-to-go returns)."""
    with torch.no_grad():
        return _group_relative(rewards, mask, gamma, group_ids, seq_reward, "rloo", _leave_one_out)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0, group_ids: torch.Tensor | None = None,
        seq_reward: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): a page's reward standardised within its group, (R - mean) /
    (std + eps) with the group's sample std, plus its KL penalty to go (GRPO puts the KL in
    the loss; here it stays a per-token reward, unstandardised, so beta means the same as
    in PPO), on every real token; no critic. A group whose pages tie on reward gets only
    the KL term. Returns (advantages, reward-to-go returns)."""
    with torch.no_grad():
        return _group_relative(rewards, mask, gamma, group_ids, seq_reward, "grpo", _standardised)
