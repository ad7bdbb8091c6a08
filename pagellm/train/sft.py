"""Stage 1 of training: supervised fine-tuning on prompt → golden page (Ray Train + DeepSpeed).

Two Ray Train runs, each resumable and early-stopped on its own:
  meta  (optional, sft.meta_epochs > 0): next-item prediction over each user's training
        history written as a prompt (SASRec's task in the policy's format): every history
        item after the first is a target, and the last is predicted at the prompt's end,
        where every page starts (the template's closing words, or with
        model.prompt_tail=false the history item before it, like every other target).
  sft   the page objective: prompt → golden page, loss on the page's items (`sequence`:
        item t; `set`: any golden item not yet placed).
With sft.item_loss the softmax at each target is over item tokens only, and on a page the
prompt's items and the items already placed are masked: the loss is the negative
log-likelihood constrained decoding gives the golden page. With sft.history_replay the
page phase also trains on the meta phase's rows, so the next-item model it reads from is
kept while the page is learned.

After every epoch the policy writes greedy, constrained pages for a fixed sample of
validation users and ranks every item for them by its first page position (`RankingProbe`).
The pages' NDCG@10 early-stops the page run; the meta run stops on what sft.meta_select
names (its pages, its ranking, or the held-out items' loss). What is published is the best
written page of either run: that checkpoint lands in <run>/sft/, and
<run>/sft/metrics.json["published"] names it. Each worker builds the same model from the
same seed; DeepSpeed shards it (ZeRO from config).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from pagellm.config import Config, SFTConfig
from pagellm.eval.probe import RankingProbe, best_record, val_metric
from pagellm.models.item_init import metadata_vectors
from pagellm.models.policy import build_policy, is_policy_checkpoint, load_policy, save_policy
from pagellm.models.positions import prompt_anchor
from pagellm.runfolder import publish_dir
from pagellm.train.logit_adjust import adjusted, popularity_offsets
from pagellm.train.sft_rows import (IGNORE, TokenRows, collate, history_rows, own_prefix_batch, page_rows,
                                    replay_sample)
from pagellm.train.weight_average import WeightAverage
from pagellm.vocab import PromptEncoder, Vocab


def _labelled_hidden(model, batch: dict):
    """Last hidden state at every position that predicts a label, and those labels.
    `model` is the DeepSpeed engine or the bare model: the forward and the output layer go
    through module calls, so ZeRO-3 gathers their weights."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[keep], targets[keep]


def target_token_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy over the whole vocabulary at the labelled tokens, with the
    output layer applied only where a label is: the model's own `labels=` loss, but the
    vocabulary-wide logits (most of the compute once every user and item is a token) are
    never built for prompt positions."""
    hidden, labels = _labelled_hidden(model, batch)
    module = getattr(model, "module", model)
    logits = module.get_output_embeddings()(hidden)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction=reduction)


def item_logits(module, hidden: torch.Tensor, layout) -> torch.Tensor:
    """[N, n_items] output logits of the item tokens alone. A plain output matrix is sliced
    (user and template rows are never multiplied); anything else (a ZeRO-3 partitioned
    weight, peft's trainable-token wrapper) is called whole and its output sliced."""
    out = module.get_output_embeddings()
    lo, hi = layout.item_offset, layout.item_offset + layout.n_items
    if type(out) is torch.nn.Linear and not hasattr(out.weight, "ds_id"):
        bias = None if out.bias is None else out.bias[lo:hi]
        return torch.nn.functional.linear(hidden, out.weight[lo:hi], bias)
    return out(hidden)[:, lo:hi]


def with_ranking_prior(logits: torch.Tensor, batch: dict, layout) -> torch.Tensor:
    """Item logits [P, n_items] at the labelled positions with model.ranking_prior applied as
    decoding applies it (pagellm/models/decoding.py): every page position after its row's
    first adds layout.ranking_prior x that first position's logits. Rows that are no page
    (replayed histories) and policies without a prior are returned as they are. The SFT
    losses train the page model itself, without it (as measured, docs/BENCHMARKS.md); what
    scores a page as the policy that decodes it (DPO's log-ratio) reads it through this."""
    if not layout.ranking_prior:
        return logits
    from pagellm.train.rank_distill import row_starts

    starts, row_of = row_starts(batch["label_rows"])
    first = starts[row_of]  # each position's row's first labelled position
    later = batch["page_rows"][batch["label_rows"]] & (first != torch.arange(len(first), device=first.device))
    prior = torch.where(later[:, None], logits[first], torch.zeros_like(logits))
    return logits + layout.ranking_prior * prior


def constrained_log_softmax(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Item log-probabilities at each position with that position's blocked items masked
    (the page's constraints): logits [P, n_items], blocked [2, *] (position, item) pairs."""
    logits = logits.float()
    if blocked.numel():
        logits = logits.index_put((blocked[0], blocked[1]), torch.tensor(float("-inf"), device=logits.device))
    return logits.log_softmax(dim=-1)


def item_loss_terms(logits: torch.Tensor, targets: torch.Tensor, blocked: torch.Tensor):
    """Per-position loss -log Σ_{j ∈ targets(p)} softmax(logits_p, blocked masked)_j, for the
    positions that have targets; returns (losses, positions). Plain math, unit-tested.

    logits [P, n_items]; targets, blocked: [2, *] (position, item) index pairs."""
    return target_nll(constrained_log_softmax(logits, blocked), targets)


def target_nll(logp: torch.Tensor, targets: torch.Tensor):
    """`item_loss_terms` from already constrained log-probabilities logp [P, n_items]."""
    picked = logp[targets[0], targets[1]]
    positions = torch.unique(targets[0])
    # log-sum-exp per position, stable: shift by each position's largest target logprob.
    top = torch.full((logp.shape[0],), float("-inf"), device=logp.device)
    top = top.scatter_reduce(0, targets[0], picked, reduce="amax")
    sums = torch.zeros(logp.shape[0], device=logp.device).index_add(0, targets[0], (picked - top[targets[0]]).exp())
    return -(top[positions] + sums[positions].log()), positions


def item_token_loss(model, batch: dict, layout, reduction: str = "mean", offsets=None) -> torch.Tensor:
    """Cross-entropy over item tokens at the labelled item positions (module doc); `offsets`:
    sft.logit_adjust's per-item logit offsets (pagellm/train/logit_adjust.py) or None."""
    hidden, _ = _labelled_hidden(model, batch)
    module = getattr(model, "module", model)
    losses, _ = item_loss_terms(adjusted(item_logits(module, hidden, layout), offsets), batch["targets"],
                                batch["blocked"])
    return losses.mean() if reduction == "mean" else losses.sum()


def item_loss_with_ranking(model, teacher, batch: dict, layout, weight: float, replayed: bool = False,
                           offsets=None):
    """The item loss plus `weight` × the KL from `teacher`'s next-item ranking at every page
    item position (sft.rank_distill, pagellm/train/rank_distill.py); one student forward.
    A replayed history row (sft.history_replay) is no page: each of its positions is pulled
    toward the teacher's prediction at that same position instead, so the next-item model
    the page reads from stays the one that was distilled. `replayed`: report that KL too."""
    from pagellm.train.rank_distill import ranking_kl, row_starts

    hidden, _ = _labelled_hidden(model, batch)
    # One constrained softmax serves the item loss and the KL.
    logp = constrained_log_softmax(adjusted(item_logits(getattr(model, "module", model), hidden, layout), offsets),
                                   batch["blocked"])
    losses, positions = target_nll(logp, batch["targets"])
    starts, row_of = row_starts(batch["label_rows"])
    on_page = batch["page_rows"][batch["label_rows"]]  # [P]: the position is on a page row
    # Where each position's teacher distribution is read: its row's first page position, or
    # (history rows) the position itself; the teacher's output layer runs there only.
    read = torch.where(on_page, starts[row_of], torch.arange(len(row_of), device=row_of.device))
    needed, source = read.unique(return_inverse=True)
    with torch.no_grad():
        teacher_hidden, _ = _labelled_hidden(teacher, batch)
        # The teacher trained with the same offsets: both sides of the KL carry them, so the
        # student's own logits are pulled toward the teacher's.
        teacher_logits = adjusted(item_logits(teacher, teacher_hidden[needed], layout), offsets)

    def kl_at(where):
        return ranking_kl(logp, teacher_logits, source, batch["blocked"], where) if where.numel() else logp.new_zeros(())

    page_kl, replay_kl = kl_at(positions[on_page[positions]]), kl_at(positions[~on_page[positions]])
    extra = {"rank_kl": float(page_kl.detach())} | ({"replay_kl": float(replay_kl.detach())} if replayed else {})
    return losses.mean() + weight * (page_kl + replay_kl), extra


def count_loss_terms(batch: dict, item_loss: bool) -> int:
    """How many terms `item_token_loss` / `target_token_loss` sum over (for a val mean)."""
    if item_loss:
        return int(torch.unique(batch["targets"][0]).numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def make_loss(train_cfg: SFTConfig, layout, offsets=None):
    if train_cfg.item_loss:
        return partial(item_token_loss, layout=layout, offsets=offsets)
    return target_token_loss


def _lm_eval(engine, loader, loss_fn, item_loss: bool) -> dict[str, float]:
    total, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        total += float(loss_fn(engine, batch, reduction="sum"))
        n += count_loss_terms(batch, item_loss)
    return {"loss": total / max(1, n)}


def _train_loop(config: dict) -> None:
    """One Ray Train worker: meta or SFT phase, selected by config["phase"]."""
    from pagellm.train.engine import build_engine, micro_batch_size, setup_distributed_for_deepspeed
    from pagellm.train.harness import distributed_loader, patience_exhausted, run_epochs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Config.model_validate(config["cfg"])
    train_cfg = SFTConfig.model_validate(config["train_cfg"])
    phase, data_dir = config["phase"], Path(config["data_dir"])
    setup_distributed_for_deepspeed()
    import torch.distributed as dist

    torch.manual_seed(cfg.seed)
    vocab = Vocab.from_parquet(data_dir / "vocab.parquet")
    init_dir = config.get("init_dir")
    if init_dir:
        model, tokenizer, layout = load_policy(init_dir, cfg.model, trainable=True)
    else:
        model, tokenizer, layout = build_policy(cfg.model, vocab, seed=cfg.seed,
                                                items=pd.read_parquet(data_dir / "items.parquet"))
    encoder = PromptEncoder(tokenizer, layout)
    evals = pd.read_parquet(data_dir / "eval.parquet")
    probe = RankingProbe.from_data(data_dir, encoder, cfg.data.page_len, train_cfg.val_users, part="sft")
    # The validation loss is taken on the probe's users too: one sample, and on large data
    # a small share of an epoch's compute.
    val = evals[evals["user_index"].isin(probe.users)]
    # The next-item phase's training rows; sft.history_replay replays these same rows.
    next_item_rows = partial(history_rows, encoder, evals["user_index"], evals["train_positives"],
                             train_cfg.meta_history, block_seen=train_cfg.meta_block_seen)
    if phase == "meta":
        rows = next_item_rows()
        val_rows = history_rows(encoder, val["user_index"],
                                [list(a) + list(b) for a, b in zip(val["train_positives"], val["val_items"])],
                                train_cfg.meta_history, scored=[len(v) for v in val["val_items"]],
                                block_seen=train_cfg.meta_block_seen)
    else:
        sft = pd.read_parquet(data_dir / "sft.parquet")
        rows = page_rows(encoder, sft["user_index"], sft["prompt"], sft["target"], train_cfg.user_dropout, cfg.seed,
                         train_cfg.page_loss)
        val_rows = page_rows(encoder, val["user_index"], val["prompt_val"],
                             [v[: cfg.data.page_len] for v in val["val_items"]], 0.0, cfg.seed, train_cfg.page_loss)
        if train_cfg.history_replay > 0:
            rows += replay_sample(next_item_rows(), train_cfg.history_replay, cfg.seed)
    world = dist.get_world_size()
    mbs = micro_batch_size(train_cfg.batch_size, world)
    pad = partial(collate, pad_id=layout.pad_id, anchor=prompt_anchor(model))
    own = train_cfg.own_prefix if phase == "sft" else 0.0
    # With own prefixes the rows are rewritten by the model being trained, so batches stay
    # rows until the step (every rank rewrites as many rows: its batch is as long).
    loader = distributed_loader(TokenRows(rows), mbs, shuffle=True, seed=cfg.seed, collate_fn=list if own else pad)
    val_loader = distributed_loader(TokenRows(val_rows), mbs, shuffle=False, collate_fn=pad)
    epochs = train_cfg.meta_epochs if phase == "meta" else train_cfg.epochs
    # sft.rank_distill: the page phase's starting point, frozen (copied before DeepSpeed
    # wraps and, under ZeRO-3, partitions the model), is the ranking's teacher.
    teacher = _frozen_copy(model) if phase == "sft" and train_cfg.rank_distill > 0 else None
    engine = build_engine(model, None, train_cfg, len(loader) * epochs, train_cfg.use_gpu)
    offsets = popularity_offsets(evals["train_positives"], layout.n_items, train_cfg.logit_adjust)
    if offsets is not None:
        offsets = offsets.to(engine.device)  # once, not a host-to-device copy every step
    loss_fn = make_loss(train_cfg, layout, offsets)

    if teacher is not None:
        teacher.to(engine.device)

    def step(eng, batch):
        if own:
            batch = pad(own_prefix_batch(eng.module, layout, encoder, batch, own))
        batch = {k: v.to(eng.device) for k, v in batch.items()}
        if teacher is not None:
            return item_loss_with_ranking(eng, teacher, batch, layout, train_cfg.rank_distill,
                                          replayed=train_cfg.history_replay > 0, offsets=offsets)
        return loss_fn(eng, batch)

    def evaluate(eng) -> dict[str, float]:
        # Every rank writes the same pages (ZeRO-3 gathers weights collectively), so the
        # cross-rank mean run_epochs takes is the value itself.
        return _lm_eval(eng, val_loader, loss_fn, train_cfg.item_loss) | probe(eng.module, layout)

    def save_fn(module, state_dict, out_dir):
        save_policy(module, tokenizer, layout, out_dir, state_dict=state_dict)

    key, order = selection(cfg, phase)
    run_epochs(engine, loader, step, epochs=epochs, name=f"sft:{phase}" if phase == "meta" else "sft",
               save_fn=save_fn, eval_fn=evaluate, log_every=train_cfg.log_every,
               average=phase_average(train_cfg, phase, engine.module, len(loader)),
               should_stop=lambda history: patience_exhausted(history, key, train_cfg.patience, order))


def phase_average(train_cfg: SFTConfig, phase: str, module, steps_per_epoch: int) -> WeightAverage | None:
    """The weight average `phase` validates and publishes: over sft.meta_average_epochs
    epochs of steps in the next-item phase, none otherwise."""
    if phase != "meta" or train_cfg.meta_average_epochs <= 0:
        return None
    return WeightAverage.over_epochs(module, train_cfg.meta_average_epochs, steps_per_epoch)


def selection(cfg: Config, phase: str) -> tuple[str, str]:
    """(validation key, "max" | "min") that early-stops `phase` and picks its best
    checkpoint: the written page's NDCG@10; in the meta phase, by sft.meta_select, the
    validation loss, the next-item ranking's NDCG@10 or the page's (config doc)."""
    if phase == "meta" and cfg.sft.meta_select == "loss":
        return "val_loss", "min"
    return val_metric(cfg.data.page_len, ranking=phase == "meta" and cfg.sft.meta_select == "ranking"), "max"


def _frozen_copy(model):
    import copy

    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _phase_config(cfg: Config, phase: str) -> SFTConfig:
    if phase == "meta":
        return cfg.sft.model_copy(update={"lr": cfg.sft.meta_lr, "epochs": cfg.sft.meta_epochs})
    return cfg.sft


def run_sft_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Train (or resume) the policy; publishes the best-validation checkpoint of either phase
    to <run>/sft/, with <run>/sft/metrics.json saying which one it is."""
    from pagellm.train.harness import HF_SUBDIR, fit

    data_dir, out_dir = run_dir / "data", run_dir / "sft"
    if not (data_dir / "sft.parquet").exists():
        raise FileNotFoundError(f"{data_dir}/sft.parquet not found: run `pagellm data --run {run_dir}` first")
    if cfg.model.item_init == "metadata" and not is_policy_checkpoint(cfg.model.name):
        # An items table without titles, brands or categories fails here, before any worker starts.
        metadata_vectors(pd.read_parquet(data_dir / "items.parquet"), dim=2)
    base = {"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve())}
    metric, _ = selection(cfg, "sft")
    history: dict[str, list] = {}
    candidates: list[tuple[str, dict, str]] = []  # (phase, best epoch record, its hf dir)
    init_dir = None
    if cfg.sft.meta_epochs > 0:
        meta_key = selection(cfg, "meta")
        log(f"[sft] meta pre-training up to {cfg.sft.meta_epochs} epoch(s) on training histories, "
            f"early-stopped on {meta_key[0]}")
        meta = fit(_train_loop, {**base, "phase": "meta"}, _phase_config(cfg, "meta"), run_dir, name="sft_meta",
                   checkpoint_score=meta_key)
        init_dir = f"{meta.best_checkpoint_path}/{HF_SUBDIR}"
        history["meta"] = meta.history
        # Its best epoch by its own metric is the checkpoint kept; it competes for
        # publishing by the written page's score like the page phase's.
        candidates.append(("meta", best_record(meta.history, *meta_key), init_dir))
    if cfg.sft.epochs > 0:
        log(f"[sft] fine-tuning on golden pages: up to {cfg.sft.epochs} epoch(s), {cfg.sft.workers} worker(s), "
            f"ZeRO-{cfg.sft.zero_stage}, {cfg.sft.page_loss} targets")
        result = fit(_train_loop, {**base, "phase": "sft", "init_dir": init_dir}, cfg.sft, run_dir, name="sft",
                     checkpoint_score=(metric, "max"))
        history["sft"] = result.history
        candidates.append(("sft", best_record(result.history, metric), f"{result.best_checkpoint_path}/{HF_SUBDIR}"))
    candidates = [c for c in candidates if c[1] is not None]
    if not candidates:
        raise RuntimeError("SFT finished without a validated checkpoint (sft.epochs and sft.meta_epochs are 0?)")
    # The later phase wins ties: it is the page objective the method asks for.
    phase, record, hf_dir = max(reversed(candidates), key=lambda c: c[1][metric])
    publish_dir(Path(hf_dir), out_dir)
    metrics = {"published": {"phase": phase, "epoch": record["epoch"], metric: record[metric], "checkpoint": hf_dir},
               "final": record, "history": history}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log(f"[sft] done: published {phase} epoch {record['epoch']} ({metric} {record[metric]:.4f}, "
        f"val_loss {record.get('val_loss', float('nan')):.4f}) -> {out_dir}")
    return metrics
