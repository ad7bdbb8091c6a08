"""Stage 1 of training: supervised fine-tuning on prompt → golden page (Ray Train + DeepSpeed).

Two Ray Train runs, each resumable on its own:
  meta  (optional, sft.meta_epochs > 0): next-item prediction over each user's whole
        training history written as a prompt, so the new item tokens learn
        co-occurrence before the page objective; the loss is on every history item
        after the first.
  sft   the page objective: loss on the target page tokens only (items + eos).
Each worker builds the same model from the same seed; DeepSpeed shards it (ZeRO from
config). The final weights land in <run>/sft/ as a save_policy checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pagellm.config import Config, SFTConfig
from pagellm.models.policy import build_policy, load_policy, save_policy
from pagellm.runfolder import publish_dir
from pagellm.vocab import PromptEncoder, Vocab

IGNORE = -100


class TokenRows(Dataset):
    """(input_ids, labels) pairs; labels are IGNORE where no loss is taken."""

    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        if not rows:
            raise ValueError("no training rows: the data stage produced none for this configuration")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def page_rows(encoder: PromptEncoder, users, prompts, pages, user_dropout: float, seed: int):
    """prompt → page rows; a seeded `user_dropout` share is added again without the user
    token, so the policy can serve a user it has never seen from their history alone."""
    rng = np.random.default_rng(seed)
    rows = []
    for user, prompt, page in zip(users, prompts, pages):
        page_ids = encoder.encode_page(page)
        for u in [int(user)] + ([None] if rng.random() < user_dropout else []):
            prompt_ids = encoder.encode_prompt(u, prompt)
            rows.append((prompt_ids + page_ids, [IGNORE] * len(prompt_ids) + page_ids))
    return rows


def history_rows(encoder: PromptEncoder, users, histories, max_items: int):
    """Meta pre-training rows: the whole history as a prompt, loss on items 2..n."""
    layout = encoder.layout
    rows = []
    for user, items in zip(users, histories):
        items = list(items)[-max_items:]
        if len(items) < 2:
            continue
        ids = encoder.encode_prompt(int(user), items)
        labels = [t if layout.is_item_token(t) else IGNORE for t in ids]
        first = labels.index(layout.item_offset + items[0])
        labels[first] = IGNORE  # the first item has no history to predict it from
        rows.append((ids, labels))
    return rows


def collate(batch, pad_id: int):
    """Right-pad to the longest row of the batch."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        attention[r, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def target_token_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy over the labelled tokens, with the output layer applied only
    where a label is. Same value as the model's own `labels=` loss, but the vocabulary-wide
    logits (most of the compute once every user and item is a token) are never built for
    prompt positions. `model` is the DeepSpeed engine or the bare model: the forward and
    the output layer go through module calls, so ZeRO-3 gathers their weights."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    module = getattr(model, "module", model)
    logits = module.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def lm_step(engine, batch):
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    return target_token_loss(engine, batch)


def _lm_eval(engine, loader) -> dict[str, float]:
    total, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        total += float(target_token_loss(engine, batch, reduction="sum"))
        n += int((batch["labels"][:, 1:] != IGNORE).sum())
    return {"loss": total / max(1, n)}


def _train_loop(config: dict) -> None:
    """One Ray Train worker: meta or SFT phase, selected by config["phase"]."""
    from functools import partial

    from pagellm.train.engine import build_engine, micro_batch_size, setup_distributed_for_deepspeed
    from pagellm.train.harness import distributed_loader, run_epochs

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
        model, tokenizer, layout = build_policy(cfg.model, vocab, seed=cfg.seed)
    encoder = PromptEncoder(tokenizer, layout)
    evals = pd.read_parquet(data_dir / "eval.parquet")
    if phase == "meta":
        rows = history_rows(encoder, evals["user_index"], evals["train_positives"], config["max_items"])
        val_rows = history_rows(encoder, evals["user_index"],
                                [list(a) + list(b) for a, b in zip(evals["train_positives"], evals["val_items"])],
                                config["max_items"])
    else:
        sft = pd.read_parquet(data_dir / "sft.parquet")
        rows = page_rows(encoder, sft["user_index"], sft["prompt"], sft["target"], train_cfg.user_dropout, cfg.seed)
        has_val = evals["val_items"].map(len) > 0
        val_rows = page_rows(encoder, evals.loc[has_val, "user_index"], evals.loc[has_val, "prompt_val"],
                             [v[: cfg.data.page_len] for v in evals.loc[has_val, "val_items"]], 0.0, cfg.seed)
    world = dist.get_world_size()
    mbs = micro_batch_size(train_cfg.batch_size, world)
    pad = partial(collate, pad_id=layout.pad_id)
    loader = distributed_loader(TokenRows(rows), mbs, shuffle=True, seed=cfg.seed, collate_fn=pad)
    val_loader = distributed_loader(TokenRows(val_rows), mbs, shuffle=False, collate_fn=pad)
    epochs = train_cfg.meta_epochs if phase == "meta" else train_cfg.epochs
    engine = build_engine(model, None, train_cfg, len(loader) * epochs, train_cfg.use_gpu)

    def save_fn(module, state_dict, out_dir):
        save_policy(module, tokenizer, layout, out_dir, state_dict=state_dict)

    run_epochs(engine, loader, lm_step, epochs=epochs, name=f"sft:{phase}" if phase == "meta" else "sft",
               save_fn=save_fn, eval_fn=lambda eng: _lm_eval(eng, val_loader), log_every=train_cfg.log_every)


def _phase_config(cfg: Config, phase: str) -> SFTConfig:
    if phase == "meta":
        return cfg.sft.model_copy(update={"lr": cfg.sft.meta_lr, "epochs": cfg.sft.meta_epochs})
    return cfg.sft


def run_sft_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Train (or resume) the policy; writes <run>/sft/ and <run>/sft/metrics.json."""
    from pagellm.train.harness import fit

    data_dir, out_dir = run_dir / "data", run_dir / "sft"
    if not (data_dir / "sft.parquet").exists():
        raise FileNotFoundError(f"{data_dir}/sft.parquet not found: run `pagellm data --run {run_dir}` first")
    base = {"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()), "max_items": 50}
    history: dict[str, list] = {}
    init_dir = None
    if cfg.sft.meta_epochs > 0:
        log(f"[sft] meta pre-training {cfg.sft.meta_epochs} epoch(s) on training histories")
        meta = fit(_train_loop, {**base, "phase": "meta"}, _phase_config(cfg, "meta"), run_dir, name="sft_meta")
        init_dir = meta.hf_path
        history["meta"] = meta.history
    log(f"[sft] fine-tuning on golden pages: {cfg.sft.epochs} epoch(s), {cfg.sft.workers} worker(s), "
        f"ZeRO-{cfg.sft.zero_stage}")
    result = fit(_train_loop, {**base, "phase": "sft", "init_dir": init_dir}, cfg.sft, run_dir, name="sft")
    history["sft"] = result.history
    if result.hf_path is None:
        raise RuntimeError("SFT finished without a checkpoint")
    publish_dir(Path(result.hf_path), out_dir)
    metrics = {"final": result.metrics, "history": history, "checkpoint": result.checkpoint_path}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log(f"[sft] done: train_loss {result.metrics.get('train_loss', float('nan')):.4f} "
        f"val_loss {result.metrics.get('val_loss', float('nan')):.4f} -> {out_dir}")
    return metrics
