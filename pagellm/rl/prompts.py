"""Which training prompts each PPO batch holds: a pure function of the batch id, so a
resumed run samples exactly the prompts the interrupted one would have (no Ray here; the
driver in actors/orchestrator.py hands these to the rollout actors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import Config
from pagellm.data.user_rows import sft_windows


@dataclass
class PromptSource:
    """Training prompts, visited in a seeded order that is a pure function of the batch id.

    A batch holds `batch_size` pages: `batch_size // samples_per_prompt` prompts, each
    repeated `samples_per_prompt` times in a row (one group per prompt). `targets[i]` are the
    training positives that came after prompt i (empty for the latest prompts)."""

    prompts: list[list[int]]
    exclude: list[list[int]]
    targets: list[list[int]]
    batch_size: int
    seed: int
    samples_per_prompt: int = 1

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.exclude) == len(self.targets):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.exclude)} exclusion lists, "
                             f"{len(self.targets)} target lists: they must match")
        if not self.prompts:
            raise ValueError("no training prompts: every user's training history is empty")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of samples_per_prompt "
                             f"{self.samples_per_prompt}")

    def batch(self, batch_id: int) -> list[int]:
        """Prompt indices of the batch's pages, each group's `samples_per_prompt` in a row."""
        n, per = len(self.prompts), self.batch_size // self.samples_per_prompt
        out: list[int] = []
        start = batch_id * per
        while len(out) < per:
            epoch, offset = divmod(start + len(out), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.extend(perm[offset : offset + per - len(out)].tolist())
        return [i for i in out for _ in range(self.samples_per_prompt)]


def history_cuts(train_items: list[int], train_positives: list[int], cfg: Config) -> list[tuple[list, list, list]]:
    """(prompt, exclude, later positives) at each SFT cut point of one user's training
    history (`pagellm.data.user_rows.sft_windows`, the cuts SFT's golden pages come from).
    Only what the user had touched before the cut is excluded: the later positives must
    stay writable, since the verifiable reward is for naming them."""
    out = []
    for start, _ in sft_windows(len(train_positives), cfg.data.page_len, cfg.data.sft_windows):
        cut = train_items.index(train_positives[start])  # position of the first later positive
        prompt = train_positives[max(0, start - cfg.data.history_len) : start]
        out.append((prompt, sorted(set(train_items[:cut])), list(train_positives[start:])))
    return out


def prompt_rows(cfg: Config, run_dir: Path, kind: str) -> list[tuple[int, list[int], list[int], list[int]]]:
    """(user, prompt items, excluded items, later training positives) per training prompt.
    `latest`: every user's recent training positives as the prompt and everything they
    trained on excluded from the page, as at evaluation time. `cuts`: the SFT cut points
    (`history_cuts`). No val/test item is ever used."""
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    rows = []
    for user, items, positives, latest in zip(evals["user_index"], evals["train_items"], evals["train_positives"],
                                               evals["prompt_val"]):
        items, positives = [int(i) for i in items], [int(i) for i in positives]
        cuts = (history_cuts(items, positives, cfg) if kind == "cuts"
                else [([int(i) for i in latest], sorted(set(items)), [])])
        rows += [(int(user), prompt, banned, later) for prompt, banned, later in cuts]
    return rows


def load_prompt_source(cfg: Config, run_dir: Path, encoder) -> PromptSource:
    """PPO's prompts (`ppo.prompts`, see `prompt_rows`) as a PromptSource."""
    rows = prompt_rows(cfg, run_dir, cfg.ppo.prompts)
    return PromptSource([encoder.encode_prompt(u, p) for u, p, _, _ in rows], [r[2] for r in rows],
                        [r[3] for r in rows], cfg.ppo.batch_size, cfg.seed, cfg.ppo.samples_per_prompt)
