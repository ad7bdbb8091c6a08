"""Which step of the leave-one-out split decides the policy-vs-SASRec standing (diagnosis).

On Beauty the policy's page beats SASRec on the validation item and is level with it on the
test item, one step later (docs/BENCHMARKS.md). The test prompt differs from the validation
prompt by one thing, the validation item appended, and the target by one step in time.
This scores the test item from the *validation* prompt (the validation item left out of
the history; it stays excluded from the lists), for both models, to separate the two:
  - the policy's lead comes back: the appended item is what costs it;
  - it stays level: the later target is.
Both models are the run's own (SASRec from its eval cache, the published SFT policy):

    python bench/skip_step.py --run runs/quality/beauty_meta3/seed0 --out runs/exp/skip_step.json
"""
import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.config.loading import load_config
from pagellm.eval.metrics import hr_at_k, ndcg_at_k
from pagellm.eval.output_cache import CACHE_DIR, OutputCache
from pagellm.eval.paired import discordant, mcnemar, paired_difference
from pagellm.eval.runner import baseline_output, load_eval_set, policy_output

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True, help="a finished run folder (data, sft, eval_cache)")
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.set_num_threads(2)
run = Path(args.run)
cfg = load_config(run / "config.yaml", [])
test = load_eval_set(run / "data", "test", cfg.eval.max_users)
evals = pd.read_parquet(run / "data" / "eval.parquet").set_index("user_index").loc[test.user_index]
# The validation prompt and history, the test exclusions and targets.
skipped = dataclasses.replace(test, prompts=[list(p) for p in evals["prompt_val"]],
                              histories=[list(h) for h in evals["train_positives"]])
# SASRec's fit is keyed by the training sequences, the same for both sets: read, not refitted.
cache = OutputCache(run / CACHE_DIR)
result = {}
for name, es in (("test", test), ("test_from_val_prompt", skipped)):
    lists = {"sasrec": baseline_output("sasrec", cfg.eval.sasrec, es, 10, cfg.seed, cache).lists,
             "sft": policy_output(run / "sft", es, 10, cfg.eval.batch_size, cfg.eval.exclude_history, None).lists}
    per = {m: (np.array([hr_at_k(x, t, 10) for x, t in zip(v, es.targets)]),
               np.array([ndcg_at_k(x, t, 10) for x, t in zip(v, es.targets)])) for m, v in lists.items()}
    result[name] = {**{f"{m}/{k}": float(v[i].mean()) for m, v in per.items() for i, k in enumerate(("hr@10", "ndcg@10"))},
                    "mcnemar": mcnemar(*discordant(per["sft"][0], per["sasrec"][0])),
                    "ndcg@10_paired": paired_difference(per["sft"][1], per["sasrec"][1])}
    print(name, json.dumps(result[name]), flush=True)
Path(args.out).write_text(json.dumps(result, indent=1))
