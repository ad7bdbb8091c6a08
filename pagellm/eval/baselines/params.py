"""Every baseline's name and its hyperparameters with their defaults, without torch.

`pagellm.config` checks `eval.baselines` (names) and `eval.sasrec` (parameter names) against
this table when a config loads, and the baselines take their defaults from it, so a name or
parameter is accepted at load time if and only if the baseline knows it.
"""

from __future__ import annotations

from typing import Any

# SASRec (pagellm/eval/baselines/sasrec.py): the paper's settings unless noted.
SASREC_DEFAULTS: dict[str, Any] = {
    "hidden": 64,
    "blocks": 2,
    "heads": 1,
    "max_len": 50,
    # The paper used 0.5 on Amazon with BCE; with full CE, 0.3 is the verified setting
    # (Beauty 5-core, leave-one-out full ranking: test NDCG@10 0.0552, HR@10 0.0914 at 20 epochs).
    "dropout": 0.3,
    "lr": 1e-3,
    "batch_size": 128,
    "epochs": 20,
    "seed": 0,
    # Intra-op threads. A d=64 model's ops are too small to amortise thread hand-offs, and
    # on a shared 2-core box 2 threads measured 10x slower per batch than 1 (spin-waits).
    # None: every core this process may use.
    "threads": 1,
    "patience": 3,  # epochs without a better validation NDCG@10 before stopping
    "score_batch": 1024,
    "verbose": True,
}

# Baseline name (as in `eval.baselines`) -> its parameters and their defaults.
BASELINE_PARAMS: dict[str, dict[str, Any]] = {"popularity": {}, "sasrec": SASREC_DEFAULTS}
BASELINES: tuple[str, ...] = tuple(BASELINE_PARAMS)
