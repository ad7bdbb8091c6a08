"""Every baseline's name and its hyperparameters with their defaults, without torch.

`pagellm.config` checks `eval.baselines` (names) and `eval.sasrec` / `eval.ease` / `eval.lightgcn` (parameter names) against
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
    # At most this many epochs when a validation step is given (evaluation's test runs): the
    # best epoch on validation NDCG@10 is kept, `patience` epochs without a better one stop it.
    # Beauty plateaus near 20; MovieLens-small's ~5 batches per epoch need far more.
    "epochs": 200,
    # Without a validation step (an evaluation of the validation split itself): a fixed count.
    "fixed_epochs": 20,
    "seed": 0,
    # Intra-op threads. A d=64 model's ops are too small to amortise thread hand-offs, and
    # on a shared 2-core box 2 threads measured 10x slower per batch than 1 (spin-waits).
    # None: every core this process may use.
    "threads": 1,
    # Epochs without a better validation NDCG@10 before stopping. Long, because SASRec's
    # validation plateaus before it climbs again on small data (MovieLens-small: flat from
    # epoch 8 to 17 at 0.026, then 0.058 by epoch 60); 5 stopped it at epoch 8, half its test NDCG.
    "patience": 20,
    "score_batch": 1024,
    "verbose": True,
}

# EASE (pagellm/eval/baselines/ease.py). lambda is chosen on validation NDCG@10 from `lambdas`
# (the paper's best values sit in the hundreds; Musical Instruments chose 250, MovieLens 500).
EASE_DEFAULTS: dict[str, Any] = {
    "lambdas": [50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0],
    # Without a validation step (an evaluation of the validation split itself).
    "fixed_lambda": 250.0,
    # When the best lambda is the grid's smallest (largest), try it / (x) `edge_factor`, up to
    # `edge_steps` times while validation improves: Amazon Beauty's best was below 50.
    "edge_steps": 3,
    "edge_factor": 2.5,
    # A larger catalogue is refused before any work: the fit holds ~3 n_items^2 float64
    # matrices (25,000 items: ~15 GB). Raise it on a machine with the memory.
    "max_items": 25_000,
    "score_batch": 1024,
    "verbose": True,
}

# LightGCN (pagellm/eval/baselines/lightgcn.py): the paper's settings (64 dimensions, 3
# layers, BPR batch 2048, L2 1e-4) with the epoch chosen on validation NDCG@10, but Adam at
# 1e-2 instead of 1e-3: small tables have a few batches per epoch, and at 1e-3 MovieLens
# peaked at validation NDCG@10 0.035 (epoch 55) against 0.045 at 1e-2 (epoch 60); Musical
# Instruments was level (0.0665 / 0.0658). Beauty peaks by epoch 15 at 1e-2 (0.0344) but
# creeps past it at 1e-3 (0.0369 by epoch 200, ten times the fit; docs/BENCHMARKS.md).
LIGHTGCN_DEFAULTS: dict[str, Any] = {
    "dim": 64,
    "layers": 3,
    "lr": 1e-2,
    "reg": 1e-4,
    "batch_size": 2048,
    "init_std": 0.1,
    # With a validation step: at most `epochs`, validated every `eval_every`, stopped after
    # `patience` validations without a better NDCG@10, the best kept.
    "epochs": 1000,
    "eval_every": 5,
    "patience": 10,
    "fixed_epochs": 200,  # without a validation step
    "seed": 0,
    "threads": None,  # sparse products over the whole graph: every core this process may use
    "score_batch": 1024,
    "verbose": True,
}

# Baseline name (as in `eval.baselines`) -> its parameters and their defaults.
BASELINE_PARAMS: dict[str, dict[str, Any]] = {"popularity": {}, "sasrec": SASREC_DEFAULTS, "ease": EASE_DEFAULTS,
                                              "lightgcn": LIGHTGCN_DEFAULTS}
BASELINES: tuple[str, ...] = tuple(BASELINE_PARAMS)
