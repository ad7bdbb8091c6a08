"""The guided stage's item evaluator: an independently trained next-item model whose scores
join the policy's decoding (TokenLayout.evaluator_weight, decoding.ItemBias).

Why a second model: every reward that read the SFT policy's own hidden states or
likelihood ranked pages much as the policy already does (docs/BENCHMARKS.md, "Reward
fidelity"), so nothing built on it could add accuracy. A sequential recommender trained on
the same training sequences makes different mistakes: its scores in the guided decoding
raised test ndcg@100 on MovieLens and Musical Instruments (+2.3 %, +2.6 %, 3 seeds), though
not hits at 10 per user (docs/BENCHMARKS.md, "An independent evaluator in the decoding").
The evaluator is SASRec, fitted exactly as the evaluation fits its baseline (same
parameters, `eval.sasrec`, same seed, epoch chosen on the validation step, the fit shared
through the run's eval_cache), so the published policy is "policy + the baseline it is
compared with", and the report says so.

It scores the item sequence of the prompt (the user's most recent `data.history_len`
positives, SASRec's own window), so evaluation and serving feed it what the policy sees.
Saved beside the published policy as `evaluator/` (safetensors + its parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EVALUATOR_DIR = "evaluator"
_STATE = "model.safetensors"
_META = "evaluator.json"


@dataclass
class FitInputs:
    """What a baseline fit reads (the fields of eval.runner.EvalSet that `fitted_baseline`
    uses): training sequences and the validation step it selects its epoch on. No test item."""

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
    evals = pd.read_parquet(data_dir / "eval.parquet", columns=["train_positives", "val_items"])
    n_items = len(pd.read_parquet(data_dir / "items.parquet", columns=["index"]))
    train_sequences, val_histories, val_targets = fit_sequences(evals)
    return FitInputs(train_sequences, n_items, val_histories, val_targets)


class ItemEvaluator:
    """A fitted SASRec behind one call: item sequences -> [B, n_items] scores."""

    def __init__(self, model):
        self.model = model

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """float32 [B, n_items]; a row with no items scores 0 everywhere (no opinion, so the
        decoding adds nothing for it)."""
        out = np.zeros((len(sequences), self.n_items), dtype=np.float32)
        rows = [r for r, s in enumerate(sequences) if len(s)]
        if rows:
            out[rows] = self.model.score([list(sequences[r]) for r in rows])
        return torch.from_numpy(out)

    def save(self, policy_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(policy_dir) / EVALUATOR_DIR
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.net.state_dict().items()}, str(out / _STATE))
        (out / _META).write_text(json.dumps({"kind": "sasrec", "n_items": self.n_items,
                                             "params": self.model.params}, indent=1))
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
        if meta.get("kind") != "sasrec":
            raise ValueError(f"{where}/{_META}: unknown evaluator kind {meta.get('kind')!r}")
        model = make_baseline("sasrec", {**meta["params"], "verbose": False})
        model.restore(load_file(str(where / _STATE)), int(meta["n_items"]))
        return cls(model)


def fit_evaluator(data_dir: str | Path, params: dict, seed: int, cache_dir: str | Path | None = None,
                  log=print) -> ItemEvaluator:
    """SASRec on the run's training sequences, its epoch chosen on the validation step: the
    evaluation's baseline fit (eval.runner.fitted_baseline), taken from `cache_dir` when the
    evaluation (or an earlier stage run) already made it."""
    from pagellm.eval.output_cache import OutputCache
    from pagellm.eval.runner import fitted_baseline

    cache = OutputCache(Path(cache_dir)) if cache_dir is not None else None
    return ItemEvaluator(fitted_baseline("sasrec", params, fit_inputs(data_dir), seed, cache, log))


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
