"""Where two models' hits differ, by how often the training rows hold the target and the
prompt's newest item (diagnosis).

Reads a finished evaluation's per-user results (`eval/per_user.parquet`, written by
`jobs.eval` for the split it scored) and the run's data, and prints each model's HR@10 per
bucket of (a) the target's training count, (b) the newest prompt item's training count,
and (c) both, rare (<= --rare) or not. On Beauty the policy trails SASRec where both the
newest item and the target are rare, and leads it elsewhere, on both steps; the test step
has more rare targets (docs/BENCHMARKS.md). Counts are of *other* users' training rows (the user's own
row of the newest validation-prompt item is left out), so both steps count alike.

With --split val it also reweights the validation users so that their newest items' counts
follow the counts the test step's newest items (the validation items) have: a validation
score for the step after it, from training and validation data alone (`step-weighted`).

    python bench/rare_targets.py --run runs/quality/beauty_meta3/seed0 --split test
    python bench/rare_targets.py --run runs/exp/b_val --split val
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.eval.transitions import item_counts

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True, help="a run folder with data/ and eval/per_user.parquet")
ap.add_argument("--split", required=True, choices=["val", "test"], help="the split eval/ was scored on")
ap.add_argument("--rare", type=int, default=9, help="at most this many training rows: rare")
ap.add_argument("--out", help="also write the tables as JSON here")
args = ap.parse_args()
run = Path(args.run)
evals = pd.read_parquet(run / "data" / "eval.parquet").set_index("user_index")
count = item_counts(evals["train_positives"], len(pd.read_parquet(run / "data" / "items.parquet")))
hits = pd.read_parquet(run / "eval" / "per_user.parquet").pivot_table(index="user_index", columns="model",
                                                                      values="hr@10")
users = evals.loc[hits.index]
# The target, and the prompt's newest item: the validation item for test, the newest
# training item for validation.
target = users["test_items" if args.split == "test" else "val_items"].map(lambda t: int(t[0]))
newest = users["val_items" if args.split == "test" else "train_positives"].map(lambda h: int(list(h)[-1]))
newest_count = count[newest] - (args.split == "val")  # other users' rows only
edges = [-1, 0, 4, 9, 19, 49, np.inf]
frame = hits.assign(target=pd.cut(count[target], edges), newest=pd.cut(newest_count, edges),
                    rare_target=count[target] <= args.rare, rare_newest=newest_count <= args.rare)
models = list(hits.columns)
tables = {}
for name, by in (("target's training count", ["target"]), ("newest prompt item's training count", ["newest"]),
                 (f"rare (<= {args.rare}) newest item, rare target", ["rare_newest", "rare_target"])):
    table = frame.groupby(by, observed=True)[models].mean().round(4)
    table.insert(0, "users", frame.groupby(by, observed=True).size())
    tables[name] = table
    flat = table.reset_index()
    rows = [" | ".join(str(v) for v in row) for row in flat.itertuples(index=False)]
    print(f"\n{args.split}: HR@10 by {name}\n| " + " | ".join(map(str, flat.columns)) + " |\n|"
          + "---|" * len(flat.columns) + "\n" + "\n".join(f"| {r} |" for r in rows))
if args.split == "val":
    # The next step's prompts end in the validation item: its training count is known now.
    next_newest = pd.cut(count[users["val_items"].map(lambda v: int(v[0]))], edges)
    share_next = pd.Series(next_newest).value_counts(normalize=True)
    share_now = frame["newest"].value_counts(normalize=True)
    weight = frame["newest"].map(lambda b: share_next.get(b, 0.0) / share_now[b]).astype(float)
    weighted = {m: float(np.average(frame[m], weights=weight)) for m in models}
    tables["step-weighted"] = pd.DataFrame([{"users": len(frame), **{m: round(v, 4) for m, v in weighted.items()}}])
    print("\nval, step-weighted HR@10 (newest-item counts as the test step will have them): "
          + ", ".join(f"{m} {v:.4f}" for m, v in weighted.items()))
if args.out:
    Path(args.out).write_text(json.dumps({k: v.reset_index().astype(str).to_dict("records")
                                          for k, v in tables.items()}, indent=1))
