"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

A linear item-to-item model with a closed form: with X the users x items matrix of training
positives and G = X^T X,

    B = argmin ||X - X B||^2 + lambda ||B||^2  subject to diag(B) = 0
      = I - P diag(1 / diag(P)),   P = (G + lambda I)^-1,

and a history's scores are its multi-hot row times B. The one hyperparameter, lambda, is
chosen on the validation step (history -> held-out items, full-ranking NDCG@10, seen items
masked) from `lambdas`, extended past the grid's edge when the best is there, as SASRec
chooses its epoch; without a validation step it is `fixed_lambda`.

Why it is here: it reads co-occurrence rather than order, so its mistakes differ from both
SASRec's and the page policy's. On the leave-one-out tables it is a strong baseline of its
own, and the guided stage's evaluator averages it with SASRec (pagellm/models/evaluator.py).
Its cost is the catalogue squared: one n_items x n_items inverse per lambda tried, and B
(float32) in memory and on disk.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy import sparse

from pagellm.eval.baselines import check_sequences, validation_ndcg
from pagellm.eval.baselines.params import BASELINE_PARAMS
from pagellm.eval.metrics import history_mask

DEFAULTS: dict[str, Any] = BASELINE_PARAMS["ease"]  # pagellm/eval/baselines/params.py


def check_catalogue(n_items: int, params: dict[str, Any] | None = None) -> None:
    """Refuse a catalogue whose fit would not fit in memory (`max_items`), with the way out.
    The pipeline calls it once the data stage knows the catalogue, before any training."""
    limit = {**DEFAULTS, **(params or {})}["max_items"]
    if n_items > limit:
        gb = 3 * 8 * n_items**2 / 1e9
        raise ValueError(f"EASE on {n_items:,} items needs ~{gb:,.0f} GB (three {n_items:,}^2 float64 matrices), "
                         f"above eval.ease.max_items {limit:,}: remove ease from eval.baselines (and "
                         f"guided.evaluator) or raise eval.ease.max_items")


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """B (float32, zero diagonal) from the item Gram matrix X^T X and the L2 weight lambda."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    p = np.linalg.inv(gram + lam * np.eye(len(gram), dtype=gram.dtype))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


class EASE:
    name = "ease"

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        unknown = set(params or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown EASE parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **(params or {})}
        if not self.params["lambdas"] or any(float(v) <= 0 for v in [*self.params["lambdas"], self.params["fixed_lambda"]]):
            raise ValueError(f"EASE lambdas must be a non-empty list of values > 0, got {self.params['lambdas']} "
                             f"(fixed_lambda {self.params['fixed_lambda']})")
        if self.params["edge_steps"] < 0 or self.params["edge_factor"] <= 1:
            raise ValueError(f"EASE edge_steps must be >= 0 and edge_factor > 1, got {self.params['edge_steps']} "
                             f"and {self.params['edge_factor']}")
        self.weights: np.ndarray | None = None
        self.n_items = 0
        self.training_log: list[dict[str, float]] = []  # one entry per lambda tried

    def _log(self, msg: str) -> None:
        if self.params["verbose"]:
            print(msg, flush=True)

    def fit(self, train_sequences: list[list[int]], n_items: int, val_histories: list[list[int]] | None = None,
            val_targets: list[list[int]] | None = None) -> None:
        """B for each lambda in `lambdas` (and past the grid's edge when the best is there), the
        one with the best validation NDCG@10 kept (with a validation step); otherwise B at
        `fixed_lambda`."""
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        check_sequences(train_sequences, n_items, "train_sequences")
        if (val_histories is None) != (val_targets is None):
            raise ValueError("give both val_histories and val_targets, or neither")
        check_catalogue(n_items, self.params)
        self.n_items = n_items
        x = history_mask(train_sequences, n_items).astype(np.float64)  # repeats count once
        gram = (x.T @ x).toarray()
        if val_histories is None:
            self.weights = ease_weights(gram, float(self.params["fixed_lambda"]))
            self.training_log = [{"lambda": float(self.params["fixed_lambda"])}]
            self._log(f"ease: lambda {self.params['fixed_lambda']:g} (no validation step)")
            return
        self.training_log, scores, kept = [], {}, (-1.0, None)  # only the best B is held: n_items^2 each
        lambdas = sorted(float(v) for v in self.params["lambdas"])
        for _ in range(len(lambdas) + self.params["edge_steps"]):
            if lambdas:
                lam = lambdas.pop(0)
            else:
                # The best at an edge of the grid says the grid missed the optimum (sparse
                # Amazon tables want less regularisation than MovieLens): step past it while
                # validation improves, at most `edge_steps` times.
                best = max(scores, key=scores.get)
                if len(scores) < 2 or best not in (min(scores), max(scores)):
                    break
                step = self.params["edge_factor"]
                lam = best / step if best == min(scores) else best * step
            scores[lam], weights = self._try(gram, lam, val_histories, val_targets)
            if scores[lam] > kept[0]:
                kept = (scores[lam], weights)
        self.weights = kept[1]
        best = max(scores, key=scores.get)
        self._log(f"ease: lambda {best:g} (best val ndcg@10 {scores[best]:.4f})")

    def _try(self, gram: np.ndarray, lam: float, val_histories, val_targets) -> tuple[float, np.ndarray]:
        """(validation NDCG@10, B) at one lambda, logged."""
        t0 = time.perf_counter()
        self.weights = ease_weights(gram, lam)
        ndcg = self.validate(val_histories, val_targets)
        record = {"lambda": lam, "val_ndcg@10": ndcg, "seconds": time.perf_counter() - t0}
        self.training_log.append(record)
        self._log(f"ease lambda {lam:g} val ndcg@10 {ndcg:.4f} ({record['seconds']:.1f}s)")
        return ndcg, self.weights

    def state(self) -> dict[str, torch.Tensor]:
        """What `restore` takes back (the evaluation's output cache, the guided evaluator's files)."""
        if self.weights is None:
            raise RuntimeError("EASE.state called before fit")
        return {"weights": torch.from_numpy(self.weights)}

    def restore(self, state: dict, n_items: int) -> None:
        """Take B from an earlier fit with these parameters on the same sequences."""
        weights = np.asarray(state["weights"], dtype=np.float32)
        if weights.shape != (n_items, n_items):
            raise ValueError(f"EASE weights have shape {weights.shape}, expected ({n_items}, {n_items})")
        self.weights, self.n_items = weights, n_items

    def validate(self, histories: list[list[int]], targets: list[list[int]]) -> float:
        """Full-ranking NDCG@10 with each user's history items masked."""
        return validation_ndcg(self, histories, targets, self.params["score_batch"])

    def score(self, histories: list[list[int]]) -> np.ndarray:
        """[len(histories), n_items]: each history's multi-hot row times B."""
        if self.weights is None:
            raise RuntimeError("EASE.score called before fit")
        check_sequences(histories, self.n_items, "histories")
        rows = sparse.csr_matrix(history_mask(histories, self.n_items), dtype=np.float32)
        return np.asarray(rows @ self.weights, dtype=np.float32)
