"""Publishing a stage 3 trained on Ray Train (dpo, degre) the way the RL loop publishes
(actors/orchestrator.py::PPORun.finish), so eval, serve and the benchmarks read every
algorithm alike: <run>/<algorithm>/ holds a save_policy directory, selection.json the
validation history with the SFT policy as epoch 0, and DONE a one-line summary.

With stage3.publish=best_val the epoch with the best validation NDCG@10 is published, or
the SFT policy itself when no epoch beat it; with `last`, the last epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pagellm.config import Config
from pagellm.eval.probe import RankingProbe, best_record, val_metric
from pagellm.runfolder import write_json


def sft_probe_score(cfg: Config, run_dir: Path, val_users: int) -> dict[str, float]:
    """The SFT policy's validation record as the stage's own epochs are scored: the same
    probe (its `val_users` sample of the stage-3 half), so epoch 0 and epoch n are compared
    on the same users, none of which SFT selected its epoch on. Scored in a worker that
    exits after (harness.in_worker), so the driver does not keep the policy's memory."""
    from pagellm.train.harness import in_worker

    return in_worker(_probe_sft, Path(run_dir).resolve(), cfg.data.page_len, val_users)


def _probe_sft(run_dir: Path, page_len: int, val_users: int) -> dict[str, float]:
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    model, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    model.eval()
    probe = RankingProbe.from_data(run_dir / "data", PromptEncoder(tokenizer, layout), page_len, val_users,
                                  part="stage3")
    with torch.inference_mode():
        return {f"val_{k}": v for k, v in probe(model, layout).items()}


def copy_policy(source: Path, out: Path) -> None:
    """A save_policy directory's files into `out` (replacing what is there), without the
    stage records (metrics.json, DONE) a stage leaves beside its policy."""
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in ("metrics.json", "DONE"):  # the SFT stage's own records stay in sft/
            continue
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)


def publish_epochs(cfg: Config, run_dir: Path, history: list[dict], best_dir: str | None, last_dir: str | None,
                   sft_record: dict[str, float], summary: dict, log=print) -> dict:
    """Copy the chosen checkpoint to <run>/<algorithm>/ and write selection.json and DONE.

    `history`: the Ray Train epoch records (each with `epoch` and the validation metric);
    `best_dir` / `last_dir`: the hf directories of the best and the last checkpoint;
    `summary`: what DONE records besides the choice (seconds, pages_generated, ...)."""
    algorithm = cfg.stage3.algorithm
    out = run_dir / algorithm
    key = val_metric(cfg.data.page_len)
    records = [{"step": 0, **sft_record}] + [{"step": int(h["epoch"]), **{k: v for k, v in h.items() if k != "step"}}
                                             for h in history if key in h]
    if len(records) == 1:
        raise RuntimeError(f"{algorithm} finished without a validated epoch")
    if cfg.stage3.publish == "best_val":
        chosen = best_record(records, key)["step"]
        source = run_dir / "sft" if chosen == 0 else Path(best_dir)
    else:
        chosen, source = records[-1]["step"], Path(last_dir)
    copy_policy(source, out)
    score = next(r[key] for r in records if r["step"] == chosen)
    selection = {"publish": cfg.stage3.publish, "published_step": chosen, "unit": "epoch", "metric": key,
                 "published_" + key: score, "sft_" + key: records[0][key], "history": records}
    write_json(out / "selection.json", selection)
    write_json(out / "DONE", {**summary, "published_step": chosen})
    what = "the SFT policy: no epoch beat it on validation" if chosen == 0 else f"epoch {chosen}"
    log(f"[{algorithm}] done: published {what} ({key} {score:.4f}, SFT {records[0][key]:.4f}) -> {out}")
    return selection

