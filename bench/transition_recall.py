"""Does a model recall the item-to-item steps its training rows hold? (diagnosis)

Two readings of a finished run (its data/, sft/, eval/per_user.parquet and SASRec's fit in
eval_cache/):

1. Per user of the evaluated split, HR@10 of each model split by whether the step
   "newest prompt item -> target" occurs in the training rows (some other user took the
   target right after that item), and within that by both items being rare (<= --rare rows).
2. Bigram recall: a seeded sample of the training rows' own steps a -> b, ranked from the
   one-item history [a] (a excluded), HR@10 for the SFT policy's first page position and for
   SASRec, split into steps between two rare items and steps between two common ones.
   Training data only: no validation or test item is read.

On Beauty the shipped policy trailed SASRec on test only where the step was in the
training rows and both items were rare, and its bigram recall of rare steps was half
SASRec's; AdamW's second-moment decay (sft.adam_beta2) was the cause (docs/BENCHMARKS.md).

    python bench/transition_recall.py --run runs/quality/beauty_meta3/seed0 --split test
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.config import load_config
from pagellm.eval.output_cache import CACHE_DIR, OutputCache
from pagellm.eval.runner import fitted_baseline, load_eval_set
from pagellm.eval.transitions import item_counts, sample_steps, step_recall, training_steps
from pagellm.models.decoding import first_item_scores
from pagellm.models.policy import load_policy
from pagellm.vocab import PromptEncoder

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True, help="a run folder with data/, sft/, eval/ and eval_cache/")
ap.add_argument("--split", required=True, choices=["val", "test"], help="the split eval/ was scored on")
ap.add_argument("--rare", type=int, default=9, help="at most this many training rows: rare")
ap.add_argument("--bigrams", type=int, default=1500, help="training steps sampled per bigram bucket")
ap.add_argument("--out", help="also write the numbers as JSON here")
args = ap.parse_args()
torch.set_num_threads(2)
run = Path(args.run)
evals = pd.read_parquet(run / "data" / "eval.parquet").set_index("user_index")
n_items = len(pd.read_parquet(run / "data" / "items.parquet"))
histories = [list(map(int, h)) for h in evals["train_positives"]]
count = item_counts(histories, n_items)
steps = training_steps(histories)
out = {"run": str(run), "split": args.split, "rare": args.rare}

# 1. Per user: is the step to the target one the training rows hold?
hits = pd.read_parquet(run / "eval" / "per_user.parquet").pivot_table(index="user_index", columns="model",
                                                                      values="hr@10")
users = evals.loc[hits.index]
if args.split == "test":
    newest = np.array([int(v[0]) for v in users["val_items"]])
    target = np.array([int(t[0]) for t in users["test_items"]])
    newest_count = count[newest]
else:  # the newest training item: its count includes the user's own row, which is left out
    newest = np.array([int(h[-1]) for h in users["train_positives"]])
    target = np.array([int(v[0]) for v in users["val_items"]])
    newest_count = count[newest] - 1
seen = np.array([steps[(a, b)] > 0 for a, b in zip(newest, target)])
both_rare = (newest_count <= args.rare) & (count[target] <= args.rare)
models = [m for m in ("popularity", "sasrec", "sft", "stage3") if m in hits.columns]
rows = []
for name, mask in (("step in the training rows", seen), ("... and both items rare", seen & both_rare),
                   ("step not in the training rows", ~seen), ("all users", np.ones(len(seen), bool))):
    rows.append({"users": name, "n": int(mask.sum()), **{m: float(hits[m].values[mask].mean()) for m in models}})
out["per_user"] = rows
print(f"{args.split}: HR@10 by the step newest item -> target")
print("| users | n | " + " | ".join(models) + " |")
print("|---|---|" + "---|" * len(models))
for r in rows:
    print(f"| {r['users']} | {r['n']:,} | " + " | ".join(f"{r[m]:.4f}" for m in models) + " |")

# 2. Bigram recall of the training rows' own steps.
samples = sample_steps(steps, count, rare=args.rare, per_bucket=args.bigrams)
policy, tokenizer, layout = load_policy(run / "sft", trainable=False)
encoder = PromptEncoder(tokenizer, layout)
# The evaluation's own SASRec: its fit is read from the run's cache under the key the
# evaluation of this split wrote (fitted here, and cached, when it is not there).
cfg = load_config(run / "config.yaml", [])
sasrec = fitted_baseline("sasrec", cfg.eval.sasrec, load_eval_set(run / "data", args.split, cfg.eval.max_users),
                         cfg.seed, OutputCache(run / CACHE_DIR))


out["bigram"] = {}
print("\nbigram recall (HR@10 of b from the history [a]) on the training rows' steps")
print("| steps | n | sasrec | sft |\n|---|---|---|---|")
for bucket, sample in samples.items():
    name = f"{bucket} -> {bucket}"
    prompts = [encoder.encode_prompt(None, [a]) for a, _ in sample]
    pol = torch.cat([first_item_scores(policy, layout, prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
    sas = torch.from_numpy(sasrec.score([[a] for a, _ in sample]))
    out["bigram"][name] = {"n": len(sample), "sasrec": step_recall(sas, sample), "sft": step_recall(pol, sample)}
    r = out["bigram"][name]
    print(f"| {name} | {r['n']:,} | {r['sasrec']:.3f} | {r['sft']:.3f} |")
if args.out:
    Path(args.out).write_text(json.dumps(out, indent=1))
