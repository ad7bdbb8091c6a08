"""Bradley–Terry loss and pair accuracy for the reward model (plain functions, no Ray).

A pair is (chosen, rejected) scores of one head; P(chosen ≻ rejected) = σ(R_chosen − R_rejected).
A pair that carries a teacher's margin (the on-policy pairs) regresses it instead (`pair_losses`).

Why each enabled head gets its own BT term (L = L_coarse + L_fine) instead of one term on
R_c + R_f: each head is then a calibrated scorer on its own. Serving uses R_c alone as a
ranking feature (`/v1/score`), PPO can be asked for `coarse`, `fine` or `sum`, and the
per-head accuracy table means "what this head knows", not "what it adds to the other
head". A single term on the sum would let one head carry the pair and leave the other
at an arbitrary scale and sign. The price: R_c + R_f itself is not what is fitted, so
its accuracy can fall below the better head's where the two disagree (reported per family).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HEAD_NAMES = ("coarse", "fine")


def pair_loglik(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """log σ(chosen − rejected) per pair (logsigmoid: exact for large margins of either sign)."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    return F.logsigmoid(chosen.float() - rejected.float())


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of −log σ(chosen − rejected)."""
    return pair_losses(chosen, rejected).mean()


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """[B] per pair: −log σ(chosen − rejected) where `margin` is NaN (or not given), and
    ½ (chosen − rejected − margin)² where it is a number.

    A margin is a teacher's score difference (the page prior's, for on-policy pairs): the
    head then learns how much better a page is, not only that it is (Margin-MSE, as IR
    distils a cross-encoder into a ranker, Hofstätter et al. 2020). Bradley–Terry's hard
    target pushes every pair apart alike, the nearly-equal ones too, so fine differences
    are taught as noise (docs/BENCHMARKS.md, "On-policy pairs")."""
    if chosen.numel() == 0:
        raise ValueError("pair loss of an empty batch")
    bt = -pair_loglik(chosen, rejected)
    if margin is None:
        return bt
    margin = margin.to(bt.dtype)
    graded = ~torch.isnan(margin)
    regress = 0.5 * (chosen.float() - rejected.float() - torch.nan_to_num(margin)) ** 2
    return torch.where(graded, regress, bt)


def multi_head_loss(
    chosen: Mapping[str, torch.Tensor], rejected: Mapping[str, torch.Tensor], margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ over the heads present of their mean pair losses (`pair_losses`: Bradley–Terry,
    or the margin's squared error where a pair has one); also each head's loss and accuracy.

    `chosen`/`rejected`: head name -> scores [B]; `margin` [B] or None. Extras:
    `loss_<head>`, `acc_<head>`, and `acc_sum` (accuracy of the summed score, what PPO
    optimises by default).
    """
    if not chosen or set(chosen) != set(rejected):
        raise ValueError(f"heads differ or are empty: chosen {sorted(chosen)}, rejected {sorted(rejected)}")
    total = 0.0
    extras: dict[str, float] = {}
    for head in sorted(chosen):
        loss = pair_losses(chosen[head], rejected[head], margin).mean()
        total = total + loss
        extras[f"loss_{head}"] = float(loss.detach())
        extras[f"acc_{head}"] = pair_accuracy(chosen[head], rejected[head])
    extras["acc_sum"] = pair_accuracy(sum(chosen.values()), sum(rejected.values()))
    return total, extras


def pair_accuracy(chosen, rejected) -> float:
    """Share of pairs with chosen strictly above rejected (a tie counts as wrong)."""
    chosen, rejected = _as_numpy(chosen), _as_numpy(rejected)
    if chosen.size == 0:
        return float("nan")
    return float(np.mean(chosen > rejected))


def accuracy_by_family(chosen, rejected, families: Sequence[str]) -> dict[str, float]:
    """Pair accuracy per family name, families in first-seen order."""
    chosen, rejected = _as_numpy(chosen), _as_numpy(rejected)
    families = np.asarray(families, dtype=object)
    if not len(chosen) == len(rejected) == len(families):
        raise ValueError(f"lengths differ: {len(chosen)} chosen, {len(rejected)} rejected, {len(families)} families")
    out = {}
    for family in dict.fromkeys(families.tolist()):
        sel = families == family
        out[str(family)] = pair_accuracy(chosen[sel], rejected[sel])
    return out


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
