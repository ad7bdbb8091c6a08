"""PPO losses on padded [B,T] token tensors: clipped surrogate, clipped value loss,
entropy bonus, and token log-probabilities from logits.

Every loss is a masked mean over real tokens (token-level averaging, as in TRL and
veRL's default), so long and short pages weigh by their token counts. Stats are
detached Python floats, ready for metrics.jsonl.
"""

from __future__ import annotations

import torch

from pagellm.rl.registry import register_policy_loss
from pagellm.rl.stats import bool_mask, check_shapes, masked_mean

# Beyond ~20 nats the ratio exp(logp - old) is meaningless and overflows in half
# precision; the clipped branch already bounds the update, so clamping is harmless.
_MAX_LOG_RATIO = 20.0


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached x with padding set to 0. A nan there would survive the masked mean's
    forward pass but turn the gradient of the real tokens' neighbours into nan."""
    return torch.where(bool_mask(mask), x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))


def _policy_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_ratio = (logprobs - _zero_padding(old_logprobs, mask)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio), log_ratio


def _check_clip(clip: float) -> None:
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")


@register_policy_loss("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1-eps, 1+eps)),
    r = exp(logp - old_logp). Stats: clipfrac (tokens where the clip is binding),
    approx_kl (Schulman's k3 estimate of KL(old || new)), ratio_mean."""
    check_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    _check_clip(clip)
    advantages = _zero_padding(advantages, mask)
    ratio, log_ratio = _policy_ratio(logprobs, old_logprobs, mask)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, _ratio_stats(ratio, log_ratio, (loss_clipped > loss_unclipped), mask)


@register_policy_loss("dual_clip")
def dual_clip_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    clip_c: float = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-clip PPO (Ye et al. 2020): as `clipped`, but for negative advantages the
    loss is also capped at -A * clip_c, so one stale token with a huge ratio cannot
    dominate the batch (useful with asynchronous, off-policy rollouts)."""
    check_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    _check_clip(clip)
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    advantages = _zero_padding(advantages, mask)
    ratio, log_ratio = _policy_ratio(logprobs, old_logprobs, mask)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -advantages * clip_c)
    per_token = torch.where(advantages < 0, loss_dual, loss_ppo)
    loss = masked_mean(per_token, mask)
    binding = (loss_clipped > loss_unclipped) | ((advantages < 0) & (loss_ppo > -advantages * clip_c))
    return loss, _ratio_stats(ratio, log_ratio, binding, mask)


def _ratio_stats(ratio: torch.Tensor, log_ratio: torch.Tensor, binding: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        return {
            "clipfrac": masked_mean(binding.to(ratio.dtype), mask).item(),
            "approx_kl": approx_kl.item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * mean over real tokens of max((V - R)^2, (V_clip - R)^2), with V_clip the new
    value kept within value_clip of the rollout-time value (None: plain squared error).
    Stats: vf_clipfrac, value_mean, value_error (mean squared error, unclipped)."""
    check_shapes(mask, values=values, old_values=old_values, returns=returns)
    returns = _zero_padding(returns, mask)
    old_values = _zero_padding(old_values, mask)
    err_unclipped = (values - returns) ** 2
    if value_clip is None:
        per_token = err_unclipped
        binding = torch.zeros_like(err_unclipped, dtype=torch.bool)
    else:
        if value_clip <= 0:
            raise ValueError(f"value_clip must be > 0 or None, got {value_clip}")
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        err_clipped = (clipped - returns) ** 2
        per_token = torch.maximum(err_unclipped, err_clipped)
        binding = err_clipped > err_unclipped
    loss = 0.5 * masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean(binding.to(values.dtype), mask).item(),
            "value_mean": masked_mean(values, mask).item(),
            "value_error": masked_mean(err_unclipped, mask).item(),
        }
    return loss, stats


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, for every position.

    Constrained decoding adds -inf to forbidden tokens. Their p*log p is 0*(-inf) = nan,
    and even a masked-out nan poisons the gradient, so log p is replaced by 0 there
    before the product. A row with every logit -inf (padding) has entropy 0.
    """
    logits = logits.float()
    dead_row = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = logits.masked_fill(dead_row, 0.0)
    logp = torch.log_softmax(logits, dim=-1)
    safe_logp = logp.masked_fill(torch.isneginf(logp), 0.0)
    entropy = -(safe_logp.exp() * safe_logp).sum(dim=-1)
    return entropy.masked_fill(dead_row.squeeze(-1), 0.0)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy [scalar] of the policy over real tokens; logits [B,T,V], mask [B,T]."""
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit mask {tuple(mask.shape)} (expected [B,T,V] and [B,T])")
    return masked_mean(token_entropy(logits), bool_mask(mask))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] [B,T] for logits [B,T,V] and token ids [B,T] (fp32)."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit tokens {tuple(tokens.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
