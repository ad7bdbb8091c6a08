"""Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", §2.2): beta grows when the policy drifts past the target KL and shrinks when
it stays under, proportionally and clipped, so a fixed beta need not be tuned per dataset."""

from __future__ import annotations

# At most a 20 % relative error is acted on per step, as in the paper: one noisy batch
# cannot swing beta far.
_MAX_ERROR = 0.2


def adaptive_kl_beta(beta: float, kl: float, target: float, pages: int, horizon: int) -> float:
    """Next beta after a batch of `pages` pages with mean KL `kl` per page:
    beta * (1 + clip(kl / target - 1, -0.2, 0.2) * pages / horizon)."""
    if target <= 0 or horizon < 1 or pages < 1:
        raise ValueError(f"need target > 0, horizon >= 1, pages >= 1; got {target}, {horizon}, {pages}")
    error = min(max(kl / target - 1.0, -_MAX_ERROR), _MAX_ERROR)
    return beta * (1.0 + error * pages / horizon)
