"""Stage 3, `stage3.algorithm: degre`: dense-supervised generative reranking.

Three steps, each resumable from what it leaves in <run>/degre/:
  1. evaluator/     the lookahead evaluator (pagellm/models/lookahead.py), fitted in the
                    driver on the run's data only: golden pages, the pairs' pages and
                    random pages, with per-item values from the users' training ratings
                    (cumulative regression) and Bradley–Terry on the pairs. Small: it never
                    serves, so it need not be the policy's size.
  2. mined.parquet  beam search (pagellm/models/beam_mining.py, B = degre.beam) over the SFT
                    policy's proposals for every training prompt; per page its value, its
                    weight B·softmax(V/τ_w) and per step the proposals' soft labels.
                    `degre.value_model: page_prior` scores the beams with the page prior of
                    the reward stage (<run>/reward/page_prior.json) instead, and step 1 is
                    skipped.
  3. distillation   of the SFT policy on the mined pages (pagellm/train/distill_loss.py) on
                    Ray Train + DeepSpeed like SFT, scored on validation every epoch and
                    published like every stage 3 (pagellm/train/stage3_publish.py).
The evaluator is not needed once the policy is distilled: the served model decodes greedily.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from pagellm.config import Config, DeGReConfig
from pagellm.models.lookahead import (
    LookaheadEvaluator,
    cumulative_regression_loss,
    cumulative_targets,
    page_values,
    pair_loss,
    rating_value,
)
from pagellm.runfolder import write_json

EVALUATOR_DIR, MINED_FILE = "evaluator", "mined.parquet"


# ----------------------------------------------------------------------------- 1. evaluator


def training_values(cfg: Config, data_dir: Path) -> dict[int, dict[int, float]]:
    """user -> item -> value of the user's *training* ratings (`rating_value`; the best
    rating of an item rated twice). Nothing of validation or test is read."""
    inter = pd.read_parquet(data_dir / "interactions.parquet", columns=["user_index", "item_index", "rating", "split"])
    train = inter[inter["split"] == "train"]
    rated = train["rating"].dropna()
    low, high = (cfg.data.rating_scale if cfg.data.rating_scale
                 else (float(rated.min()), float(rated.max())) if len(rated) else (0.0, 1.0))
    best = train.groupby(["user_index", "item_index"])["rating"].max()
    values: dict[int, dict[int, float]] = {}
    for (user, item), rating in best.items():
        values.setdefault(int(user), {})[int(item)] = rating_value(float(rating), cfg.data.positive_threshold, low, high)
    return values


class PageExample(NamedTuple):
    user: int
    prompt: list[int]  # token ids
    page: list[int]  # item indices
    targets: np.ndarray  # cumulative targets, one per item


class PairExample(NamedTuple):
    user: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    family: str


def evaluator_examples(cfg: Config, data_dir: Path, encoder, values: dict, seed: int
                       ) -> tuple[list[PageExample], list[PairExample]]:
    """Pages with cumulative targets (golden pages, both pages of every pair, and
    `degre.evaluator.negatives` random pages per golden page) and the pairs."""
    rng = np.random.default_rng(seed)
    n_items = encoder.layout.n_items
    sft = pd.read_parquet(data_dir / "sft.parquet")
    pairs = pd.read_parquet(data_dir / "pairs.parquet")

    def example(user: int, prompt_tokens: list[int], page) -> PageExample:
        page = [int(i) for i in page]
        mine = values.get(user, {})
        return PageExample(user, prompt_tokens, page, cumulative_targets(np.array([mine.get(i, 0.0) for i in page])))

    pages: list[PageExample] = []
    for user, prompt, target in zip(sft["user_index"], sft["prompt"], sft["target"]):
        tokens = encoder.encode_prompt(int(user), prompt)
        pages.append(example(int(user), tokens, target))
        banned = set(int(i) for i in prompt)
        for _ in range(cfg.degre.evaluator.negatives):
            pool = rng.choice(n_items, size=min(n_items, cfg.data.page_len + len(banned)), replace=False)
            pages.append(example(int(user), tokens, [int(i) for i in pool if int(i) not in banned][: cfg.data.page_len]))
    pair_rows: list[PairExample] = []
    for user, prompt, chosen, rejected, family in zip(pairs["user_index"], pairs["prompt"], pairs["chosen"],
                                                       pairs["rejected"], pairs["family"]):
        tokens = encoder.encode_prompt(int(user), prompt)
        pair_rows.append(PairExample(int(user), tokens, [int(i) for i in chosen], [int(i) for i in rejected], family))
        pages += [example(int(user), tokens, chosen), example(int(user), tokens, rejected)]
    return [p for p in pages if p.page], pair_rows


def _batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[a : a + size] for a in range(0, n, size)]


def _regression(evaluator, batch: list[PageExample], layout) -> torch.Tensor:
    values = page_values(evaluator, [e.prompt for e in batch], [e.page for e in batch], layout.item_offset,
                         layout.pad_id)
    targets, mask = torch.zeros_like(values), torch.zeros_like(values)
    for r, e in enumerate(batch):
        targets[r, : len(e.page)] = torch.as_tensor(e.targets, dtype=values.dtype)
        mask[r, : len(e.page)] = 1.0
    return cumulative_regression_loss(values, targets, mask)


def _final_values(evaluator, prompts, pages, layout) -> torch.Tensor:
    """V_K of each page (its last prefix value)."""
    values = page_values(evaluator, prompts, pages, layout.item_offset, layout.pad_id)
    return values[torch.arange(len(pages)), torch.tensor([len(p) - 1 for p in pages])]


def _pair_values(evaluator, batch: list[PairExample], layout) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [e.prompt for e in batch]
    return (_final_values(evaluator, prompts, [e.chosen for e in batch], layout),
            _final_values(evaluator, prompts, [e.rejected for e in batch], layout))


def _evaluate(evaluator, pages, pairs, layout, batch_size: int) -> dict[str, float]:
    evaluator.eval()
    with torch.no_grad():
        reg = [float(_regression(evaluator, [pages[i] for i in b], layout)) * len(b)
               for b in _batches(len(pages), batch_size, None)]
        margins = torch.cat([torch.sub(*_pair_values(evaluator, [pairs[i] for i in b], layout))
                             for b in _batches(len(pairs), batch_size, None)]) if pairs else torch.zeros(0)
    evaluator.train()
    out = {"regression": sum(reg) / max(1, len(pages)),
           "pair_loss": float(-torch.nn.functional.logsigmoid(margins).mean()) if len(margins) else 0.0,
           "pair_accuracy": float((margins > 0).float().mean()) if len(margins) else float("nan")}
    for family in sorted({p.family for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.family == family]
        out[f"pair_accuracy/{family}"] = float((margins[idx] > 0).float().mean())
    return out


def fit_evaluator(cfg: Config, run_dir: Path, encoder, log=print) -> dict:
    """Fit the lookahead evaluator (early-stopped on held-out users' regression + pair loss)
    and save it to <run>/degre/evaluator; returns its metrics (also in metrics.json there)."""
    ecfg = cfg.degre.evaluator
    layout = encoder.layout
    data_dir, out = run_dir / "data", run_dir / "degre" / EVALUATOR_DIR
    values = training_values(cfg, data_dir)
    pages, pairs = evaluator_examples(cfg, data_dir, encoder, values, cfg.seed)
    users = np.array(sorted({p.user for p in pages}))
    held = set(np.random.default_rng(cfg.seed).permutation(users)[: max(1, int(len(users) * ecfg.val_fraction))])
    train_pages, val_pages = [p for p in pages if p.user not in held], [p for p in pages if p.user in held]
    train_pairs, val_pairs = [p for p in pairs if p.user not in held], [p for p in pairs if p.user in held]
    log(f"[degre] evaluator: {len(train_pages):,} pages and {len(train_pairs):,} pairs to fit, "
        f"{len(val_pages):,} / {len(val_pairs):,} of {len(held)} held-out users to stop on")
    # Room for the longest prompt any stage writes (history_len items and the template)
    # and a whole page: mining reads prompts the fitting examples may not have held.
    template = len(layout.prefix_ids) + 1 + len(layout.head_ids) + len(layout.tail_ids)
    room = max(max(len(p.prompt) + len(p.page) for p in pages), template + cfg.data.history_len + cfg.data.page_len) + 1
    evaluator = LookaheadEvaluator.build(layout.vocab_size, layout.n_items, room, ecfg.n_layer, ecfg.n_embd,
                                         ecfg.n_head, cfg.seed)
    optimiser = torch.optim.AdamW(evaluator.parameters(), lr=ecfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, history, waited = float("inf"), None, [], 0
    evaluator.train()
    t0 = time.perf_counter()
    for epoch in range(1, ecfg.epochs + 1):
        page_batches = _batches(len(train_pages), ecfg.batch_size, rng)
        pair_batches = _batches(len(train_pairs), ecfg.batch_size, rng) if train_pairs else []
        for step, b in enumerate(page_batches):
            loss = _regression(evaluator, [train_pages[i] for i in b], layout)
            if pair_batches and ecfg.bt_weight > 0:  # one pair batch per page batch, cycling
                pb = pair_batches[step % len(pair_batches)]
                loss = loss + ecfg.bt_weight * pair_loss(*_pair_values(evaluator, [train_pairs[i] for i in pb], layout))
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(evaluator.parameters(), 1.0)
            optimiser.step()
        record = {"epoch": epoch, **_evaluate(evaluator, val_pages, val_pairs, layout, 256)}
        score = record["regression"] + ecfg.bt_weight * record["pair_loss"]
        history.append(record)
        log(f"[degre] evaluator epoch {epoch}/{ecfg.epochs}: held-out regression {record['regression']:.4f}, "
            f"pair accuracy {record['pair_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")
        if score < best - 1e-6:
            best, best_state, waited = score, {k: v.clone() for k, v in evaluator.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= ecfg.patience:
                log(f"[degre] evaluator: stopping after epoch {epoch} ({ecfg.patience} without a better held-out loss)")
                break
    evaluator.load_state_dict(best_state)
    evaluator.save_pretrained(str(out), safe_serialization=True)
    best_record = min(history, key=lambda r: r["regression"] + ecfg.bt_weight * r["pair_loss"])
    metrics = {"best": best_record, "history": history, "pages": len(train_pages), "pairs": len(train_pairs)}
    write_json(out / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------- 2. mining


def value_model(cfg: Config, run_dir: Path, layout):
    """What values the beams (`degre.value_model`): the lookahead evaluator step 1 fitted, or
    the page prior the reward stage fitted."""
    from pagellm.models.beam_mining import EvaluatorGains, PriorGains
    from pagellm.models.page_prior import PagePrior, item_categories

    if cfg.degre.value_model == "lookahead":
        return EvaluatorGains(LookaheadEvaluator.from_pretrained(str(run_dir / "degre" / EVALUATOR_DIR)), layout.pad_id)
    prior = PagePrior.load(run_dir / "reward")  # run_degre_stage checked that it exists
    return PriorGains(prior, item_categories(run_dir / "data"))


MINING_SETTINGS = ("value_model", "policy_weight", "beam", "expand", "prompts")  # what decides the mined pages


def mining_settings(d: DeGReConfig) -> dict:
    return {key: getattr(d, key) for key in MINING_SETTINGS}


def mine(cfg: Config, run_dir: Path, log=print) -> dict:
    """Beam-mine pages for every training prompt (`degre.prompts`) with the SFT policy and
    the evaluator; writes <run>/degre/mined.parquet and returns counts."""
    from pagellm.models.beam_mining import mine_pages
    from pagellm.models.policy import load_policy
    from pagellm.rl.prompts import prompt_rows
    from pagellm.train.distill_loss import page_weights, soft_labels
    from pagellm.vocab import PromptEncoder

    d = cfg.degre
    policy, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    encoder = PromptEncoder(tokenizer, layout)
    gains_of = value_model(cfg, run_dir, layout)
    rows = prompt_rows(cfg, run_dir, d.prompts)
    out: dict[str, list] = {k: [] for k in ("user_index", "prompt", "page", "value", "weight", "proposals", "soft")}
    chunk, t0 = 32, time.perf_counter()
    log(f"[degre] mining {d.beam} pages for each of {len(rows):,} prompts ({d.prompts}), {d.expand} proposals per beam, "
        f"valued by the {d.value_model.replace('_', ' ')}" + (f" + {d.policy_weight} x log-probability" if d.policy_weight else ""))
    for a in range(0, len(rows), chunk):
        part = rows[a : a + chunk]
        mined = mine_pages(policy, gains_of, layout, [encoder.encode_prompt(u, p) for u, p, _, _ in part],
                           [banned for _, _, banned, _ in part], cfg.data.page_len, d.beam, d.expand, d.policy_weight)
        for (user, prompt, _, _), pages in zip(part, mined):
            weights = page_weights(np.array([m.value for m in pages]), d.tau_w)
            for m, w in zip(pages, weights):
                out["user_index"].append(user)
                out["prompt"].append(prompt)
                out["page"].append(m.items)
                out["value"].append(m.value)
                out["weight"].append(float(w))
                out["proposals"].append(m.proposals)
                out["soft"].append([soft_labels(np.array(g), d.soft_temperature).tolist() for g in m.gains])
        done = min(a + chunk, len(rows))
        if done == len(rows) or (a // chunk) % 10 == 9:
            log(f"[degre] mined {done:,}/{len(rows):,} prompts ({time.perf_counter() - t0:.0f}s)")
    frame = pd.DataFrame(out)
    path = run_dir / "degre" / MINED_FILE
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp)
    tmp.replace(path)  # a reader (a resumed run) never sees half a file
    return {"prompts": len(rows), "pages": len(frame), "seconds": round(time.perf_counter() - t0, 1),
            "mean_value": float(frame["value"].mean()), "settings": mining_settings(d)}


# ----------------------------------------------------------------------------- 3. distillation


class MinedRow(NamedTuple):
    row: object  # pagellm.train.sft_rows.Row
    weight: float
    proposals: list[list[int]]
    soft: list[list[float]]


def collate_mined(batch: list[MinedRow], pad_id: int, anchor: int | None, width: int) -> dict:
    """SFT's collate plus, per page item position in the same row-major order as the
    targets, the page's weight and the step's proposals with their soft labels (padded to
    `width` with probability 0)."""
    from pagellm.train.sft_rows import collate

    out = collate([m.row for m in batch], pad_id, anchor)
    proposals, soft, weights = [], [], []
    for m in batch:
        for items, probs in zip(m.proposals, m.soft):
            proposals.append(list(items) + [items[0]] * (width - len(items)))
            soft.append(list(probs) + [0.0] * (width - len(probs)))
            weights.append(m.weight)
    out |= {"proposals": torch.tensor(proposals, dtype=torch.long), "soft": torch.tensor(soft, dtype=torch.float32),
            "weights": torch.tensor(weights, dtype=torch.float32)}
    return out


def distill_step(engine, batch: dict, layout, alpha: float):
    """One distillation loss on a batch of mined pages (the policy's constrained item
    log-probabilities at each page position, as SFT's item loss takes them)."""
    from pagellm.train.distill_loss import distill_loss
    from pagellm.train.sft import _labelled_hidden, constrained_log_softmax, item_logits

    batch = {k: v.to(engine.device) for k, v in batch.items()}
    hidden, _ = _labelled_hidden(engine, batch)
    module = getattr(engine, "module", engine)
    logp = constrained_log_softmax(item_logits(module, hidden, layout), batch["blocked"])
    positions, hard = batch["targets"][0], batch["targets"][1]  # one mined item per page position
    return distill_loss(logp[positions], hard, batch["proposals"], batch["soft"], batch["weights"], alpha)


def _distill_loop(config: dict) -> None:
    """One Ray Train worker: distill the SFT policy on the mined pages."""
    from pagellm.eval.probe import RankingProbe, val_metric
    from pagellm.models.policy import load_policy, save_policy
    from pagellm.models.positions import prompt_anchor
    from pagellm.train.engine import build_engine, micro_batch_size, setup_distributed_for_deepspeed
    from pagellm.train.harness import distributed_loader, patience_exhausted, run_epochs
    from pagellm.train.sft_rows import TokenRows, page_rows
    from pagellm.vocab import PromptEncoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Config.model_validate(config["cfg"])
    train_cfg = DeGReConfig.model_validate(config["train_cfg"])
    run_dir = Path(config["run_dir"])
    setup_distributed_for_deepspeed()
    import torch.distributed as dist

    torch.manual_seed(cfg.seed)
    model, tokenizer, layout = load_policy(run_dir / "sft", cfg.model, trainable=True)
    encoder = PromptEncoder(tokenizer, layout)
    mined = pd.read_parquet(run_dir / "degre" / MINED_FILE)
    rows = page_rows(encoder, mined["user_index"], mined["prompt"], mined["page"], 0.0, cfg.seed)
    data = TokenRows([MinedRow(r, float(w), [list(s) for s in p], [list(s) for s in q])
                      for r, w, p, q in zip(rows, mined["weight"], mined["proposals"], mined["soft"])])
    probe = RankingProbe.from_data(run_dir / "data", encoder, cfg.data.page_len, train_cfg.val_users,
                                  part="stage3")
    mbs = micro_batch_size(train_cfg.batch_size, dist.get_world_size())
    pad = partial(collate_mined, pad_id=layout.pad_id, anchor=prompt_anchor(model), width=train_cfg.expand)
    loader = distributed_loader(data, mbs, shuffle=True, seed=cfg.seed, collate_fn=pad)
    engine = build_engine(model, None, train_cfg, len(loader) * train_cfg.epochs, train_cfg.use_gpu)

    def save_fn(module, state_dict, out_dir):
        save_policy(module, tokenizer, layout, out_dir, state_dict=state_dict)

    metric = val_metric(cfg.data.page_len)
    run_epochs(engine, loader, partial(distill_step, layout=layout, alpha=train_cfg.alpha), epochs=train_cfg.epochs,
               name="degre", save_fn=save_fn, eval_fn=lambda eng: probe(eng.module, layout),
               log_every=train_cfg.log_every,
               should_stop=lambda history: patience_exhausted(history, metric, train_cfg.patience))


def run_degre_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Evaluator, mining, distillation and publishing (module doc); returns DONE's summary."""
    from pagellm.eval.probe import val_metric
    from pagellm.models.page_prior import PRIOR_FILE
    from pagellm.train.harness import HF_SUBDIR, fit
    from pagellm.train.stage3_publish import publish_epochs, sft_probe_score
    from pagellm.vocab import PromptEncoder, load_tokenizer

    if not (run_dir / "sft" / "metrics.json").exists():
        raise FileNotFoundError(f"{run_dir}/sft not found: run `pagellm sft --run {run_dir}` first")
    t0 = time.perf_counter()
    out = run_dir / "degre"
    out.mkdir(parents=True, exist_ok=True)
    mined_info = out / "mined.json"
    if mined_info.exists():  # a resumed stage: its mined pages must be the ones this config asks for
        mined_with = json.loads(mined_info.read_text()).get("settings")  # absent in older runs: not known
        if mined_with is not None and mined_with != mining_settings(cfg.degre):
            changed = ", ".join(f"degre.{k} {mined_with.get(k)!r} -> {v!r}" for k, v in mining_settings(cfg.degre).items()
                                if mined_with.get(k) != v)
            raise ValueError(f"{out}: its pages were mined with other settings ({changed}); start the stage afresh "
                             f"(`pagellm run --run {run_dir} --from degre` clears it and its checkpoints)")
    evaluator_metrics = out / EVALUATOR_DIR / "metrics.json"
    if cfg.degre.value_model == "page_prior":
        prior_file = run_dir / "reward" / PRIOR_FILE
        if not prior_file.exists():
            raise FileNotFoundError(f"{prior_file} not found: degre.value_model=page_prior mines with the reward "
                                    f"stage's page prior; run `pagellm reward --run {run_dir}` first")
        fit_stats = json.loads(prior_file.read_text()).get("fit", {})
        ev = {"best": {"page_prior": {k: fit_stats.get(k) for k in ("quality_weight", "satiation", "heldout_accuracy")}}}
        log(f"[degre] value model: the page prior of {prior_file.parent} (quality weight "
            f"{fit_stats.get('quality_weight', float('nan')):.3f}, satiation {fit_stats.get('satiation', float('nan')):.3f})")
    elif evaluator_metrics.exists():
        log(f"[degre] evaluator: reusing {evaluator_metrics.parent}")
        ev = json.loads(evaluator_metrics.read_text())
    else:
        ev = fit_evaluator(cfg, run_dir, PromptEncoder(*load_tokenizer(run_dir / "sft")), log)
    if mined_info.exists() and (out / MINED_FILE).exists():
        log(f"[degre] mining: reusing {out / MINED_FILE}")
        mining = json.loads(mined_info.read_text())
    else:
        mining = mine(cfg, run_dir, log)
        write_json(mined_info, mining)
    log(f"[degre] distilling {mining['pages']:,} mined pages: up to {cfg.degre.epochs} epoch(s), alpha "
        f"{cfg.degre.alpha}, tau_w {cfg.degre.tau_w}")
    result = fit(_distill_loop, {"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir.resolve())}, cfg.degre,
                 run_dir, name="degre", checkpoint_score=(val_metric(cfg.data.page_len), "max"))
    summary = {"seconds": round(time.perf_counter() - t0, 1), "pages_generated": mining["pages"],
               "prompts": mining["prompts"], "mined_mean_value": mining["mean_value"],
               "evaluator": {k: v for k, v in ev["best"].items() if k != "epoch"}}
    publish_epochs(cfg, run_dir, result.history, f"{result.best_checkpoint_path}/{HF_SUBDIR}",
                   f"{result.checkpoint_path}/{HF_SUBDIR}", sft_probe_score(cfg, run_dir, cfg.degre.val_users),
                   summary, log)
    return summary
