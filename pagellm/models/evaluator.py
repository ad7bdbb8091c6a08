"""The guided stage's item evaluator: independently trained recommenders whose scores,
standardised (and averaged when there are several), join the policy's decoding
(TokenLayout.evaluator_weight, decoding.ItemBias).

Why a second model: every reward that read the SFT policy's own hidden states or
likelihood ranked pages much as the policy already does (docs/BENCHMARKS.md, "Reward
fidelity"), so nothing built on it could add accuracy. Recommenders trained on the same
training sequences make different mistakes. Two kinds, each tried alone and averaged, the
guided stage keeping the one validation favours (`evaluator_mixes`):

- SASRec reads order; in the guided decoding alone it raised test ndcg@100 on MovieLens and
  Musical Instruments (+2.3 %, +2.6 %, 3 seeds), though not hits at 10 per user;
- EASE (pagellm/eval/baselines/ease.py) reads co-occurrence, which neither the policy nor
  SASRec models directly. Averaged with SASRec it moves the decoding much further: on
  Musical Instruments test ndcg@10 +8 to +10 % per seed against 0 to +1.7 % for SASRec alone
  (docs/BENCHMARKS.md, "EASE beside SASRec in the guided decoding"). On Amazon Beauty it is
  far weaker than SASRec, and SASRec alone is the better term there.

Each is fitted exactly as the evaluation fits its baseline (same parameters, `eval.sasrec` /
`eval.ease`, same seed, epoch or lambda chosen on the validation step, the fit shared through
the run's eval_cache), so the published policy is "policy + the baselines it is compared
with", and the report says so.

They score the item sequence of the prompt (the user's most recent `data.history_len`
positives, SASRec's own window), so evaluation and serving feed them what the policy sees.
Saved beside the published policy as `evaluator/` (one safetensors file per model + their
parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pagellm.models.page_prior import standardise

EVALUATOR_DIR = "evaluator"
_META = "evaluator.json"
_LEGACY_STATE = "model.safetensors"  # the one-SASRec layout of guided policies published before EASE
EVALUATOR_KINDS = ("sasrec", "ease")


@dataclass
class FitInputs:
    """What a baseline fit reads (the fields of eval.runner.EvalSet that `fitted_baseline`
    uses): training sequences and the validation step it selects on. No test item."""

    train_sequences: list[list[int]]
    n_items: int
    val_histories: list[list[int]]
    val_targets: list[list[int]]


def fit_inputs(data_dir: str | Path) -> FitInputs:
    """The evaluation's own fit inputs (eval.runner.fit_sequences), so a fit here and the
    evaluation's baseline fit have one cache key."""
    import pandas as pd

    from pagellm.eval.runner import fit_sequences

    data_dir = Path(data_dir)
    evals = pd.read_parquet(data_dir / "eval.parquet", columns=["user_index", "train_positives", "val_items"])
    n_items = len(pd.read_parquet(data_dir / "items.parquet", columns=["index"]))
    train_sequences, val_histories, val_targets, _, _ = fit_sequences(evals)
    return FitInputs(train_sequences, n_items, val_histories, val_targets)


class ItemEvaluator:
    """Fitted baselines behind one call: item sequences -> [B, n_items] scores, the mean of
    each model's standardised scores (page_prior.standardise: models on different scales get
    equal say)."""

    def __init__(self, models: list):
        if not models:
            raise ValueError("an item evaluator needs at least one model")
        sizes = {m.n_items for m in models}
        if len(sizes) != 1:
            raise ValueError(f"the evaluator's models score different catalogues: {sorted(sizes)} items")
        self.models = list(models)

    @property
    def kinds(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def n_items(self) -> int:
        return self.models[0].n_items

    def scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """float32 [B, n_items]; a row with no items scores 0 everywhere (no opinion, so the
        decoding adds nothing for it)."""
        out = np.zeros((len(sequences), self.n_items), dtype=np.float32)
        rows = [r for r, s in enumerate(sequences) if len(s)]
        if rows:
            seqs = [list(sequences[r]) for r in rows]
            out[rows] = np.mean([standardise(m.score(seqs)) for m in self.models], axis=0)
        return torch.from_numpy(out)

    def save(self, policy_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(policy_dir) / EVALUATOR_DIR
        out.mkdir(parents=True, exist_ok=True)
        meta = {"n_items": self.n_items, "models": []}
        for m in self.models:
            save_file({k: v.contiguous() for k, v in m.state().items()}, str(out / f"{m.name}.safetensors"))
            meta["models"].append({"kind": m.name, "params": m.params, "file": f"{m.name}.safetensors"})
        (out / _META).write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, policy_dir: str | Path) -> "ItemEvaluator | None":
        """The evaluator saved beside a policy, None when there is none."""
        from safetensors.torch import load_file

        from pagellm.eval.baselines import make_baseline

        where = Path(policy_dir) / EVALUATOR_DIR
        if not (where / _META).exists():
            return None
        meta = json.loads((where / _META).read_text())
        if "models" not in meta:  # published before the evaluator could hold several models
            meta = {"n_items": meta.get("n_items"), "models": [{**meta, "file": _LEGACY_STATE}]}
        models = []
        for entry in meta["models"]:
            if entry.get("kind") not in EVALUATOR_KINDS:
                raise ValueError(f"{where}/{_META}: unknown evaluator kind {entry.get('kind')!r}; "
                                 f"known: {', '.join(EVALUATOR_KINDS)}")
            model = make_baseline(entry["kind"], {**entry["params"], "verbose": False})
            model.restore(load_file(str(where / entry["file"])), int(meta["n_items"]))
            models.append(model)
        return cls(models)


def evaluator_mixes(evaluator: ItemEvaluator) -> list[ItemEvaluator]:
    """What the guided stage tries as its item term: each model alone, then (with more than
    one) all of them averaged. An equal average is not always best: on Amazon Beauty EASE is far
    weaker than SASRec (test ndcg@10 0.039 vs 0.055) and the average passed no weight on
    validation, where SASRec alone had; on Musical Instruments the average beat either alone."""
    alone = [ItemEvaluator([m]) for m in evaluator.models]
    return alone + [evaluator] if len(alone) > 1 else alone


def fit_evaluator(data_dir: str | Path, params: dict[str, dict], seed: int, cache_dir: str | Path | None = None,
                  log=print) -> ItemEvaluator:
    """One model per key of `params` (kind -> its parameter overrides, e.g. the config's
    `eval.sasrec`), each fitted on the run's training sequences with its epoch or lambda chosen
    on the validation step: the evaluation's baseline fit (eval.runner.fitted_baseline), taken
    from `cache_dir` when the evaluation (or an earlier stage run) already made it."""
    from pagellm.eval.output_cache import OutputCache
    from pagellm.eval.runner import fitted_baseline

    unknown = sorted(set(params) - set(EVALUATOR_KINDS))
    if unknown or not params:
        raise ValueError(f"evaluator kinds {sorted(params)}: expected one or more of {', '.join(EVALUATOR_KINDS)}")
    cache = OutputCache(Path(cache_dir)) if cache_dir is not None else None
    inputs = fit_inputs(data_dir)
    return ItemEvaluator([fitted_baseline(kind, p, inputs, seed, cache, log) for kind, p in params.items()])


def prompt_items(layout, prompt: list[int]) -> list[int]:
    """The item indices of an encoded prompt, in order (what the evaluator scores)."""
    return [int(t) - layout.item_offset for t in prompt if layout.is_item_token(int(t))]


class Guidance:
    """What decoding a published policy needs besides its layout: its evaluator's scores for
    each prompt's items when the layout weights them (None otherwise). Load it with the
    policy; every decode of that policy (evaluation, KL, serving) calls `scores`."""

    def __init__(self, evaluator: ItemEvaluator | None):
        self.evaluator = evaluator

    @classmethod
    def load(cls, policy_dir: str | Path, layout) -> "Guidance":
        if not layout.evaluator_weight:
            return cls(None)
        evaluator = ItemEvaluator.load(policy_dir)
        if evaluator is None:
            raise FileNotFoundError(f"{policy_dir}: the layout adds an evaluator's scores at weight "
                                    f"{layout.evaluator_weight:g}, but {EVALUATOR_DIR}/ is missing beside it")
        if evaluator.n_items != layout.n_items:
            raise ValueError(f"{policy_dir}/{EVALUATOR_DIR} scores {evaluator.n_items} items, the policy "
                             f"{layout.n_items}")
        return cls(evaluator)

    def scores(self, item_sequences: list[list[int]]) -> torch.Tensor | None:
        return None if self.evaluator is None else self.evaluator.scores(item_sequences)
