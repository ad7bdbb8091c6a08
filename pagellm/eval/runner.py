"""Evaluate every page-writer of a run on the same users and split (docs/ARCHITECTURE.md §7).

Each model produces, per user, a 100-item ranked list (its first page_len items are the
served page) and a full score vector over items. Baselines rank items by their scores;
policies write the list by greedy constrained decoding and score items from the
item-token distribution at the page's first position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from pagellm.config import Config
from pagellm.eval.baselines import make_baseline, rank
from pagellm.eval.metrics import evaluate_full_ranking, evaluate_lists, history_mask, tail_items_from_counts


@dataclass
class EvalSet:
    """The users evaluated and what each model sees of them."""

    user_index: np.ndarray
    prompts: list[list[int]]  # recent positives before the evaluated split (policy prompt)
    histories: list[list[int]]  # all positives before the split (baseline input)
    train_sequences: list[list[int]]  # training positives of every user (baseline fit)
    exclude: list[set[int]]  # everything seen before the split
    targets: list[list[int]]  # held-out positives of the split, in time order
    n_items: int
    cats_of: dict[int, set[str]]
    popularity: np.ndarray


def load_eval_set(data_dir: Path, split: str, max_users: int | None) -> EvalSet:
    evals = pd.read_parquet(data_dir / "eval.parquet")
    items = pd.read_parquet(data_dir / "items.parquet")
    if split == "test":
        prompts, seen, targets = evals["prompt_test"], evals["seen_before_test"], evals["test_items"]
        histories = [list(a) + list(b) for a, b in zip(evals["train_positives"], evals["val_items"])]
    elif split == "val":
        prompts, seen, targets = evals["prompt_val"], evals["train_items"], evals["val_items"]
        histories = [list(a) for a in evals["train_positives"]]
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    keep = np.flatnonzero(targets.map(len).to_numpy() > 0)
    if max_users:
        keep = keep[:max_users]
    return EvalSet(
        user_index=evals["user_index"].to_numpy()[keep],
        prompts=[list(prompts.iloc[i]) for i in keep],
        histories=[histories[i] for i in keep],
        train_sequences=[list(s) for s in evals["train_positives"] if len(s)],
        exclude=[set(seen.iloc[i]) for i in keep],
        targets=[list(targets.iloc[i]) for i in keep],
        n_items=len(items),
        cats_of={int(i): set(c) for i, c in zip(items["index"], items["categories"])},
        popularity=items["popularity"].to_numpy(),
    )


@dataclass
class ModelOutput:
    lists: list[list[int]]
    scores: Callable[[int, int], np.ndarray]  # (start, stop) -> [stop-start, n_items]
    seconds: float


def baseline_output(name: str, params: dict, es: EvalSet, list_len: int, seed: int) -> ModelOutput:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if name == "sasrec":  # SASRec seeds its own init and order: one run's seed for every model
        params = {"seed": seed, **params}
    model = make_baseline(name, params if name != "popularity" else None)
    model.fit(es.train_sequences, es.n_items)
    lists = rank(model, es.histories, list_len, exclude=es.exclude)
    return ModelOutput(lists, lambda a, b: model.score(es.histories[a:b]), time.perf_counter() - t0)


def policy_output(policy_dir: Path, es: EvalSet, list_len: int, batch_size: int, exclude: bool) -> ModelOutput:
    from pagellm.models.decoding import first_item_scores, generate_pages
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    t0 = time.perf_counter()
    model, tokenizer, layout = load_policy(policy_dir, trainable=False)
    model.eval()
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    lists: list[list[int]] = []
    with torch.inference_mode():
        for a in range(0, len(prompts), batch_size):
            batch = generate_pages(model, layout, prompts[a : a + batch_size], k=list_len, mode="greedy",
                                   exclude=es.exclude[a : a + batch_size] if exclude else None)
            lists.extend(batch.items)

    def scores(a: int, b: int) -> np.ndarray:
        with torch.inference_mode():
            return first_item_scores(model, layout, prompts[a:b]).float().numpy()

    return ModelOutput(lists, scores, time.perf_counter() - t0)


def sim_utilities(sim, es: EvalSet, item_ids: list[str], user_ids: list[str], pages: list[list[int]]) -> np.ndarray:
    users = [user_ids[u] for u in es.user_index]
    return sim.page_utility(users, [[item_ids[i] for i in p] for p in pages])


def score_model(out: ModelOutput, es: EvalSet, cfg: Config, tail: set, sim_ctx) -> dict:
    k = cfg.data.page_len
    metrics = evaluate_lists(out.lists, es.targets, es.cats_of, es.n_items, set(range(es.n_items)),
                             page_len=k, tail_items=tail)
    mask = history_mask([sorted(s) for s in es.exclude], es.n_items)
    metrics |= evaluate_full_ranking(out.scores, mask, es.targets, n_items=es.n_items, hr_ks=(10,))
    if sim_ctx is not None:
        sim, item_ids, user_ids, oracle = sim_ctx
        util = sim_utilities(sim, es, item_ids, user_ids, [lst[:k] for lst in out.lists])
        metrics["sim_utility"] = float(util.mean())
        metrics["sim_utility_ratio"] = float(util.mean() / oracle.mean()) if oracle.mean() > 0 else None
    metrics["seconds"] = round(out.seconds, 2)
    return metrics


def policy_dirs(run_dir: Path) -> dict[str, Path]:
    """The trained policies of a run, in pipeline order."""
    found = {}
    for name in ("sft", "ppo"):
        d = run_dir / name
        if (d / "pagellm_policy.json").exists() or (d / "adapter_config.json").exists():
            found[name] = d
    return found


def run_eval_stage(cfg: Config, run_dir: Path, split: str = "test", log=print) -> dict:
    """Evaluate baselines and the run's policies; writes eval/metrics.json, report.md, plots."""
    from pagellm.eval.report import write_report
    from pagellm.runfolder import write_json

    data_dir, out_dir = run_dir / "data", run_dir / "eval"
    if not (data_dir / "eval.parquet").exists():
        raise FileNotFoundError(f"{data_dir}/eval.parquet not found: run `pagellm data --run {run_dir}` first")
    es = load_eval_set(data_dir, split, cfg.eval.max_users)
    vocab = pd.read_parquet(data_dir / "vocab.parquet")
    user_ids = vocab.loc[vocab["kind"] == "user", "raw_id"].tolist()
    item_ids = vocab.loc[vocab["kind"] == "item", "raw_id"].tolist()
    tail = tail_items_from_counts(es.popularity)
    log(f"[eval] {len(es.prompts):,} users with {split} positives, {es.n_items:,} items")

    sim_ctx = None
    if (data_dir / "simulator").exists():
        from pagellm.data.simulator import Simulator

        sim = Simulator.load(data_dir / "simulator")
        oracle_pages = sim.oracle_page([user_ids[u] for u in es.user_index], cfg.data.page_len,
                                       [{item_ids[i] for i in s} for s in es.exclude])
        oracle = sim.page_utility([user_ids[u] for u in es.user_index], oracle_pages)
        sim_ctx = (sim, item_ids, user_ids, oracle)

    models: dict[str, dict] = {}
    for name in cfg.eval.baselines:
        log(f"[eval] baseline {name}")
        out = baseline_output(name, cfg.eval.sasrec if name == "sasrec" else {}, es, cfg.eval.list_len, cfg.seed)
        models[name] = score_model(out, es, cfg, tail, sim_ctx)
    for name, path in policy_dirs(run_dir).items():
        log(f"[eval] policy {name} ({path})")
        out = policy_output(path, es, cfg.eval.list_len, cfg.eval.batch_size, cfg.eval.exclude_history)
        models[name] = score_model(out, es, cfg, tail, sim_ctx)
    for name, m in models.items():
        util = f" sim_utility {m['sim_utility']:.4f}" if "sim_utility" in m else ""
        log(f"[eval] {name:<10} ndcg@100 {m['ndcg@100']:.4f} ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} "
            f"full/ndcg@100 {m['full/ndcg@100']:.4f}{util} invalid {m['invalid_rate']:.3f}")

    result = {
        "dataset": cfg.data.source if cfg.data.source == "simulator" else f"{cfg.data.source}:{cfg.data.path}",
        "split": split,
        "split_method": cfg.data.split,
        "users": len(es.prompts),
        "items": es.n_items,
        "page_len": cfg.data.page_len,
        "list_len": cfg.eval.list_len,
        "models": models,
    }
    if sim_ctx is not None:
        result["sim_oracle_utility"] = float(sim_ctx[3].mean())
    write_json(out_dir / "metrics.json", result)
    write_report(result, run_dir, out_dir)
    log(f"[eval] wrote {out_dir}/metrics.json, report.md and plots")
    return result
