"""SASRec's validation and test NDCG@10 after every epoch of one long fit (diagnosis).

Fits the evaluation's SASRec (the run's eval.sasrec and seed, as the evaluation does) on a
finished run's training sequences for a fixed number of epochs, with no early stop, and
prints after each epoch its full-ranking NDCG@10 on the validation step and on the test
step. It is how the
evaluation's SASRec settings were chosen (docs/BENCHMARKS.md, "SASRec selected on
validation"): on MovieLens the validation curve is flat from epoch 8 to 17 before it climbs
to twice that, so a short patience stops it early. Test is printed to show what the
validation choice costs or gains; nothing is selected on it.

    python bench/sasrec_curve.py --run runs/quality/ml_b098/seed0 --epochs 120 --out runs/exp/sasrec_curve_ml.jsonl
"""
import argparse
import json
from pathlib import Path

from pagellm.config import load_config
from pagellm.eval.baselines.sasrec import SASRec
from pagellm.eval.runner import load_eval_set

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True, help="a run folder with data/")
ap.add_argument("--epochs", type=int, default=120)
ap.add_argument("--out", help="also write one JSON line per epoch here")
args = ap.parse_args()
cfg = load_config(Path(args.run) / "config.yaml", [])
es = load_eval_set(Path(args.run) / "data", "test", cfg.eval.max_users)
model = SASRec({"seed": cfg.seed, **cfg.eval.sasrec, "epochs": args.epochs, "patience": args.epochs + 1,
                "verbose": False})
score_validation = model.validate
rows = []


def validate_and_test(histories, targets):
    """SASRec.fit calls this once per epoch with the validation step; the test step is
    scored beside it from the same weights."""
    val = score_validation(histories, targets)
    rows.append({"epoch": len(rows) + 1, "val_ndcg@10": val, "test_ndcg@10": score_validation(es.histories, es.targets)})
    print(json.dumps(rows[-1]), flush=True)
    return val


model.validate = validate_and_test
model.fit(es.train_sequences, es.n_items, es.val_histories, es.val_targets)
if args.out:
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
