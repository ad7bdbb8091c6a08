"""Stage 3, `stage3.algorithm: dpo`: direct preference optimisation of the SFT policy on page
pairs (Ray Train + DeepSpeed, like SFT).

The driver builds the pairs and the frozen SFT reference's log-likelihood of each page
once (pagellm/train/dpo_pairs.py); the workers hold only the policy, initialised from
<run>/sft. Each step scores a batch of pairs' chosen and rejected pages in one forward
(2 x batch rows, chosen first) and applies the DPO loss (pagellm/train/dpo_loss.py).
After every epoch the validation probe writes pages for `dpo.val_users` users, as SFT's;
their NDCG@10 stops training early and picks what is published
(pagellm/train/stage3_publish.py): <run>/dpo holds the policy, selection.json the epochs
with the SFT policy as epoch 0, and DONE a summary.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from pagellm.config import Config, DPOConfig
from pagellm.eval.probe import RankingProbe, val_metric
from pagellm.models.policy import load_policy, save_policy
from pagellm.models.positions import prompt_anchor
from pagellm.train.dpo_loss import dpo_loss, page_logprobs
from pagellm.train.sft_rows import TokenRows, collate, page_rows
from pagellm.vocab import LAYOUT_FILE, PromptEncoder


def collate_pairs(pairs: list[dict], encoder: PromptEncoder, pad) -> dict:
    """B pairs -> one batch of 2B page rows (chosen pages, then rejected), plus the
    reference log-probs and the chosen pages' item counts."""
    users = [p["user_index"] for p in pairs] * 2
    prompts = [p["prompt"] for p in pairs] * 2
    pages = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = pad(page_rows(encoder, users, prompts, pages, user_dropout=0.0, seed=0))
    return {**batch, "ref_chosen": torch.tensor([p["ref_chosen"] for p in pairs], dtype=torch.float32),
            "ref_rejected": torch.tensor([p["ref_rejected"] for p in pairs], dtype=torch.float32),
            "chosen_items": torch.tensor([len(p["chosen"]) for p in pairs])}


def _train_loop(config: dict) -> None:
    """One Ray Train worker."""
    from pagellm.train.engine import (build_engine, disable_dropout, micro_batch_size,
                                      setup_distributed_for_deepspeed)
    from pagellm.train.harness import distributed_loader, patience_exhausted, run_epochs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Config.model_validate(config["cfg"])
    train_cfg = DPOConfig.model_validate(config["train_cfg"])
    setup_distributed_for_deepspeed()
    import torch.distributed as dist

    torch.manual_seed(cfg.seed)
    model, tokenizer, layout = load_policy(config["init_dir"], cfg.model, trainable=True)
    # The reference log-probs were taken without dropout; with it, the margin at step 0
    # would be noise instead of 0 (TRL's DPO trainer drops it for the same reason).
    disable_dropout(model)
    encoder = PromptEncoder(tokenizer, layout)
    probe = RankingProbe.from_data(Path(config["data_dir"]), encoder, cfg.data.page_len, train_cfg.val_users,
                                  part="stage3")
    pairs = pd.read_parquet(config["pairs_path"]).to_dict("records")
    pad = partial(collate, pad_id=layout.pad_id, anchor=prompt_anchor(model))
    loader = distributed_loader(TokenRows(pairs), micro_batch_size(train_cfg.batch_size, dist.get_world_size()),
                                shuffle=True, seed=cfg.seed, collate_fn=partial(collate_pairs, encoder=encoder, pad=pad))
    engine = build_engine(model, None, train_cfg, len(loader) * train_cfg.epochs, train_cfg.use_gpu)

    def step(eng, batch):
        batch = {k: v.to(eng.device) for k, v in batch.items()}
        logp = page_logprobs(eng, batch, layout)
        chosen, rejected = logp.chunk(2)
        return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], train_cfg.beta,
                        batch["chosen_items"], train_cfg.sft_coef)

    def save_fn(module, state_dict, out_dir):
        save_policy(module, tokenizer, layout, out_dir, state_dict=state_dict)

    metric = val_metric(cfg.data.page_len)
    # Every rank writes the same validation pages, so run_epochs' cross-rank mean is the value.
    run_epochs(engine, loader, step, epochs=train_cfg.epochs, name="dpo", save_fn=save_fn,
               eval_fn=lambda eng: probe(eng.module, layout), log_every=train_cfg.log_every,
               should_stop=lambda history: patience_exhausted(history, metric, train_cfg.patience))


def run_dpo_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Build the pairs, train (or resume) DPO from <run>/sft, publish to <run>/dpo; returns
    the selection record (stage3_publish.publish_epochs)."""
    from pagellm.train.dpo_pairs import build_pairs
    from pagellm.train.harness import HF_SUBDIR, fit
    from pagellm.train.stage3_publish import publish_epochs, sft_probe_score

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    sft_dir, data_dir = run_dir / "sft", run_dir / "data"
    if not (sft_dir / LAYOUT_FILE).exists():
        raise FileNotFoundError(f"{sft_dir}: no SFT policy; run `pagellm sft --run {run_dir}` first")
    if cfg.uses_reward_model() and not (run_dir / "reward").is_dir():
        raise FileNotFoundError(f"{run_dir}/reward not found: on-policy DPO ranks sampled pages with the reward "
                                f"stage's output; run `pagellm reward --run {run_dir}` first")
    pairs_path, stats = build_pairs(cfg, run_dir, log)
    families = pd.read_parquet(pairs_path, columns=["family"])["family"].value_counts().sort_index()
    log(f"[dpo] training on {int(families.sum()):,} pairs ({', '.join(f'{f} {n:,}' for f, n in families.items())}): "
        f"up to {cfg.dpo.epochs} epoch(s), beta {cfg.dpo.beta}, {cfg.dpo.workers} worker(s), ZeRO-{cfg.dpo.zero_stage}")
    loop_config = {"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
                   "init_dir": str(sft_dir.resolve()), "pairs_path": str(pairs_path.resolve())}
    result = fit(_train_loop, loop_config, cfg.dpo, run_dir, name="dpo",
                 checkpoint_score=(val_metric(cfg.data.page_len), "max"))
    summary = {"seconds": round(time.perf_counter() - t0, 1), "pairs": int(families.sum()),
               "pairs_by_family": {str(f): int(n) for f, n in families.items()}, **stats}
    return publish_epochs(cfg, run_dir, result.history, f"{result.best_checkpoint_path}/{HF_SUBDIR}",
                          f"{result.checkpoint_path}/{HF_SUBDIR}", sft_probe_score(cfg, run_dir, cfg.dpo.val_users),
                          summary, log)
