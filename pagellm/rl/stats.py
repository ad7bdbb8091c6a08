"""Masked statistics over padded [B,T] token tensors, and running reward moments.

Padding may hold anything (nan, -inf, stale values): it is selected away with
torch.where, never multiplied by 0, so it cannot leak into a mean or a gradient.
"""

from __future__ import annotations

import math

import torch


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool (callers may pass 0/1 ints or floats)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, mask has {tuple(mask.shape)}; they must match")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is set (over `dim`, or everything).

    Over `dim`, a row with no real position gets 0; over everything, an empty mask
    is an error (a silent 0 would hide an all-padding batch).
    """
    m = bool_mask(mask)
    x0 = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        n = m.sum()
        if n.item() == 0:
            raise ValueError("masked_mean: the mask selects no position")
        return x0.sum() / n
    return x0.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected when `unbiased`)."""
    m = bool_mask(mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if n.item() < 2:
            raise ValueError("masked_var(unbiased=True) needs at least 2 masked positions")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale x to unit variance over the mask (and zero mean if `shift_mean`); padding -> 0."""
    m = bool_mask(mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(m, white, torch.zeros((), dtype=x.dtype, device=x.device))


class RunningMoments:
    """Mean and variance of every value seen so far, merged batch by batch.

    Batches are combined with Chan et al.'s parallel form of Welford's update in
    float64, so the result equals the moments of the concatenated stream. State is
    plain Python numbers: it checkpoints through json or torch.save(weights_only=True).
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        """Population variance (ddof=0, as numpy's default)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x) -> None:
        values = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if values.numel() == 0:
            return
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"RunningMoments.update: {bad} non-finite reward(s) in the batch")
        n_b = values.numel()
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    def normalize(self, x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """(x - mean) / std with the running moments.

        A stream that has been constant so far (std below eps) is only centred:
        dividing by ~0 would turn the next small difference into a huge reward.
        """
        if self.count == 0:
            raise RuntimeError("RunningMoments.normalize called before any update()")
        x = torch.as_tensor(x)
        out = x - self.mean if shift_mean else x
        std = self.std
        return out / std if std > self.eps else out

    def state_dict(self) -> dict[str, float | int]:
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2), "eps": float(self.eps)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"RunningMoments state lacks {sorted(missing)}")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.eps = float(state.get("eps", self.eps))
