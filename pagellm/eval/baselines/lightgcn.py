"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020).

Users and items are nodes of the bipartite graph of training positives. Layer-0 embeddings
are the only parameters; each layer is the symmetric-normalised adjacency times the one
below it, no weights and no non-linearity,

    E^(k+1) = D^-1/2 A D^-1/2 E^(k),    e = (E^(0) + ... + E^(K)) / (K + 1),

and user u scores item i by <e_u, e_i>. Trained with BPR (one uniformly drawn unseen item
per training positive and epoch) plus L2 on the batch's layer-0 rows, as the paper does.
The epoch is chosen on the validation step (full-ranking NDCG@10, seen items masked), every
`eval_every` epochs, as SASRec chooses its epoch.

Unlike the other baselines it scores *users*, not histories: a user's representation is its
node, fixed by the training graph (the paper's and RecBole's protocol, where the validation
item is not added to the graph before testing). The evaluation passes the user indices
(`by_user`); a user with no training positive has no node and gets the mean user's scores,
counted in the log. For the same reason it cannot be the guided stage's item term, which
scores prompts of users it may never have seen.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
from scipy import sparse

from pagellm.eval.baselines import check_sequences, validation_ndcg
from pagellm.eval.baselines.params import BASELINE_PARAMS
from pagellm.eval.baselines.sasrec import TorchThreads
from pagellm.eval.metrics import history_mask

DEFAULTS: dict[str, Any] = BASELINE_PARAMS["lightgcn"]  # pagellm/eval/baselines/params.py


def normalised_adjacency(interactions: sparse.csr_matrix) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph [[0, R], [R^T, 0]] (users first), as a sparse
    (COO) tensor: one matrix product per layer."""
    n_users, n_items = interactions.shape
    r = interactions.astype(np.float32)
    adj = sparse.bmat([[None, r], [r.T, None]], format="csr")
    degree = np.asarray(adj.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    norm = (sparse.diags(inv_sqrt) @ adj @ sparse.diags(inv_sqrt)).tocoo().astype(np.float32)
    assert norm.shape == (n_users + n_items, n_users + n_items)
    indices = torch.from_numpy(np.vstack([norm.row, norm.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(norm.data), size=norm.shape,
                                   check_invariants=True).coalesce()


def propagate(embedding: torch.Tensor, adjacency: torch.Tensor, layers: int) -> torch.Tensor:
    """The mean of layers 0..K of the propagated embeddings."""
    out, layer = embedding, embedding
    for _ in range(layers):
        layer = adjacency @ layer
        out = out + layer
    return out / (layers + 1)


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(<u, i+> - <u, i->), averaged over the batch."""
    margin = (users * positives).sum(-1) - (users * negatives).sum(-1)
    return torch.nn.functional.softplus(-margin).mean()


def sample_negatives(users: np.ndarray, seen: sparse.csr_matrix, rng: np.random.Generator, tries: int = 10) -> np.ndarray:
    """One item per user drawn uniformly from those it has no training positive for
    (redrawn where a draw hits one; after `tries` rounds a rare leftover keeps its draw)."""
    n_items = seen.shape[1]
    out = rng.integers(0, n_items, size=len(users))
    for _ in range(tries):
        hit = np.asarray(seen[users, out]).ravel() > 0
        if not hit.any():
            break
        out[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return out


class LightGCN:
    name = "lightgcn"
    by_user = True  # scores users (graph nodes), not histories: the evaluation passes their indices

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        unknown = set(params or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown LightGCN parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **(params or {})}
        p = self.params
        if p["layers"] < 0 or p["dim"] < 1 or p["batch_size"] < 1 or p["eval_every"] < 1 or p["lr"] <= 0:
            raise ValueError(f"LightGCN needs layers >= 0, dim, batch_size, eval_every >= 1 and lr > 0; got {p}")
        self.n_items = 0
        self.user_rows: dict[int, int] = {}  # user index -> row of `users`
        self.users: torch.Tensor | None = None  # [n_users, dim] final (layer-mean) embeddings
        self.items: torch.Tensor | None = None  # [n_items, dim]
        self.training_log: list[dict[str, float]] = []
        self.nodeless: set[int] = set()  # users scored so far that have no node (no training positive)

    def _log(self, msg: str) -> None:
        if self.params["verbose"]:
            print(msg, flush=True)

    def fit(self, train_sequences: list[list[int]], n_items: int, val_histories: list[list[int]] | None = None,
            val_targets: list[list[int]] | None = None, *, users: list[int] | None = None,
            val_users: list[int] | None = None) -> None:
        """BPR on the training graph of `users` (user index of each training sequence); with a
        validation step (histories, targets, val_users) the best of every `eval_every` epochs
        up to `epochs` is kept, `patience` evaluations without a better one stop it."""
        p = self.params
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        check_sequences(train_sequences, n_items, "train_sequences")
        if users is None or len(users) != len(train_sequences):
            raise ValueError("LightGCN scores users: give `users`, one user index per training sequence")
        if (val_histories is None) != (val_targets is None) or (val_histories is not None) != (val_users is not None):
            raise ValueError("give val_histories, val_targets and val_users together, or none of them")
        self.n_items = n_items
        self.user_rows = {int(u): r for r, u in enumerate(users)}
        if len(self.user_rows) != len(users):
            raise ValueError("LightGCN: a user index appears twice in `users`")
        graph = history_mask(train_sequences, n_items).astype(np.float32)  # repeats count once
        rows, cols = graph.nonzero()
        if not len(rows):
            raise ValueError("LightGCN needs at least one training positive")
        adjacency = normalised_adjacency(graph)
        n_users = len(users)
        torch.manual_seed(p["seed"])
        rng = np.random.default_rng(p["seed"])
        embedding = torch.nn.Parameter(torch.randn(n_users + n_items, p["dim"]) * p["init_std"])
        opt = torch.optim.Adam([embedding], lr=p["lr"])
        validated = val_histories is not None
        n_epochs = p["epochs"] if validated else p["fixed_epochs"]
        self.training_log, best, best_state, stale = [], -1.0, None, 0
        batches = max(1, math.ceil(len(rows) / p["batch_size"]))
        with TorchThreads(p["threads"]):
            for epoch in range(1, n_epochs + 1):
                t0 = time.perf_counter()
                total = 0.0
                for idx in np.array_split(rng.permutation(len(rows)), batches):
                    u, i = rows[idx], cols[idx]
                    j = sample_negatives(u, graph, rng)
                    final = propagate(embedding, adjacency, p["layers"])
                    ut, it, jt = (torch.from_numpy(a) for a in (u, n_users + i, n_users + j))
                    loss = bpr_loss(final[ut], final[it], final[jt])
                    # L2 on the batch's layer-0 rows, per example (the paper's and RecBole's).
                    reg = (embedding[ut].square().sum() + embedding[it].square().sum()
                           + embedding[jt].square().sum()) / (2 * len(idx))
                    opt.zero_grad(set_to_none=True)
                    (loss + p["reg"] * reg).backward()
                    opt.step()
                    total += loss.item() * len(idx)
                record = {"epoch": epoch, "loss": total / len(rows), "seconds": time.perf_counter() - t0}
                line = f"lightgcn epoch {epoch}/{n_epochs} bpr {record['loss']:.4f} {record['seconds']:.1f}s"
                last = epoch == n_epochs
                if validated and (epoch % p["eval_every"] == 0 or last):
                    self._set(embedding.detach(), adjacency, n_users)
                    ndcg = self.validate(val_histories, val_targets, val_users)
                    record["val_ndcg@10"] = ndcg
                    line += f" val ndcg@10 {ndcg:.4f}"
                    if ndcg > best:
                        best, best_state, stale = ndcg, (self.users.clone(), self.items.clone(), epoch), 0
                    else:
                        stale += 1
                self.training_log.append(record)
                if not validated or "val_ndcg@10" in record or epoch == 1:
                    self._log(line)
                if validated and stale >= p["patience"]:
                    self._log(f"lightgcn early stop: best val ndcg@10 {best:.4f} at epoch {best_state[2]}")
                    break
        if best_state is not None:
            self.users, self.items = best_state[0], best_state[1]
        else:
            self._set(embedding.detach(), adjacency, n_users)

    @torch.no_grad()
    def _set(self, embedding: torch.Tensor, adjacency: torch.Tensor, n_users: int) -> None:
        final = propagate(embedding, adjacency, self.params["layers"])
        self.users, self.items = final[:n_users].clone(), final[n_users:].clone()

    def state(self) -> dict[str, torch.Tensor]:
        """What `restore` takes back: the final embeddings and whose rows they are."""
        if self.users is None:
            raise RuntimeError("LightGCN.state called before fit")
        ids = torch.tensor(sorted(self.user_rows, key=self.user_rows.get), dtype=torch.long)
        return {"user_ids": ids, "users": self.users, "items": self.items}

    def restore(self, state: dict, n_items: int) -> None:
        """Take the embeddings of an earlier fit with these parameters on the same sequences."""
        items = torch.as_tensor(state["items"])
        if items.shape[0] != n_items:
            raise ValueError(f"LightGCN item embeddings hold {items.shape[0]} items, expected {n_items}")
        self.users, self.items, self.n_items = torch.as_tensor(state["users"]), items, n_items
        self.user_rows = {int(u): r for r, u in enumerate(torch.as_tensor(state["user_ids"]).tolist())}

    def validate(self, histories: list[list[int]], targets: list[list[int]], users: list[int]) -> float:
        """Full-ranking NDCG@10 with each user's history items masked."""
        return validation_ndcg(self, histories, targets, self.params["score_batch"], users=users)

    @torch.no_grad()
    def score(self, histories: list[list[int]], users: list[int] | None = None) -> np.ndarray:
        """[len(users), n_items]: <e_u, e_i>. `histories` only fixes the batch size and is
        checked; the user's node already holds its training positives."""
        if self.users is None:
            raise RuntimeError("LightGCN.score called before fit")
        if users is None or len(users) != len(histories):
            raise ValueError("LightGCN scores users: give `users`, one user index per history")
        check_sequences(histories, self.n_items, "histories")
        rows = [self.user_rows.get(int(u), -1) for u in users]
        known = torch.tensor([r for r in rows if r >= 0], dtype=torch.long)
        vectors = torch.empty(len(rows), self.users.shape[1])
        mask = torch.tensor([r >= 0 for r in rows])
        vectors[mask] = self.users[known]
        if not mask.all():  # no training positive, no node: the mean user
            vectors[~mask] = self.users.mean(0)
            unknown = {int(u) for u, r in zip(users, rows) if r < 0} - self.nodeless
            if unknown:  # said once per user, not once per batch or validation
                self.nodeless |= unknown
                self._log(f"lightgcn: {len(unknown)} more user(s) without a training positive scored as the mean "
                          f"user ({len(self.nodeless)} so far)")
        return (vectors @ self.items.T).numpy()
