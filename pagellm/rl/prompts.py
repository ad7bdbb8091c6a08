"""Which training prompts each PPO batch holds: a pure function of the batch id, so a
resumed run samples exactly the prompts the interrupted one would have (no Ray here; the
driver in actors/orchestrator.py hands these to the rollout actors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import Config


@dataclass
class PromptSource:
    """Training prompts, visited in a seeded order that is a pure function of the batch id,
    so a resumed run samples exactly the prompts the interrupted one would have."""

    prompts: list[list[int]]
    exclude: list[list[int]]
    batch_size: int
    seed: int

    def batch(self, batch_id: int) -> list[int]:
        n = len(self.prompts)
        out: list[int] = []
        start = batch_id * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.extend(perm[offset : offset + self.batch_size - len(out)].tolist())
        return out


def load_prompt_source(cfg: Config, run_dir: Path, encoder) -> PromptSource:
    """Every user's recent training positives as the prompt; everything they trained on is
    excluded from the page, as at evaluation time. No val/test item is ever used."""
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    prompts = [encoder.encode_prompt(int(u), list(p)) for u, p in zip(evals["user_index"], evals["prompt_val"])]
    exclude = [sorted(set(t)) for t in evals["train_items"]]
    return PromptSource(prompts, exclude, cfg.ppo.batch_size, cfg.seed)
