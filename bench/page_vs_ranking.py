"""Putting the policy's own ranking back into the page it writes (diagnosis).

On every real table the page the policy writes greedily hits the held-out item less often
than the top 10 of its own first-position item scores (docs/BENCHMARKS.md). Two remedies,
scored together on a grid for one trained page-phase checkpoint:
  --weights w: model.ranking_prior at decoding (every position after the first adds w x the
      first position's item logits; pagellm/models/decoding.py). Decoding only, so a
      checkpoint trained without it serves the whole grid. A very large w writes the
      ranking's top 10.
  --meta M --alphas a: weight interpolation theta(a) = (1 - a) * M + a * policy between the
      next-item checkpoint the page phase started from and the page phase's (WiSE-FT,
      Wortsman et al., 2022); a = 1 is the policy itself.
Each point writes the probe's pages on the SFT probe's validation users (what the SFT stage
selects on) and on the stage-3 half (users no SFT choice has seen).

    python bench/page_vs_ranking.py --config configs/beauty-loo.yaml --data runs/b/data \
        --policy <sft best>/hf --weights 0 0.5 1 2 100 --out runs/ranking_prior.jsonl
    python bench/page_vs_ranking.py --config configs/beauty-loo.yaml --data runs/b/data \
        --policy <sft best>/hf --meta <sft_meta best>/hf --alphas 0 0.25 0.5 0.75 1 --out runs/soup.jsonl
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from pagellm.config.loading import load_config
from pagellm.eval.probe import RankingProbe
from pagellm.models.policy import load_policy
from pagellm.vocab import PromptEncoder


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    """(1 - alpha) * start + alpha * end for every floating tensor (integer buffers: end's)."""
    if start.keys() != end.keys():
        raise SystemExit("the two checkpoints hold different tensors")
    return {k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() else v for k, v in end.items()}


ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--policy", required=True, help="the page phase's checkpoint (a save_policy directory)")
ap.add_argument("--weights", type=float, nargs="+", default=[0.0], help="model.ranking_prior values")
ap.add_argument("--meta", default=None, help="the next-item checkpoint, for --alphas")
ap.add_argument("--alphas", type=float, nargs="+", default=[1.0])
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--out", required=True)
args = ap.parse_args()
if args.alphas != [1.0] and not args.meta:
    ap.error("--alphas needs --meta")
torch.set_num_threads(2)
cfg = load_config(args.config, args.set)
model, tokenizer, saved = load_policy(args.policy, cfg.model, trainable=False)
model.eval()
page_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
meta_state = load_policy(args.meta, cfg.model, trainable=False)[0].state_dict() if args.meta else None
encoder = PromptEncoder(tokenizer, saved)
probes = {part: RankingProbe.from_data(Path(args.data), encoder, cfg.data.page_len, cfg.sft.val_users, part=part)
          for part in ("sft", "stage3")}
print(f"{args.policy}: trained with ranking_prior {saved.ranking_prior}", flush=True)
with open(args.out, "w") as log, torch.no_grad():
    for a in args.alphas:
        model.load_state_dict(page_state if a == 1.0 else interpolate(meta_state, page_state, a))
        for w in args.weights:
            t0 = time.time()
            layout = dataclasses.replace(saved, ranking_prior=w)
            row = {"alpha": a, "ranking_prior": w} | {f"{part}/{k}": v for part, p in probes.items()
                                                      for k, v in p(model, layout).items()}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(" ".join(f"{k} {v:.4f}" for k, v in row.items()), f"({time.time() - t0:.0f} s)", flush=True)
