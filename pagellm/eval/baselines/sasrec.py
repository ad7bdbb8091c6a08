"""SASRec (Kang & McAuley, ICDM 2018) trained with full cross-entropy.

The network follows the paper: item embedding (index 0 = padding) scaled by sqrt(d) as
in the authors' code, plus a learned positional embedding over the left-padded window of
the last `max_len` items, dropout, then `blocks` causal self-attention blocks in the
paper's pre-LN form g(x) = x + Dropout(g(LayerNorm(x))) for both the attention and the
point-wise feed-forward sublayer, a final LayerNorm, and scores F_t · M_i against the
shared item embedding. Padding positions are zeroed after every block and, unlike the
authors' code (causal mask only), never attended to, so a history scores the same
whatever it is batched with.

One deliberate change from the paper, the one the "CE SASRec" results rely on: the loss
is softmax cross-entropy over ALL items at every non-padding position instead of the
paper's one-negative BCE. Everything else (Adam with betas (0.9, 0.98), lr 1e-3,
batch 128, d = 64, 2 blocks, max_len 50) keeps the paper's defaults; dropout is 0.3
(see DEFAULTS).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagellm.eval.baselines import check_sequences, validation_ndcg
from pagellm.eval.baselines.params import BASELINE_PARAMS

DEFAULTS: dict[str, Any] = BASELINE_PARAMS["sasrec"]  # pagellm/eval/baselines/params.py


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.attn_drop = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.ffn_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        a, _ = self.attn(h, h, h, attn_mask=blocked, need_weights=False)
        x = x + self.attn_drop(a)
        return x + self.ffn_drop(self.ffn(self.ffn_norm(x)))


class SASRecNet(nn.Module):
    """The network; item ids inside it are shifted by one so that 0 is padding."""

    def __init__(self, n_items: int, hidden: int, blocks: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        for p in self.parameters():  # Xavier, as in the authors' code
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L] shifted ids (0 = pad, left-padded, L <= max_len) -> [B, L, d] hidden states.

        Positions count from the right edge of the max_len window, so a batch may be
        trimmed of its all-padding left columns without changing any result.
        """
        length = seqs.shape[1]
        max_len = self.pos_emb.num_embeddings
        if length > max_len:
            raise ValueError(f"sequence window {length} is longer than max_len {max_len}")
        keep = (seqs != 0).unsqueeze(-1)
        x = self.item_emb(seqs) * math.sqrt(self.item_emb.embedding_dim)
        x = self.emb_drop(x + self.pos_emb.weight[max_len - length :]) * keep
        # Causal and no attending to padding; a position may always see itself, so a
        # padding row never turns into an all-masked (NaN) softmax.
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).triu(1)
        blocked = causal.unsqueeze(0) | (seqs == 0).unsqueeze(1)
        blocked &= ~torch.eye(length, dtype=torch.bool, device=seqs.device)
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked) * keep
        return self.final_norm(x)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, n_items] scores against the shared item embedding (padding row dropped)."""
        return h @ self.item_emb.weight[1:].T


def _left_pad(seqs: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Shifted ids (item + 1) of each sequence's last `length` items, left-padded with 0."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        tail = list(s)[-length:]
        if tail:
            out[r, length - len(tail) :] = np.asarray(tail, dtype=np.int64) + 1
    return out


def _trim(*batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the left columns that are padding in every row (most windows are short)."""
    used = (batches[0] != 0).any(dim=0).nonzero()
    first = int(used[0]) if len(used) else batches[0].shape[1] - 1
    return tuple(b[:, first:] for b in batches)


class TorchThreads:
    """Use `n` intra-op threads inside the block (None: every core this process may use),
    restore the previous count after. SASRec and LightGCN train inside one."""

    def __init__(self, n: int | None) -> None:
        self.n = n or len(os.sched_getaffinity(0))

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


class SASRec:
    name = "sasrec"

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        unknown = set(params or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown SASRec parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **(params or {})}
        self.net: SASRecNet | None = None
        self.n_items = 0
        self.training_log: list[dict[str, float]] = []  # one entry per epoch

    def _log(self, msg: str) -> None:
        if self.params["verbose"]:
            print(msg, flush=True)

    def fit(
        self,
        train_sequences: list[list[int]],
        n_items: int,
        val_histories: list[list[int]] | None = None,
        val_targets: list[list[int]] | None = None,
    ) -> None:
        """Train on every position of each training sequence (last max_len + 1 items).

        With val_histories/val_targets, full-ranking NDCG@10 (history items masked) is
        measured after each epoch, for at most `epochs`; training stops after `patience`
        epochs without a new best and the best epoch's weights are kept. Without them it
        trains `fixed_epochs`.
        """
        p = self.params
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        check_sequences(train_sequences, n_items, "train_sequences")
        if (val_histories is None) != (val_targets is None):
            raise ValueError("give both val_histories and val_targets, or neither")
        length = p["max_len"]
        usable = [s for s in train_sequences if len(s) >= 2]
        if not usable:
            raise ValueError("SASRec needs at least one training sequence with 2 or more items")
        windows = _left_pad([s[-(length + 1) :] for s in usable], length + 1)
        inputs, targets = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:].copy())
        targets[inputs == 0] = 0  # as in the paper: no target without an input item before it
        torch.manual_seed(p["seed"])
        rng = np.random.default_rng(p["seed"])
        self.n_items = n_items
        self.net = self._new_net(n_items)
        opt = torch.optim.Adam(self.net.parameters(), lr=p["lr"], betas=(0.9, 0.98))
        self.training_log = []
        best, best_state, stale = -1.0, None, 0
        with TorchThreads(p["threads"]):
            n_epochs = p["epochs"] if val_histories is not None else p["fixed_epochs"]
            for epoch in range(1, n_epochs + 1):
                t0 = time.perf_counter()
                self.net.train()
                total, positions = 0.0, 0
                for idx in np.array_split(rng.permutation(len(usable)), max(1, math.ceil(len(usable) / p["batch_size"]))):
                    inp, tgt = _trim(inputs[idx], targets[idx])
                    h = self.net.encode(inp)
                    valid = tgt != 0
                    # Logits only where there is a target: most windows are mostly padding.
                    loss = F.cross_entropy(self.net.item_logits(h[valid]), tgt[valid] - 1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n = int(valid.sum())
                    total += loss.item() * n
                    positions += n
                record = {"epoch": epoch, "loss": total / positions, "seconds": time.perf_counter() - t0}
                line = f"sasrec epoch {epoch}/{n_epochs} loss {record['loss']:.4f} {record['seconds']:.1f}s"
                if val_histories is not None:
                    t0 = time.perf_counter()
                    ndcg = self.validate(val_histories, val_targets)
                    record["val_ndcg@10"], record["val_seconds"] = ndcg, time.perf_counter() - t0
                    line += f" val ndcg@10 {ndcg:.4f} ({record['val_seconds']:.1f}s)"
                    if ndcg > best:
                        best, best_state, stale = ndcg, copy.deepcopy(self.net.state_dict()), 0
                    else:
                        stale += 1
                self.training_log.append(record)
                self._log(line)
                if val_histories is not None and stale >= p["patience"]:
                    self._log(f"sasrec early stop: best val ndcg@10 {best:.4f} at epoch {epoch - stale}")
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)

    def _new_net(self, n_items: int) -> SASRecNet:
        p = self.params
        return SASRecNet(n_items, p["hidden"], p["blocks"], p["heads"], p["max_len"], p["dropout"])

    def state(self) -> dict[str, torch.Tensor]:
        """What `restore` takes back (the evaluation's output cache, the guided evaluator's files)."""
        if self.net is None:
            raise RuntimeError("SASRec.state called before fit")
        return self.net.state_dict()

    def restore(self, state: dict, n_items: int) -> None:
        """Take the weights of an earlier fit with these parameters on the same sequences
        (evaluation's output cache, pagellm/eval/output_cache.py) instead of fitting."""
        self.n_items = n_items
        self.net = self._new_net(n_items)
        self.net.load_state_dict(state)

    def validate(self, histories: list[list[int]], targets: list[list[int]]) -> float:
        """Full-ranking NDCG@10 with each user's history items masked."""
        return validation_ndcg(self, histories, targets, self.params["score_batch"])

    @torch.no_grad()
    def score(self, histories: list[list[int]]) -> np.ndarray:
        """Scores of every item after each history (its last max_len items)."""
        if self.net is None:
            raise RuntimeError("SASRec.score called before fit")
        check_sequences(histories, self.n_items, "histories")
        self.net.eval()
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        step = self.params["score_batch"]
        with TorchThreads(self.params["threads"]):
            for a in range(0, len(histories), step):
                (seqs,) = _trim(torch.from_numpy(_left_pad(histories[a : a + step], self.params["max_len"])))
                h = self.net.encode(seqs)[:, -1]
                out[a : a + len(seqs)] = self.net.item_logits(h).numpy()
        return out
