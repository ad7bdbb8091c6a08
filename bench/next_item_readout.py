"""Where the policy's next-item ranking is read out, and with which optimiser (diagnosis).

Trains the policy, built as the SFT stage builds it, on the next-item phase's rows
(`pagellm.train.sft_rows.history_rows`) with a plain torch loop, and after each epoch ranks all
items for the SFT probe's validation users (history excluded) at two places of one forward:
  tail: the prompt's end, where pages start and the probe and eval read (`tail_*`)
  item: the last history item, SASRec's read-out (`item_*`; only when the prompt has
        closing words, `model.prompt_tail: true`)
`--opt sasrec` swaps in SASRec's optimiser (Adam (0.9, 0.98), no weight decay, constant lr,
no clipping); `--sasrec` trains the SASRec baseline instead, validated on the same users;
`--ema 0.99 0.998` also ranks with moving averages of the weights (`ema<decay>_*`);
`--decay-to-init` makes the item rows' weight decay pull toward their starting rows.
`--holdout-last` drops each probe user's newest training item from the training rows, so the
probe's prompt ends in an item no training row of that user holds, as every test prompt does
(the validation item is appended there); `tail_*` is then that test-like score, and `last_*`
ranks the held-out item from the history before it (validation's usual shape). SASRec
(`--sasrec`) gets the same rows and the test-like score.
`--logit-adjust TAU` trains on the logits plus TAU x log(1 + training count) (sft.logit_adjust).
`--input-scale S` multiplies the input token embeddings by S (SASRec's sqrt(d)); `--crop P`
trains on random contiguous crops of a share P of the histories, redrawn each epoch;
`--constant-lr` keeps the learning rate after warmup. `bigram_rare_hr` / `bigram_common_hr`:
recall of the training rows' own steps a -> b from the history [a] (bench/transition_recall.py);
`*_seen_hr`: HR@10 of the users whose newest item -> target step the training rows hold.
Every score also comes as `*_rare_hr` / `*_rarest_hr`: HR@10 over the users whose target the
training rows hold at most 9 / 4 times (`*_rare_share` / `*_rarest_share` of them); SASRec's
last line ranks the probe with its best epoch's weights and scores them the same way.
Needs a finished data stage (`pagellm data`). docs/BENCHMARKS.md (Beauty) has the results:

    python bench/next_item_readout.py --config configs/beauty-loo.yaml --data runs/beauty/data \
        --epochs 30 --set model.prompt_tail=true --out runs/readout_tail.jsonl
"""
import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.config.loading import load_config
from pagellm.eval.metrics import hr_at_k, ndcg_at_k
from pagellm.eval.probe import RankingProbe
from pagellm.eval.transitions import item_counts, sample_steps, step_recall, training_steps
from pagellm.models.decoding import exclusion_mask, first_item_scores, left_pad
from pagellm.models.policy import build_policy
from pagellm.models.positions import prompt_anchor
from pagellm.train.deepspeed_config import train_ds_config
from pagellm.train.engine import weight_decay_groups
from pagellm.train.logit_adjust import popularity_offsets
from pagellm.train.sft import item_logits, item_token_loss
from pagellm.train.sft_rows import collate, history_rows
from pagellm.train.weight_average import WeightAverage
from pagellm.vocab import PromptEncoder, Vocab

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--epochs", type=int, default=20)
ap.add_argument("--opt", default="current", choices=["current", "sasrec"])
ap.add_argument("--lr", type=float, default=None)
ap.add_argument("--sasrec", action="store_true")
ap.add_argument("--ema", type=float, nargs="*", default=[],
                help="also rank with exponential moving averages of the weights at these decays")
ap.add_argument("--decay-to-init", action="store_true",
                help="weight decay pulls the item rows toward their starting values, not toward zero")
ap.add_argument("--logit-adjust", type=float, default=0.0,
                help="train on logits + TAU * log(1 + training count) (logit adjustment), rank on the logits")
ap.add_argument("--holdout-last", action="store_true",
                help="train without each probe user's newest training item (test-like probe; see above)")
ap.add_argument("--constant-lr", action="store_true", help="--opt current without the decay (warmup, then constant)")
ap.add_argument("--input-scale", type=float, default=1.0,
                help="multiply the input token embeddings by this (SASRec scales by sqrt(d)); output rows unscaled")
ap.add_argument("--crop", type=float, default=0.0,
                help="each epoch, this share of the training histories is replaced by a random contiguous crop")
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--out", required=True)
args = ap.parse_args()
if args.decay_to_init and args.opt != "current":
    ap.error("--decay-to-init changes the current optimiser's weight decay; --opt sasrec has none")
torch.set_num_threads(2)
cfg = load_config(args.config, args.set)
data_dir = Path(args.data)
vocab = Vocab.from_parquet(data_dir / "vocab.parquet")
torch.manual_seed(cfg.seed)
model, tokenizer, layout = build_policy(cfg.model, vocab, seed=cfg.seed,
                                        items=pd.read_parquet(data_dir / "items.parquet"))
encoder = PromptEncoder(tokenizer, layout)
if args.input_scale != 1.0:
    # Scales what the embedding lookup returns; the tied output matrix reads the weight
    # itself, so only the input side changes (SASRec's x = E[i] * sqrt(d) + P[pos]).
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * args.input_scale)
probe = RankingProbe.from_data(data_dir, encoder, cfg.data.page_len, cfg.sft.val_users, part="sft")
evals = pd.read_parquet(data_dir / "eval.parquet")
log = open(args.out, "w")
histories = [list(h) for h in evals["train_positives"]]
if args.holdout_last:
    held = {u: h[-1] for u, h in zip(evals["user_index"], histories) if u in probe.users}
    histories = [h[:-1] if u in held else h for u, h in zip(evals["user_index"], histories)]
    by_user = dict(zip(evals["user_index"], histories))
    # The probe's own prompts (the whole training history) stay: their newest item is held out.
    # last_*: the held-out item ranked from the history before it, its other items excluded.
    last_probe = [(encoder.encode_prompt(int(u), by_user[u][-cfg.data.history_len:]), set(by_user[u]), [held[u]])
                  for u in evals["user_index"] if u in held]


def emit(rec):
    print(json.dumps(rec), flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()


# Training occurrences per item: `rare_*` scores the users whose target the training rows hold
# at most RARE times (most Beauty test targets that SASRec finds and the policy misses).
RARE, RAREST = 9, 4
train_count = item_counts(histories, vocab.n_items)
# Transitions the training rows hold (a directly followed by b): `seen_*` scores the users whose
# newest item -> target step is one of them, the step SASRec recalls more often on Beauty's test.
train_steps = training_steps(histories)


# Bigram recall on the training rows themselves: a sample of their steps a -> b, ranked from the
# one-item history [a] (a excluded), split by both items being rare or both common. On Beauty,
# SASRec recalls rare steps about twice as often as the policy does (docs/BENCHMARKS.md).
BIGRAMS = sample_steps(train_steps, train_count, rare=RARE)


def bigram_recall(score_fn):
    """{bigram_<rare|common>_hr}: HR@10 of b when ranking from [a]; score_fn(list of a) -> [N, n_items]."""
    return {f"bigram_{name}_hr": step_recall(score_fn([st[0] for st in steps]), steps)
            for name, steps in BIGRAMS.items()}


def metrics(ranked, targets, newest):
    ndcg = np.array([ndcg_at_k(r, t, 10) for r, t in zip(ranked, targets)])
    hr = np.array([hr_at_k(r, t, 10) for r, t in zip(ranked, targets)])
    out = {"ndcg": float(ndcg.mean()), "hr": float(hr.mean())}
    for name, most in (("rare", RARE), ("rarest", RAREST)):
        rare = np.array([all(train_count[i] <= most for i in t) for t in targets])
        out |= {f"{name}_hr": float(hr[rare].mean()) if rare.any() else 0.0, f"{name}_share": float(rare.mean())}
    seen = np.array([any((n, i) in train_steps for i in t) for n, t in zip(newest, targets)])
    out |= {"seen_hr": float(hr[seen].mean()) if seen.any() else 0.0, "seen_share": float(seen.mean())}
    return out


def newest_item(prompt):
    return [layout.token_to_item(t) for t in prompt if layout.is_item_token(t)][-1]


if args.sasrec:
    from pagellm.eval.baselines.sasrec import SASRec
    es_users = sorted(probe.users)
    by_user = evals.set_index("user_index")
    vh = [list(by_user.loc[u, "train_positives"]) for u in es_users]
    vt = [list(by_user.loc[u, "val_items"]) for u in es_users]
    m = SASRec({"epochs": args.epochs, "patience": 100, "verbose": True})
    m.fit([s for s in histories if len(s)], len(pd.read_parquet(data_dir / "items.parquet")), vh, vt)
    for r in m.training_log:
        emit({"model": "sasrec", **r})
    scores = torch.from_numpy(m.score(vh))
    scores = scores.masked_fill(exclusion_mask([set(h) for h in vh], len(vh), scores.shape[1], "cpu"), float("-inf"))
    emit({"model": "sasrec", "epoch": "best", **{f"tail_{k}": v for k, v in
                                                metrics(torch.topk(scores, 10, dim=-1).indices.tolist(), vt,
                                                        [h[-1] for h in vh]).items()},
                                                **bigram_recall(lambda a: m.score([[x] for x in a]))})
    sys.exit(0)

tail_len = len(layout.tail_ids)


@torch.no_grad()
def probe_eval():
    out = rank(probe.prompts, probe.exclude, probe.targets) | bigram_recall(policy_bigram_scores)
    if args.holdout_last:
        out |= {k.replace("tail_", "last_"): v for k, v in
                rank(*map(list, zip(*last_probe))).items() if k.startswith("tail_")}
    return out


def policy_bigram_scores(items):
    model.eval()
    prompts = [encoder.encode_prompt(None, [a]) for a in items]
    s = torch.cat([first_item_scores(model, layout, prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
    model.train()
    return s


def rank(all_prompts, all_exclude, targets):
    model.eval()
    ranked = {n: [] for n in (("tail", "item") if tail_len else ("tail",))}
    for a in range(0, len(all_prompts), 256):
        prompts, exclude = all_prompts[a:a + 256], all_exclude[a:a + 256]
        ids, mask, pos = left_pad(prompts, layout.pad_id, "cpu", prompt_anchor(model))
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1]
        for name, col in (("tail", -1), ("item", -1 - tail_len)) if tail_len else (("tail", -1),):
            s = item_logits(model, h[:, col], layout)
            s = s.masked_fill(exclusion_mask(exclude, len(prompts), layout.n_items, s.device), float("-inf"))
            ranked[name] += torch.topk(s, 10, dim=-1).indices.tolist()
    model.train()
    newest = [newest_item(p) for p in all_prompts]
    return {f"{k}_{m}": v for k, r in ranked.items() for m, v in metrics(r, targets, newest).items()}


rows = history_rows(encoder, evals["user_index"], histories, cfg.sft.meta_history,
                    block_seen=cfg.sft.meta_block_seen)
pad = partial(collate, pad_id=layout.pad_id, anchor=prompt_anchor(model))
bs = cfg.sft.batch_size
steps_per_epoch = math.ceil(len(rows) / bs)
total = steps_per_epoch * args.epochs
lr = args.lr or (cfg.sft.meta_lr if args.opt != "sasrec" else 1e-3)
if args.opt == "current":
    # The SFT stage's own optimiser and schedule: the DeepSpeed config build_engine builds,
    # run on a plain torch AdamW and DeepSpeed's scheduler class.
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    ds = train_ds_config(zero_stage=0, micro_batch_size=bs, grad_clip=cfg.sft.grad_clip, lr=lr,
                         weight_decay=cfg.sft.weight_decay, warmup_steps=round(cfg.sft.warmup_ratio * total),
                         total_steps=total, betas=(0.9, cfg.sft.adam_beta2))
    o = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(weight_decay_groups(model, o["weight_decay"]), lr=o["lr"], betas=tuple(o["betas"]),
                            eps=o["eps"])
    if args.constant_lr:
        from deepspeed.runtime.lr_schedules import WarmupLR

        params = ds["scheduler"]["params"]
        schedule = WarmupLR(opt, **{k: v for k, v in params.items() if k != "total_num_steps"})
    else:
        schedule = WarmupDecayLR(opt, **ds["scheduler"]["params"])
    clip = ds["gradient_clipping"]
else:  # SASRec's (pagellm/eval/baselines/sasrec.py): Adam, constant lr, no clipping
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    schedule, clip = None, 0.0

# Weight averages of the same run (sft.meta_average_epochs' WeightAverage), read out beside
# the raw weights: what averaging the last epochs' weights would give the checkpoint.
emas = {d: WeightAverage(model, d) for d in args.ema}
# --decay-to-init: AdamW's decoupled decay takes lr * wd * W from every matrix; adding back
# lr * wd * W0 on the item rows makes their decay lr * wd * (W - W0), a prior centred on the
# rows the model started from (the metadata vectors under model.item_init: metadata).
item_rows = slice(layout.item_offset, layout.item_offset + layout.n_items)
start_rows = model.get_input_embeddings().weight[item_rows].detach().clone() if args.decay_to_init else None
if start_rows is not None and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
    sys.exit("--decay-to-init handles tied item rows only (an untied output matrix would keep decaying to zero)")
offsets = popularity_offsets(histories, vocab.n_items, args.logit_adjust)  # sft.logit_adjust's
rng = np.random.default_rng(cfg.seed)
emit({"epoch": 0, **probe_eval(), "opt": args.opt, "lr": lr, "set": args.set})
for epoch in range(1, args.epochs + 1):
    t0 = time.perf_counter()
    if args.crop > 0:
        # Crops turn mid-history steps into steps predicted from a short context, the way the
        # first steps of every history already are (SASRec-like item-to-item recall).
        cropped = []
        for h in histories:
            if len(h) > 2 and rng.random() < args.crop:
                a = int(rng.integers(0, len(h) - 1))
                h = h[a:int(rng.integers(a + 2, len(h) + 1))]
            cropped.append(h)
        rows = history_rows(encoder, evals["user_index"], cropped, cfg.sft.meta_history,
                            block_seen=cfg.sft.meta_block_seen)
    order = rng.permutation(len(rows))
    tot = 0.0
    for b in range(steps_per_epoch):
        batch = pad([rows[i] for i in order[b * bs:(b + 1) * bs]])
        loss = item_token_loss(model, batch, layout, offsets=offsets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        step_lr = opt.param_groups[0]["lr"]
        opt.step()
        if start_rows is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight[item_rows] += step_lr * cfg.sft.weight_decay * start_rows
        if schedule is not None:
            schedule.step()
        for ema in emas.values():
            ema.update(model)
        tot += float(loss.detach())
    averaged = {}
    for d, ema in emas.items():
        with ema.applied(model):
            averaged |= {f"ema{d}_{k}": v for k, v in probe_eval().items()}
    emit({"epoch": epoch, "loss": tot / steps_per_epoch, "sec": time.perf_counter() - t0, **probe_eval(), **averaged})
