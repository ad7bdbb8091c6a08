"""The page prior: a three-parameter page value from what the logs say, fitted on the pairs.

    R_p(page | user) = log sum_k exam(k) exp(a z_u(i_k) + b q(i_k)) (1 - c)^(n_k)

- z_u(i): the SFT policy's log-probability of item i as the user's next item (its first
  page position), standardised over items for that user: personal preference;
- q(i): the item's mean training rating (the data stage's s_i), standardised over items:
  quality, the same for every user;
- n_k: how many earlier items of the page share i_k's category; c in (0, 1) is how much a
  repeated category is worth less (satiation);
- exam(k) = 1 / log2(k + 1), the DCG discount.

Why it exists: the learned heads (R_c, R_f) read the SFT policy's own hidden states, and on
the simulator they rank the policy's sampled pages close to how the policy's likelihood
does (within-user Spearman with the true utility ~0.2, docs/BENCHMARKS.md), while these two
log-derived facts plus a category discount rank them far better (~0.6). The prior is not a
hand-set formula: (a, b, c) are fitted on the training data, as the heads are: a held at 1;
b by the likelihood of each training user's last training positive as the next item
(`quality_from_next_items`, the default `reward.prior_quality`); c by Bradley-Terry on the data
stage's pairs (the training users' pairs; held-out users judge it) or off the logs. No truth
is read, nor any held-out item.

Plain torch and numpy; the reward stage fits it, reward actors and evaluation score with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PRIOR_FILE = "page_prior.json"
_EPS = 1e-6


@dataclass
class PagePrior:
    pref_weight: float  # a
    quality_weight: float  # b
    satiation: float  # c, in (0, 1)
    quality: list[float]  # q(i) per item index, standardised

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        path = Path(directory) / PRIOR_FILE
        path.write_text(json.dumps({**asdict(self), **(extra or {})}))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "PagePrior | None":
        path = Path(directory) / PRIOR_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        return cls(state["pref_weight"], state["quality_weight"], state["satiation"], state["quality"])

    def score(self, pref: np.ndarray, pages: list[list[int]], item_cat: np.ndarray) -> np.ndarray:
        """[B] R_p of page b for the user whose [B, n_items] first-item log-probs are pref[b]."""
        items = page_tensors(pages, item_cat)[0].numpy()
        return self.value(np.take_along_axis(standardise(pref), items, axis=1), pages, item_cat).astype(np.float32)

    def value(self, z: np.ndarray, pages: list[list[int]], item_cat: np.ndarray) -> np.ndarray:
        """[B] R_p (float64) from already-gathered preferences: z[b, k] is page b's user's
        standardised preference for its k-th item (0-padded past the page's end)."""
        items, mask, repeats = page_tensors(pages, item_cat)
        z = torch.as_tensor(z[:, : items.shape[1]], dtype=torch.float64)
        with torch.no_grad():
            return page_log_value(z, torch.as_tensor(self.quality, dtype=torch.float64), items, mask, repeats,
                                  *(torch.tensor(v, dtype=torch.float64)
                                    for v in (self.pref_weight, self.quality_weight, self.satiation))).numpy()


def item_categories(data_dir: str | Path) -> np.ndarray:
    """[n_items] each item's category index (-1: none) from the data stage's items.parquet,
    in item order: what the prior counts a page's repeats over."""
    import pandas as pd

    items = pd.read_parquet(Path(data_dir) / "items.parquet", columns=["index", "cat_index"]).sort_values("index")
    return items["cat_index"].to_numpy()


def standardise(x: np.ndarray) -> np.ndarray:
    """z-score along the last axis (a constant row stays 0)."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=-1, keepdims=True)
    return (x - x.mean(axis=-1, keepdims=True)) / np.where(std > 0, std, 1.0)


def page_tensors(pages: list[list[int]], item_cat: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items [B, K] (0-padded), mask [B, K] and n_k [B, K]: earlier page items of the same
    category (an uncategorised item, category < 0, repeats nothing)."""
    width = max((len(p) for p in pages), default=0)
    items = np.zeros((len(pages), max(width, 1)), dtype=np.int64)
    mask = np.zeros_like(items, dtype=bool)
    repeats = np.zeros_like(items, dtype=np.float64)
    for row, page in enumerate(pages):
        seen: dict[int, int] = {}
        for k, item in enumerate(page):
            items[row, k], mask[row, k] = int(item), True
            c = int(item_cat[int(item)])
            if c >= 0:
                repeats[row, k] = seen.get(c, 0)
                seen[c] = seen.get(c, 0) + 1
    return torch.as_tensor(items), torch.as_tensor(mask), torch.as_tensor(repeats)


def page_log_value(z: torch.Tensor, quality: torch.Tensor, items: torch.Tensor, mask: torch.Tensor,
                   repeats: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B] log sum_k exam(k) exp(a z + b q) (1 - c)^n over each row's real items; z [B, K]
    is the user's standardised preference for each page item, quality [n_items]."""
    k = torch.arange(items.shape[1], dtype=z.dtype)
    log_exam = -torch.log(torch.log2(k + 2.0))
    logits = log_exam + a * z + b * quality[items] + repeats.to(z.dtype) * torch.log1p(-c)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=1)


def step_gains(prior: PagePrior, z: np.ndarray, prefixes: list[list[int]], item_cat: np.ndarray) -> np.ndarray:
    """[rows, n_items] R_p(prefix + [i]) - R_p(prefix) for every item i as the next one after
    each row's prefix (all prefixes one length t): what beam search under the prior adds per
    step. z [rows, n_items] is the row's user's standardised preference for every item. The
    empty page counts as 0 (its log-sum is -inf), so a page's summed gains are its R_p."""
    rows, t = len(prefixes), len(prefixes[0]) if prefixes else 0
    if any(len(p) != t for p in prefixes):
        raise ValueError("step_gains: every prefix must have the same length")
    z = np.asarray(z, dtype=np.float64)
    cats = np.asarray(item_cat, dtype=np.int64)
    counts = np.zeros((rows, max(int(cats.max(initial=-1)) + 1, 1)))
    for r, page in enumerate(prefixes):
        for item in page:
            if cats[item] >= 0:
                counts[r, cats[item]] += 1
    repeats = np.where(cats >= 0, counts[:, np.clip(cats, 0, None)], 0.0)  # n_i given the prefix
    log_new = (-np.log(np.log2(t + 2.0)) + prior.pref_weight * z + prior.quality_weight * np.asarray(prior.quality)
               + repeats * np.log1p(-prior.satiation))
    if t == 0:
        return log_new
    log_prefix = prior.value(np.take_along_axis(z, np.asarray(prefixes, dtype=np.int64), axis=1), prefixes,
                             item_cat)[:, None]
    return np.logaddexp(log_prefix, log_new) - log_prefix


def next_item_loglik(z: np.ndarray, quality: np.ndarray, targets: np.ndarray, allowed: np.ndarray,
                     b: float) -> float:
    """Mean log-likelihood of each row's target as the next item when P(i) is proportional to
    exp(z(i) + b q(i)) over the row's allowed items (z [rows, n_items], allowed bool alike)."""
    rows = np.arange(len(targets))
    x = np.where(allowed, np.asarray(z, dtype=np.float64) + b * np.asarray(quality, dtype=np.float64)[None, :], -np.inf)
    return float(np.mean(x[rows, targets] - np.logaddexp.reduce(x, axis=1)))


def quality_from_next_items(z: np.ndarray, quality: np.ndarray, targets: np.ndarray, allowed: np.ndarray) -> float:
    """b maximising the likelihood of each row's target as the next item when
    P(i) is proportional to exp(z(i) + b q(i)) over the row's allowed items: what item quality adds
    to the policy's (standardised) preference z [rows, n_items] in predicting what a user
    engages with next. `allowed` [rows, n_items] bool; each row's target must be allowed.

    Why not the pairs: every chosen page is a golden page, ranked by the very item mean
    rating q is, so the pairs reward q by construction (Bradley-Terry gave b 3.0 / 1.2 / 1.1
    on three tiny seeds, where the next item says 0.52 / 0.65 / 0.75, and the prior ranked
    the policy's sampled pages by true utility at Spearman 0.58 against 0.64;
    docs/BENCHMARKS.md). One parameter of a concave log-likelihood, so the fit is exact."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(z, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    allowed = np.asarray(allowed, dtype=bool)
    if not len(targets):
        raise ValueError("quality_from_next_items: no rows")
    if not allowed[np.arange(len(targets)), targets].all():
        raise ValueError("quality_from_next_items: a row's target is not among its allowed items")
    fit = minimize_scalar(lambda b: -next_item_loglik(z, quality, targets, allowed, b), bounds=(-10.0, 10.0),
                          method="bounded")
    return float(fit.x)


def fit_page_prior(z_chosen: np.ndarray, chosen: list[list[int]], z_rejected: np.ndarray,
                   rejected: list[list[int]], quality: np.ndarray, item_cat: np.ndarray,
                   steps: int = 200, fit_pref: bool = False,
                   satiation: float | None = None, quality_weight: float | None = None) -> tuple[float, float, float]:
    """(a, b, c) maximising the Bradley-Terry log-likelihood sum log sigmoid(R_p(chosen) -
    R_p(rejected)) over the pairs (L-BFGS from a = b = 1, c = 1/2). z_* [P, K] are the pair
    user's standardised preferences for each page item, 0-padded. `satiation` given: c is
    held there (`reward.prior_satiation: logs` reads it off the logs, `satiation_from_logs`);
    `quality_weight` given: b is held there (`quality_from_next_items`).

    `fit_pref=False` (what the reward stage uses) keeps a = 1: every chosen page is a golden
    page the SFT policy was trained to write, so its preference feature separates the
    training pairs far better than it ranks new pages, and a free a grows with how hard SFT
    fitted them (a = 2.4, 6.1, 10.3 on three tiny seeds, the quality weight b shrinking to
    0.5 and -1.0 with it). With a fixed, b and c say what the pairs add to the policy's own
    preference: item quality and the cost of a repeated category."""
    zc, zr = torch.as_tensor(z_chosen, dtype=torch.float64), torch.as_tensor(z_rejected, dtype=torch.float64)
    q = torch.as_tensor(np.asarray(quality, dtype=np.float64))
    tc, tr = page_tensors(chosen, item_cat), page_tensors(rejected, item_cat)
    a = torch.ones((), dtype=torch.float64, requires_grad=fit_pref)
    fixed_b = quality_weight is not None
    b = torch.tensor(float(quality_weight) if fixed_b else 1.0, dtype=torch.float64, requires_grad=not fixed_b)
    fixed_c = satiation is not None
    c_logit = torch.zeros((), dtype=torch.float64, requires_grad=not fixed_c)
    free = [a] * fit_pref + [b] * (not fixed_b) + [c_logit] * (not fixed_c)
    if not free:  # everything held: nothing to fit
        return float(a), float(b), float(satiation)
    opt = torch.optim.LBFGS(free, max_iter=steps, line_search_fn="strong_wolfe")

    def current_c() -> torch.Tensor:  # a held c of exactly 0 (no discount) stays 0
        return torch.tensor(float(satiation), dtype=torch.float64) if fixed_c else torch.sigmoid(c_logit).clamp(_EPS, 1 - _EPS)

    def loss_fn():
        opt.zero_grad()
        c = current_c()
        margin = page_log_value(zc, q, *tc, a, b, c) - page_log_value(zr, q, *tr, a, b, c)
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        return float(a), float(b), float(current_c())


def satiation_from_logs(categories: list[np.ndarray]) -> dict:
    """The repeated-category discount the logs show: c = 1 - min(odds, 1), where `odds` is
    the maximum-likelihood odds ratio of the next item sharing the previous item's category,
    against a random reordering of the same user's items. `categories` holds each user's
    training items' categories in time order, uncategorised items (< 0) left out.

    The model of a step: P(next category = k) is proportional to r_k (the user's items of k
    not yet placed: their training count less the previous item's, so the reference is
    exactly a random permutation of the user's own items and a user who simply likes one
    category shows no effect) times `odds` when k is the previous item's category. The
    log-likelihood needs three numbers per step, so the fit is one-dimensional and exact.

    Why from the logs: the pairs say little about it. Their rejected pages are one-category
    and clustered corruptions, so a Bradley-Terry fit of c on them drives it to ~1 whatever
    the users do (0.86-1.00 on the simulator, 1.00 on MovieLens, docs/BENCHMARKS.md). Only the
    previous item is used: visits are not marked in a log, and lag 1 is the lag most often
    inside one (longer windows measured weaker on the simulator). Real logs mostly cluster
    (odds > 1: MovieLens 1.5, Beauty 1.5), and then c is 0."""
    same, alike, rest = [], [], []
    for seq in categories:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 2:
            continue
        _, inverse, counts = np.unique(seq, return_inverse=True, return_counts=True)
        prev = inverse[:-1]
        same.append(inverse[1:] == prev)
        alike.append(counts[prev] - 1.0)  # the previous item's category among the items left
        rest.append(np.full(len(prev), len(seq) - 1.0))  # every item but the previous one
    if not same:
        return {"satiation": 0.0, "odds": 1.0, "steps": 0}
    same, alike, rest = (np.concatenate(x) for x in (same, alike, rest))
    keep = alike > 0  # a step whose previous category has no other item says nothing
    same, alike, rest = same[keep], alike[keep], rest[keep]
    if not len(same) or (alike == rest).all():  # no step, or one category only: no evidence either way
        return {"satiation": 0.0, "odds": 1.0, "steps": int(len(same))}

    def neg_loglik(log_odds: float) -> float:
        return -float(np.sum(log_odds * same - np.log(rest - alike + alike * np.exp(log_odds))))

    from scipy.optimize import minimize_scalar

    log_odds = float(minimize_scalar(neg_loglik, bounds=(-20.0, 5.0), method="bounded").x)
    odds = float(np.exp(log_odds))
    return {"satiation": float(max(0.0, 1.0 - odds)), "odds": odds, "steps": int(len(same))}



def first_item_preferences(model, layout, prompts: list[list[int]]) -> np.ndarray:
    """[B, n_items] first-item log-probs (float64) of each prompt, one forward pass per
    distinct prompt: a batch of groups (n pages per prompt) or of several pages per user
    repeats its prompts."""
    from pagellm.models.decoding import first_item_scores

    keys = [tuple(p) for p in prompts]
    distinct = list(dict.fromkeys(keys))
    where = {key: n for n, key in enumerate(distinct)}
    with torch.inference_mode():
        rows = first_item_scores(model, layout, [list(k) for k in distinct]).double().cpu().numpy()
    return rows[[where[key] for key in keys]]
