"""What a serving replica does, without Ray: load a run's policy, vocabulary and popularity
list; resolve raw ids with the cold-start rules of docs/ARCHITECTURE.md §8; write pages by
batched, constrained greedy decoding; prepare /v1/score inputs for the reward model.

Cold start, per request:
  - history ids not in the catalogue are skipped and listed in `warnings`;
  - an unknown user is served from the history alone (the prompt without a user token);
  - no known user and no known history item: the most popular allowed items,
    marked `fallback: "popularity"`.
A page never holds an unknown item, a repeat, an excluded item or a history item; when
fewer than k items are allowed the page is shorter and says so in `warnings`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from pagellm.config import Config, ModelConfig
from pagellm.models.decoding import generate_pages
from pagellm.models.evaluator import Guidance
from pagellm.models.policy import is_adapter_model, load_policy
from pagellm.models.positions import context_limit, prompt_room
from pagellm.names import RL_ALGORITHMS, STAGE3_ALGORITHMS
from pagellm.serve.schemas import PageRequest, RequestError, ScoreRequest
from pagellm.vocab import LAYOUT_FILE, PromptEncoder, Vocab

POLICY_STAGES = (*STAGE3_ALGORITHMS, "sft")  # the first one holding a checkpoint is served
SHOWN_IDS = 20  # unknown ids listed in one warning; the rest are counted


@dataclass
class Prepared:
    """One request resolved to indices: what the batch decode needs."""

    user_index: int | None
    prompt_items: list[int]  # known history, most recent `history_window`, oldest first
    blocked: set[int]  # known history and exclusions: never on the page
    k: int
    fallback: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class ServedPage:
    item_ids: list[str]
    scores: list[float]
    fallback: str | None
    warnings: list[str]


@dataclass
class ScoreInputs:
    user_index: int | None
    prompt_items: list[int]
    page: list[int]
    warnings: list[str]


def _listed(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    more = len(ids) - SHOWN_IDS
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def _step_of(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else None


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / LAYOUT_FILE).exists()


def _stage_order(run_dir: Path) -> list[str]:
    """POLICY_STAGES, the run config's stage-3 algorithm first (a folder that ran more than
    one serves the one its config names)."""
    try:
        algorithm = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("stage3", {}).get("algorithm")
    except (OSError, yaml.YAMLError, AttributeError):
        algorithm = None
    first = [algorithm] if algorithm in STAGE3_ALGORITHMS else []
    return first + [s for s in POLICY_STAGES if s not in first]


def find_policy(run_dir: str | Path) -> tuple[str, Path]:
    """(stage, checkpoint dir): stage 3's policy (<run>/ppo, grpo, dpo or degre) when it
    holds a checkpoint, else SFT. A stage dir is a checkpoint itself (what `pagellm sft` and
    a finished stage 3 publish) or holds checkpoint subdirs; the highest step (then newest)
    wins. RL's in-training checkpoints (<run>/ppo/checkpoints/step_N/policy) are not
    served: an unfinished run serves SFT."""
    run_dir = Path(run_dir)
    for stage in _stage_order(run_dir):
        stage_dir = run_dir / stage
        if _is_checkpoint(stage_dir):
            return stage, stage_dir
        if stage_dir.is_dir():
            subs = [d for d in stage_dir.iterdir() if _is_checkpoint(d)]
            if subs:
                best = max(subs, key=lambda d: (_step_of(d) if _step_of(d) is not None else -1, d.stat().st_mtime))
                return stage, best
    raise FileNotFoundError(
        f"no policy checkpoint under {run_dir}/{{{','.join(POLICY_STAGES)}}}: run `pagellm sft --run {run_dir}` first"
    )


def dir_digest(path: Path) -> str:
    """8 hex chars that change whenever a file of the checkpoint is rewritten."""
    h = hashlib.sha1()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:8]


def _last_ppo_step(stage_dir: Path) -> int | None:
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    last = json.loads(lines[-1])
    step = last.get("policy_version", last.get("step"))
    return int(step) if step is not None else None


def policy_version(stage: str, checkpoint: Path, run_dir: str | Path) -> str:
    """"ppo@30" when the step is known (checkpoint name or ppo/metrics.jsonl), else
    "<stage>@<digest>"."""
    step = _step_of(checkpoint) if checkpoint != Path(run_dir) / stage else None
    if step is None and stage in RL_ALGORITHMS:
        step = _last_ppo_step(Path(run_dir) / stage)
    return f"{stage}@{step}" if step is not None else f"{stage}@{dir_digest(checkpoint)}"


def popularity_order(items: pd.DataFrame) -> np.ndarray:
    """Item indices, most training interactions first (ties: lower index first)."""
    index = items["index"].to_numpy(dtype=np.int64)
    pop = items["popularity"].to_numpy(dtype=np.float64)
    return index[np.lexsort((index, -pop))]


def popularity_logshare(items: pd.DataFrame, n_items: int) -> np.ndarray:
    """log of each item's add-one-smoothed share of training interactions: the score a
    popularity page reports (finite even for never-seen items)."""
    pop = np.zeros(n_items)
    pop[items["index"].to_numpy(dtype=np.int64)] = items["popularity"].to_numpy(dtype=np.float64)
    return np.log((pop + 1.0) / (pop.sum() + n_items))


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class PageEngine:
    """A loaded policy plus the id maps and the popularity fallback of one run."""

    def __init__(self, model, layout, vocab: Vocab, items: pd.DataFrame, version: str, history_len: int, max_k: int,
                 guidance: Guidance | None = None):
        if (vocab.n_items, vocab.n_users) != (layout.n_items, layout.n_users):
            raise ValueError(
                f"the policy was built for {layout.n_users} users / {layout.n_items} items but the run's "
                f"vocabulary has {vocab.n_users} / {vocab.n_items}: the checkpoint is from another data build"
            )
        self.model, self.layout, self.vocab = model, layout, vocab
        if layout.evaluator_weight and (guidance is None or guidance.evaluator is None):
            raise ValueError("the policy's layout adds an evaluator's scores (guided stage): pass its Guidance")
        self.guidance = guidance or Guidance(None)
        self.encoder = PromptEncoder(None, layout)
        self.version = version
        self.max_k = max_k
        self.by_popularity = popularity_order(items).tolist()
        self.pop_score = popularity_logshare(items, vocab.n_items)
        self.history_window = self._fit_window(history_len, max_k)

    def _fit_window(self, history_len: int, max_k: int) -> int:
        """Prompt items kept: the training window (data.history_len), shrunk if the model's
        positions cannot hold it plus a max_k page and <eos>."""
        tokens = prompt_room(self.model, max_k + 1)
        if tokens is None:
            return history_len
        room = tokens - (len(self.encoder.encode_prompt(0, [0])) - 1)
        if room < 1:
            raise ValueError(f"the model's {context_limit(self.model)} positions cannot hold a prompt plus a page "
                             f"of serve.max_k={max_k}")
        return min(history_len, room)

    @classmethod
    def load(cls, run_dir: str | Path, cfg: Config, device: str | None = None) -> "PageEngine":
        run_dir = Path(run_dir)
        stage, checkpoint = find_policy(run_dir)
        device = pick_device(device)
        model, _, layout = load_policy(checkpoint, ModelConfig(dtype=cfg.model.dtype), trainable=False, device=device)
        if is_adapter_model(model):
            model = model.merge_and_unload()  # one matmul per layer instead of three
        model = model.to(device).eval()
        vocab = Vocab.from_parquet(run_dir / "data" / "vocab.parquet")
        items = pd.read_parquet(run_dir / "data" / "items.parquet", columns=["index", "popularity"])
        version = policy_version(stage, checkpoint, run_dir)
        return cls(model, layout, vocab, items, version, cfg.data.history_len, cfg.serve.max_k,
                   Guidance.load(checkpoint, layout))

    # -- id resolution -------------------------------------------------------------------

    def _known(self, raw_ids: list[str]) -> tuple[list[int], list[str]]:
        known, unknown = [], []
        for raw in raw_ids:
            index = self.vocab.item_index(raw)
            if index is None:
                unknown.append(raw)
            else:
                known.append(index)
        return known, unknown

    def _resolve(self, user_id: str | None, history: list[str]) -> tuple[int | None, list[int], list[int], list[str]]:
        """(user index, every known history index, prompt window, warnings)."""
        warnings = []
        known, unknown = self._known(history)
        if unknown:
            warnings.append(f"history ids not in the catalogue were skipped: {_listed(unknown)}")
        user = None if user_id is None else self.vocab.user_index(user_id)
        if user_id is not None and user is None:
            warnings.append(f"unknown user_id {user_id!r}: served from the history alone")
        return user, known, known[-self.history_window :] if known else [], warnings

    def prepare(self, req: PageRequest) -> Prepared:
        if req.k > self.max_k:
            raise RequestError(f"invalid request: k: k must be between 1 and {self.max_k}, got {req.k}")
        user, known, window, warnings = self._resolve(req.user_id, req.history)
        excluded, unknown_ex = self._known(req.exclude)
        if unknown_ex:
            warnings.append(f"exclude ids not in the catalogue were ignored: {_listed(unknown_ex)}")
        fallback = None
        if user is None and not known:
            fallback = "popularity"
            warnings.append("no known user and no known history item: serving the most popular items")
        return Prepared(user, window, set(known) | set(excluded), req.k, fallback, warnings)

    def score_inputs(self, req: ScoreRequest) -> ScoreInputs:
        user, _, window, warnings = self._resolve(req.user_id, req.history)
        page, unknown = self._known(req.page)
        if unknown:
            raise RequestError(
                f"invalid request: page holds item ids not in the catalogue: {_listed(unknown)}",
                errors=[{"loc": "page", "msg": "unknown item ids", "ids": unknown}],
            )
        return ScoreInputs(user, window, page, warnings)

    # -- pages ---------------------------------------------------------------------------

    def _popularity_page(self, prep: Prepared) -> tuple[list[int], list[float]]:
        chosen = []
        for item in self.by_popularity:  # stops after k: a large catalogue costs nothing extra
            if item not in prep.blocked:
                chosen.append(item)
                if len(chosen) == prep.k:
                    break
        return chosen, [float(self.pop_score[i]) for i in chosen]

    def _decode(self, rows: list[Prepared]) -> list[tuple[list[int], list[float]]]:
        """One generate_pages call for every row. Rows share the largest k and are cut to
        their own: at step t < k the allowed set does not depend on k, so a greedy page's
        first k items and their logprobs are exactly those of a k-item page."""
        prompts = [self.encoder.encode_prompt(p.user_index, p.prompt_items) for p in rows]
        k = max(p.k for p in rows)
        with torch.inference_mode():
            batch = generate_pages(
                self.model, self.layout, prompts, k, mode="greedy", exclude=[p.blocked for p in rows],
                evaluator_scores=self.guidance.scores([p.prompt_items for p in rows])
            )
        logprobs = batch.logprobs.float().cpu().tolist()
        out = []
        for row, (items, prep) in enumerate(zip(batch.items, rows)):
            kept = items[: prep.k]
            out.append((kept, logprobs[row][: len(kept)]))
        return out

    def pages(self, prepared: list[Prepared]) -> list[ServedPage]:
        """Pages for a batch of prepared requests (model rows decoded together)."""
        model_rows = [n for n, p in enumerate(prepared) if p.fallback is None]
        decoded = dict(zip(model_rows, self._decode([prepared[n] for n in model_rows]))) if model_rows else {}
        out = []
        for n, prep in enumerate(prepared):
            items, scores = decoded[n] if n in decoded else self._popularity_page(prep)
            warnings = list(prep.warnings)
            if len(items) < prep.k:
                warnings.append(
                    f"only {len(items)} items can be served once the history and exclusions are removed; "
                    f"the page has {len(items)} of the {prep.k} asked for"
                )
            out.append(ServedPage([self.vocab.item_ids[i] for i in items], scores, prep.fallback, warnings))
        return out

    def page(self, req: PageRequest) -> ServedPage:
        return self.pages([self.prepare(req)])[0]


class PageScorer:
    """The run's reward model behind /v1/score: R_c and R_f of one page per request."""

    def __init__(self, scorer, version: str):
        self.scorer = scorer
        self.version = version

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None) -> "PageScorer | None":
        """None when the run has no reward model (the endpoint then answers 503)."""
        from pagellm.models.reward import REWARD_FILE

        reward_dir = Path(run_dir) / "reward"
        if not (reward_dir / REWARD_FILE).exists():
            return None
        from pagellm.models.reward_scorer import RewardScorer

        return cls(RewardScorer.load(reward_dir, device=pick_device(device)), f"reward@{dir_digest(reward_dir)}")

    def score(self, rows: list[ScoreInputs]) -> list[tuple[float, float]]:
        with torch.inference_mode():
            r_c, r_f = self.scorer.score(
                [r.user_index for r in rows], [r.prompt_items for r in rows], [r.page for r in rows]
            )
        return [(float(c), float(f)) for c, f in zip(np.asarray(r_c).reshape(-1), np.asarray(r_f).reshape(-1))]
