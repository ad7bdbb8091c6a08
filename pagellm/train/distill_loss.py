"""DeGRe's distillation loss (plain torch, unit-tested): hard-label cross-entropy on the
mined pages plus α × KL from the evaluator's soft labels, each page weighted by its value.

For position p of a mined page (weight w_p, the page's), with the policy's constrained
item log-probabilities log π_p, the mined item h_p and soft labels q_p over the step's
proposals e (softmax of the evaluator's gains / temperature):

    L = Σ_p w_p [ -log π_p(h_p) + α Σ_e q_pe (log q_pe - log π_p(e)) ] / Σ_p w_p

The hard label says which page beam search kept; the soft labels say how the evaluator
ranked the alternatives at each step, a denser signal than one item (α = 0.01 in DeGRe).
"""

from __future__ import annotations

import numpy as np
import torch


def distill_loss(logp: torch.Tensor, hard: torch.Tensor, proposals: torch.Tensor, soft: torch.Tensor,
                 weights: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp [P, n_items]; hard [P] item indices; proposals [P, E] item indices with soft
    [P, E] probabilities (rows sum to 1; a zero entry is padding); weights [P]."""
    hard_nll = -logp.gather(1, hard[:, None]).squeeze(1)
    at_proposals = logp.gather(1, proposals)
    q_logq = torch.where(soft > 0, soft * soft.clamp(min=1e-30).log(), torch.zeros_like(soft))
    kl = (q_logq - torch.where(soft > 0, soft * at_proposals, torch.zeros_like(soft))).sum(dim=1)
    total = weights.sum().clamp(min=1e-12)
    loss = (weights * (hard_nll + alpha * kl)).sum() / total
    return loss, {"hard_nll": (weights * hard_nll).sum() / total, "soft_kl": (weights * kl).sum() / total}


def page_weights(values: np.ndarray, tau: float) -> np.ndarray:
    """Weights of one prompt's B mined pages: B x softmax(V / tau), so a prompt weighs B in
    all whatever its values and the better pages of it weigh more."""
    z = np.asarray(values, dtype=np.float64) / tau
    e = np.exp(z - z.max())
    return len(z) * e / e.sum()


def soft_labels(gains: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(gains / temperature) over one step's proposals."""
    z = np.asarray(gains, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()
