"""Stage 2 of training: the multi-grained reward model on preference pairs (Ray Train + DeepSpeed).

Driver: `run_reward_stage(cfg, run_dir)` splits the pairs by user (no user on both sides),
trains on `reward.workers` Ray Train workers (one DeepSpeed engine each, ZeRO from config),
stops early on the validation Bradley–Terry log-likelihood of R (the sum of the enabled
heads) after `reward.patience` epochs without a new best, publishes the best epoch's
weights to <run>/reward/, scores the held-out pairs with `RewardScorer` and writes
metrics.json, report.md and accuracy_by_family.png there.

Each batch of B pairs is one forward of 2B rows (the B chosen pages, then the B rejected
pages), so both sides of a pair are scored by the same weights in the same step.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pagellm.config import Config, RewardConfig
from pagellm.models.page_prior import PagePrior
from pagellm.models.reward import heads_for, pad_pages, reward_model_from_policy, save_reward_model
from pagellm.runfolder import publish_dir, write_json
from pagellm.train.reward_loss import accuracy_by_family, multi_head_loss, pair_accuracy, pair_loglik
from pagellm.vocab import PromptEncoder

REPORT_HEADS = ("coarse", "fine", "sum")
ONPOLICY_FILE = "reward_onpolicy_pairs.parquet"  # in the run folder, beside data/


def user_in_validation(user_index, val_fraction: float, seed: int) -> np.ndarray:
    """True for users whose hash(seed, user) falls below `val_fraction`: a fixed, seeded
    split by user that does not depend on the order or number of rows."""
    def unit(u: int) -> float:
        digest = hashlib.blake2b(f"{seed}:{int(u)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    users = np.asarray(user_index, dtype=np.int64)
    cache = {u: unit(u) < val_fraction for u in np.unique(users).tolist()}
    return np.fromiter((cache[u] for u in users.tolist()), dtype=bool, count=len(users))


class PairRows(Dataset):
    """(prompt_ids, chosen_page_ids, rejected_page_ids, margin) per pair; page ids end with eos."""

    def __init__(self, rows: list[tuple[list[int], list[int], list[int], float]], what: str):
        if not rows:
            raise ValueError(f"no {what} pairs: the data stage built none, or the user split left this side empty")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def pair_rows(encoder: PromptEncoder, pairs: pd.DataFrame) -> list[tuple[list[int], list[int], list[int], float]]:
    """Token rows of `pairs`; margin NaN where the pair has none (the data stage's pairs)."""
    margins = pairs["margin"] if "margin" in pairs else [float("nan")] * len(pairs)
    return [
        (encoder.encode_prompt(int(u), p), encoder.encode_page(c), encoder.encode_page(r), float(m))
        for u, p, c, r, m in zip(pairs["user_index"], pairs["prompt"], pairs["chosen"], pairs["rejected"], margins)
    ]


def collate_pairs(batch, layout) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded rows: chosen pages first, then rejected pages; and the B margins."""
    rows = [(p, c) for p, c, _, _ in batch] + [(p, r) for p, _, r, _ in batch]
    return {**pad_pages(rows, layout), "margin": torch.tensor([m for *_, m in batch], dtype=torch.float32)}


def _split_scores(scores, n: int) -> tuple[dict, dict]:
    by_head = scores.by_head()
    return {h: s[:n] for h, s in by_head.items()}, {h: s[n:] for h, s in by_head.items()}


def training_pairs(data_dir: Path, onpolicy_path: str | None) -> pd.DataFrame:
    """The data stage's pairs, and the on-policy pairs after them when the stage built some."""
    pairs = pd.read_parquet(data_dir / "pairs.parquet")
    if onpolicy_path is None:
        return pairs
    return pd.concat([pairs, pd.read_parquet(onpolicy_path)], ignore_index=True)


def _pair_scores(engine, batch: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor]:
    """Each head's chosen and rejected scores of a collated batch, and its margins."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    margin = batch.pop("margin")
    chosen, rejected = _split_scores(engine(**batch), margin.shape[0])
    return chosen, rejected, margin


def reward_step(engine, batch: dict[str, torch.Tensor]):
    return multi_head_loss(*_pair_scores(engine, batch))


def evaluate_pairs(engine, loader) -> dict[str, float]:
    """Pair-weighted means over this rank's validation shard: the training loss, the
    Bradley–Terry log-likelihood of R = Σ enabled heads, and accuracy per head."""
    sums: dict[str, float] = {}
    n_total = 0
    for batch in loader:
        chosen, rejected, margin = _pair_scores(engine, batch)
        n = margin.shape[0]
        loss, extras = multi_head_loss(chosen, rejected, margin)
        total_c, total_r = sum(chosen.values()), sum(rejected.values())
        values = {"loss": float(loss), "loglik": float(pair_loglik(total_c, total_r).mean()), **extras}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * n
        n_total += n
    return {k: v / max(1, n_total) for k, v in sums.items()}


def param_groups(model, train_cfg: RewardConfig) -> list[dict]:
    """Backbone at `lr`, the fresh heads at `lr x head_lr_mult` (matrices decay, vectors do not).

    Why the heads get more: they start from random on a backbone that already knows the
    items. Measured on the tiny simulator run (30% of users held out, 6 epochs, lr 1e-3,
    fine head without its logit term): heads at 10x reach held-out log-likelihood −0.24 vs
    −0.29 at 1x, ranking accuracy of R_c + R_f 0.78 vs 0.70, redundancy 0.83 vs 0.76.
    """
    from pagellm.train.engine import weight_decay_groups

    groups = weight_decay_groups(model.policy, train_cfg.weight_decay)
    for group in groups:
        group["peak_lr"] = train_cfg.lr
    heads = torch.nn.ModuleList([h for h in (model.coarse, model.fine) if h is not None])
    for group in weight_decay_groups(heads, train_cfg.weight_decay):
        groups.append({**group, "lr": train_cfg.lr * train_cfg.head_lr_mult,
                       "peak_lr": train_cfg.lr * train_cfg.head_lr_mult})
    return groups


def use_group_peak_lrs(engine) -> None:
    """train_ds_config gives DeepSpeed's WarmupDecayLR one peak lr for all groups; give each
    group its own `peak_lr` back, keeping the schedule's shape (warmup, then linear decay)."""
    sched = engine.lr_scheduler
    peaks = [group.get("peak_lr") for group in engine.optimizer.param_groups]
    if None in peaks or len(peaks) != len(sched.max_lrs):
        raise RuntimeError(f"optimizer groups lost their peak_lr ({peaks}); cannot set per-group learning rates")
    sched.max_lrs = peaks
    sched.delta_lrs = [hi - lo for hi, lo in zip(peaks, sched.min_lrs)]


def _train_loop(config: dict) -> None:
    """One Ray Train worker."""
    import torch.distributed as dist

    from pagellm.models.positions import check_context
    from pagellm.train.engine import (build_engine, disable_dropout, micro_batch_size,
                                      setup_distributed_for_deepspeed)
    from pagellm.train.harness import distributed_loader, patience_exhausted, run_epochs

    cfg = Config.model_validate(config["cfg"])
    train_cfg = RewardConfig.model_validate(config["train_cfg"])
    setup_distributed_for_deepspeed()
    torch.manual_seed(cfg.seed)  # same head initialisation on every rank
    model, tokenizer, layout = reward_model_from_policy(
        config["sft_dir"], heads_for(train_cfg.heads), cfg.model, slots=cfg.data.page_len,
        logit_term=train_cfg.logit_term)
    if train_cfg.disable_dropout:
        disable_dropout(model)
    encoder = PromptEncoder(tokenizer, layout)
    pairs = training_pairs(Path(config["data_dir"]), config.get("onpolicy_path"))
    val = user_in_validation(pairs["user_index"], train_cfg.val_fraction, cfg.seed)
    train_rows, val_rows = pair_rows(encoder, pairs[~val]), pair_rows(encoder, pairs[val])
    rows = train_rows + val_rows
    check_context(model.policy, max(len(p) for p, *_ in rows), max(max(len(c), len(r)) for _, c, r, _ in rows))
    mbs = micro_batch_size(train_cfg.batch_size, dist.get_world_size())
    collate = partial(collate_pairs, layout=layout)
    loader = distributed_loader(PairRows(train_rows, "training"), mbs, shuffle=True, seed=cfg.seed, collate_fn=collate)
    val_loader = distributed_loader(PairRows(val_rows, "validation"), mbs, shuffle=False, collate_fn=collate)
    engine = build_engine(model, param_groups(model, train_cfg), train_cfg, len(loader) * train_cfg.epochs,
                          train_cfg.use_gpu)
    use_group_peak_lrs(engine)

    def save_fn(module, state_dict, out_dir):
        save_reward_model(module, tokenizer, layout, out_dir, state_dict=state_dict)

    run_epochs(
        engine, loader, reward_step, epochs=train_cfg.epochs, name="reward", save_fn=save_fn,
        eval_fn=lambda eng: evaluate_pairs(eng, val_loader),
        should_stop=lambda history: patience_exhausted(history, "val_loglik", train_cfg.patience),
        log_every=train_cfg.log_every,
    )


def heldout_scores(reward_dir: str, pairs: pd.DataFrame, device: str = "cpu", batch_size: int = 64) -> dict:
    """R_c and R_f of every held-out pair's chosen and rejected page (numpy arrays)."""
    from pagellm.models.reward_scorer import RewardScorer

    scorer = RewardScorer.load(reward_dir, device=device)
    users, prompts = pairs["user_index"].tolist(), pairs["prompt"].tolist()
    chosen = scorer.score(users, prompts, pairs["chosen"].tolist(), batch_size)
    rejected = scorer.score(users, prompts, pairs["rejected"].tolist(), batch_size)
    return {"heads": list(scorer.heads), "chosen": chosen, "rejected": rejected}


def heldout_metrics(scores: dict, families) -> dict:
    """pair_accuracy per head per family (and over all pairs), score variance per head,
    log-likelihood of R. A head the model was trained without reports None (its zeros
    would read as 0% accuracy)."""
    (c_c, c_f), (r_c, r_f) = scores["chosen"], scores["rejected"]
    per_head = {"coarse": (c_c, r_c), "fine": (c_f, r_f), "sum": (c_c + c_f, r_c + r_f)}
    enabled = set(scores["heads"]) | {"sum"}
    families = list(families)
    accuracy, overall, variance = {}, {}, {}
    for head in REPORT_HEADS:
        chosen, rejected = per_head[head]
        if head in enabled:
            accuracy[head] = accuracy_by_family(chosen, rejected, families)
            overall[head] = pair_accuracy(chosen, rejected)
            variance[head] = float(np.var(np.concatenate([chosen, rejected])))
        else:
            accuracy[head] = {f: None for f in dict.fromkeys(families)}
            overall[head] = variance[head] = None
    c_sum, r_sum = per_head["sum"]
    loglik = float(pair_loglik(torch.from_numpy(c_sum), torch.from_numpy(r_sum)).mean())
    return {"pair_accuracy": accuracy, "pair_accuracy_all": overall, "score_variance": variance, "val_loglik": loglik}


def plot_accuracy(accuracy: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(accuracy["sum"])
    heads = [h for h in REPORT_HEADS if accuracy[h].get(families[0]) is not None] if families else []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(heads))
    for n, head in enumerate(heads):
        xs = np.arange(len(families)) + (n - (len(heads) - 1) / 2) * width
        ax.bar(xs, [accuracy[head][f] for f in families], width, label=head)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(families)), families)
    ax.set_ylim(0, 1.15)  # headroom for the legend above the bars
    ax.set_ylabel("held-out pair accuracy")
    ax.set_title("Reward model: share of held-out pairs with R(chosen) > R(rejected)")
    ax.legend(loc="upper center", ncol=len(heads), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(metrics: dict, path: Path) -> None:
    acc = metrics["pair_accuracy"]
    counts = metrics["val_pairs_by_family"]

    def cell(v):
        return "—" if v is None else f"{v:.3f}"

    lines = [
        "# Reward model",
        "",
        f"Heads: {', '.join(metrics['heads'])}. Pairs: {metrics['pairs']['train']} train, "
        f"{metrics['pairs']['val']} held out (split by user). Epochs run: {metrics['epochs_run']} "
        f"(best: {metrics['best_epoch']}). Held-out log-likelihood of R: {metrics['val_loglik']:.4f}.",
        "",
        "| family | pairs | R_c | R_f | R_c + R_f |",
        "|---|---:|---:|---:|---:|",
    ]
    for family in acc["sum"]:
        cells = " | ".join(cell(acc[h][family]) for h in REPORT_HEADS)
        lines.append(f"| {family} | {counts[family]} | {cells} |")
    overall = " | ".join(cell(metrics["pair_accuracy_all"][h]) for h in REPORT_HEADS)
    lines.append(f"| all | {metrics['pairs']['val']} | {overall} |")
    var = metrics["score_variance"]
    lines += ["", "Score variance over held-out pages: " + ", ".join(f"{h} {cell(var[h])}" for h in REPORT_HEADS), ""]
    path.write_text("\n".join(lines + prior_lines(metrics.get("page_prior"))))


def prior_lines(prior: dict | None) -> list[str]:
    """The reward report's page-prior section (none without a prior)."""
    if not prior:
        return []
    quality = (f"from the next items of {prior['next_item_users']:,} training users"
               if prior.get("quality_source") == "next_item" else "from the pairs")
    held = ", ".join(f"{f} {v:.3f}" for f, v in prior["heldout_accuracy"].items())
    return ["## Page prior", "",
            f"a {prior['pref_weight']:.3f} (preference, held), b {prior['quality_weight']:.3f} (quality, {quality}), "
            f"c {prior['satiation']:.3f} (repeated-category discount, {prior['satiation_source']}). "
            f"Held-out pair accuracy: {held}.", ""]


def fit_prior(cfg: Config, run_dir: Path, pairs: pd.DataFrame, val: np.ndarray, log=print) -> dict:
    """The page prior on the reward stage's user split, from the sources `reward` configures."""
    from pagellm.train.prior import run_prior_fit

    return run_prior_fit(run_dir, pairs, val, cfg.reward.prior_satiation, cfg.reward.prior_quality,
                         cfg.data.history_len, log)


def prior_only_stage(cfg: Config, run_dir: Path, pairs: pd.DataFrame, val: np.ndarray, log=print) -> dict:
    """`reward.heads: none`: the page prior alone, fitted and judged as with the heads; no
    reward model is trained or published (serving's /v1/score then answers 503)."""
    out_dir = run_dir / "reward"
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier run's heads would be read as this stage's
    out_dir.mkdir(parents=True)
    log(f"[reward] heads none: the page prior only, {int((~val).sum())} train / {int(val.sum())} held-out pairs")
    metrics = {"heads": [], "pairs": {"train": int((~val).sum()), "val": int(val.sum())},
               "page_prior": fit_prior(cfg, run_dir, pairs, val, log)}
    write_json(out_dir / "metrics.json", metrics)  # last: it marks the stage done
    (out_dir / "report.md").write_text("\n".join(
        ["# Reward model", "", "No heads trained (`reward.heads: none`): the page prior only.", ""]
        + prior_lines(metrics["page_prior"])))
    return metrics


def build_onpolicy_pairs(cfg: Config, run_dir: Path, log=print) -> Path:
    """`reward.onpolicy_samples` pages per prompt from the SFT policy, paired with the margins
    of the prior just fitted into <run>/reward; written to <run>/ONPOLICY_FILE (the training
    workers read it), whose path is returned. Rebuilt on every call: the same seed and SFT
    policy give the same pairs, so a resumed stage trains on what the interrupted one did."""
    import time

    from pagellm.models.page_prior import item_categories
    from pagellm.train.harness import in_worker
    from pagellm.train.onpolicy_pairs import onpolicy_prompts, write_pairs

    t0 = time.perf_counter()
    prompts = onpolicy_prompts(cfg, run_dir)
    onpolicy = in_worker(write_pairs, (run_dir / "sft").resolve(), prompts, (run_dir / "reward").resolve(),
                         item_categories(run_dir / "data"), cfg.reward.onpolicy_samples, cfg.data.page_len,
                         cfg.seed, "cuda" if cfg.reward.use_gpu else "cpu", gpus=int(cfg.reward.use_gpu))
    if onpolicy.empty:
        raise ValueError(f"reward.onpolicy_samples={cfg.reward.onpolicy_samples}: the prior ranked every "
                         f"sampled page of {len(prompts):,} prompts alike, no on-policy pair")
    tmp = run_dir / (ONPOLICY_FILE + ".tmp")
    onpolicy.to_parquet(tmp)
    tmp.replace(run_dir / ONPOLICY_FILE)  # atomic: a worker never reads half a file
    log(f"[reward] on-policy pairs: {cfg.reward.onpolicy_samples} pages x {len(prompts):,} prompts -> "
        f"{len(onpolicy):,} pairs, each with the page prior's margin ({time.perf_counter() - t0:.0f}s)")
    return (run_dir / ONPOLICY_FILE).resolve()


def run_reward_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Train (or resume) the reward model; writes <run>/reward/ and its metrics."""
    from pagellm.train.harness import fit, in_worker

    run_dir = Path(run_dir)
    data_dir, sft_dir, out_dir = run_dir / "data", run_dir / "sft", run_dir / "reward"
    if not (data_dir / "pairs.parquet").exists():
        raise FileNotFoundError(f"{data_dir}/pairs.parquet not found: run `pagellm data --run {run_dir}` first")
    if not sft_dir.exists():
        raise FileNotFoundError(f"{sft_dir} not found: run `pagellm sft --run {run_dir}` first")
    rc = cfg.reward
    pairs = pd.read_parquet(data_dir / "pairs.parquet")
    val = user_in_validation(pairs["user_index"], rc.val_fraction, cfg.seed)
    if val.all() or not val.any():
        raise ValueError(f"reward.val_fraction={rc.val_fraction} puts {'every' if val.all() else 'no'} user in "
                         f"validation ({pairs['user_index'].nunique()} users with pairs); change it")
    if rc.heads == "none":
        return prior_only_stage(cfg, run_dir, pairs, val, log)
    # The prior first: on-policy pairs are ranked by it. Publishing the heads replaces
    # out_dir, so the fitted prior is saved again after that.
    out_dir.mkdir(parents=True, exist_ok=True)
    prior_stats = fit_prior(cfg, run_dir, pairs, val, log) if rc.page_prior else None
    prior = PagePrior.load(out_dir) if rc.page_prior else None
    loop_config = {"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
                   "sft_dir": str(sft_dir.resolve())}
    if rc.onpolicy_samples:
        loop_config["onpolicy_path"] = str(build_onpolicy_pairs(cfg, run_dir, log))
        # What the workers train on, by the same function: held-out metrics cover the same pairs.
        pairs = training_pairs(data_dir, loop_config["onpolicy_path"])
        val = user_in_validation(pairs["user_index"], rc.val_fraction, cfg.seed)
    log(f"[reward] heads {rc.heads}: {int((~val).sum())} train / {int(val.sum())} held-out pairs, "
        f"{rc.epochs} epoch(s), {rc.workers} worker(s), ZeRO-{rc.zero_stage}")
    # One Ray Train run per head set: an ablation must not resume the other heads' checkpoint.
    name = "reward" if rc.heads == "sum" else f"reward_{rc.heads}"
    result = fit(_train_loop, loop_config, rc, run_dir, name=name, checkpoint_score=("val_loglik", "max"))
    if result.best_checkpoint_path is None:
        raise RuntimeError("reward training finished without a checkpoint")
    publish_dir(Path(result.best_checkpoint_path) / "hf", out_dir)

    held_out = pairs[val].reset_index(drop=True)
    # Where the model was trained (the driver may have no GPU), in a process that exits after.
    scores = in_worker(heldout_scores, str(out_dir.resolve()), held_out, "cuda" if rc.use_gpu else "cpu",
                       rc.batch_size, gpus=int(rc.use_gpu))
    history = result.history
    best = max(history, key=lambda r: r.get("val_loglik", float("-inf"))) if history else {}
    metrics = {
        **heldout_metrics(scores, held_out["family"]),
        "pairs": {"train": int((~val).sum()), "val": int(val.sum())},
        "val_pairs_by_family": {str(k): int(v) for k, v in held_out["family"].value_counts(sort=False).items()},
        "epochs_run": len(history),
        "best_epoch": best.get("epoch"),
        "heads": list(scores["heads"]),
        "history": history,
        "checkpoint": result.best_checkpoint_path,
    }
    if prior is not None:  # before metrics.json, which marks the stage done
        prior.save(out_dir, {"fit": prior_stats})
        metrics["page_prior"] = prior_stats
    write_json(out_dir / "metrics.json", metrics)
    plot_accuracy(metrics["pair_accuracy"], out_dir / "accuracy_by_family.png")
    write_report(metrics, out_dir / "report.md")
    acc = {**metrics["pair_accuracy"]["sum"], "all": metrics["pair_accuracy_all"]["sum"]}
    log("[reward] held-out accuracy of R: " + ", ".join(f"{f} {a:.3f}" for f, a in acc.items()) + f" -> {out_dir}")
    return metrics
