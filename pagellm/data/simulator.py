"""The embedded simulator: a synthetic world whose truth is known, so every run can
measure the true utility of a page, not only proxies against held-out items.

World (docs/ARCHITECTURE.md §3):
- items: a category (Zipf-sized categories), a latent vector near the category's
  centroid, a quality and a Zipf popularity (quality leans towards popular items, as in
  real catalogues, which is what makes popularity a non-trivial baseline);
- users: a latent taste concentrated on 1-3 categories that drifts as a random walk
  (`taste_drift` x taste norm per step);
- histories: visits of BLOCK items, each drawn without repeats from softmax(taste . item +
  exponent x log pop) (with `visit_satiation`, also discounted by (1 - satiation)^(earlier
  items of its category in the visit)), rated by a noisy, clipped, rounded function of
  taste . item + quality;
- page utility: sum_k exam(k) . sigmoid(taste . item_k + quality_k - bias)
  . (1 - satiation)^(earlier page items of the same category), at the user's current
  taste (the end of their history). The greedy oracle page is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pagellm.config import SimulatorConfig
from pagellm.data.schema import INTERACTION_COLUMNS, ReadResult, Rejects, canonical_interactions

STATE_VERSION = 1
EPOCH_START = 1_420_070_400  # 2015-01-01: timestamps look like a real review dump
ACTIVE_DAYS = 730  # users join uniformly over two years
GAP_MEDIAN_S = 86_400.0  # median time between two interactions of a user
GAP_SIGMA = 1.5  # log-normal spread of those gaps: bursts and long pauses
BLOCK = 8  # history steps sampled under one taste snapshot (drift is slow)
MIN_HISTORY = 10
MAX_HISTORY_SHARE = 0.6  # a history never eats more than this share of the catalogue
CATEGORY_ZIPF = 1.0  # category size ~ 1 / rank^a
POPULARITY_ZIPF = 1.0  # item popularity ~ 1 / rank^a
ITEM_SPREAD = 0.6  # item vector = centroid + this much isotropic noise (norm)
TASTE_NORM = 3.0  # |taste|: how sharply a user separates liked from other categories
TASTE_NOISE = 0.3  # idiosyncratic part of a taste beyond its categories
QUALITY_STD = 1.2
QUALITY_POPULARITY_CORR = 0.7
FAN_EXPONENT = 0.5  # a category's share of fans ~ its size^a
CLICK_QUANTILE = 0.97  # affinity quantile over (user, item) pairs that gets P(click) = 1/2
RATING_MEAN, RATING_SPREAD = 3.8, 1.2  # ~60% ratings > 3, ~14% < 3
CHUNK = 2048  # most users per vectorised oracle batch
GROUP = 32  # items per bucket of the two-stage history sampler
CHUNK_ELEMENTS = 1 << 22  # users x items per vectorised batch: bounds memory

_ITEM_ARRAYS = ("item_category", "item_vector", "item_quality", "item_log_pop")
_USER_ARRAYS = ("user_taste", "user_length", "block_taste", "block_steps")


def examination(k: int) -> np.ndarray:
    """Probability that position 1..k is looked at: the DCG discount 1 / log2(pos + 1)."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form never overflows


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _segment_cumsum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at every segment (segments laid end to end)."""
    total = np.cumsum(values, axis=0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    before = total[starts] - values[starts]  # what the running sum held at each start
    return total - np.repeat(before, lengths, axis=0)


def _first_distinct(cand: np.ndarray, bad: np.ndarray, want: np.ndarray, width: int):
    """Per row, the first `want` draws that are neither `bad` nor a repeat, in draw order
    (-1 where a row has too few), and how many each row got."""
    m = cand.shape[1]
    before = np.triu(np.ones((m, m), dtype=bool), 1)  # [j, k]: draw j precedes draw k
    repeat = ((cand[:, :, None] == cand[:, None, :]) & before).any(axis=1)
    rank = np.cumsum(~repeat & ~bad, axis=1)
    take = ~repeat & ~bad & (rank <= want[:, None])
    out = np.full((len(cand), width), -1, dtype=np.int64)
    r, c = np.nonzero(take)
    out[r, rank[r, c] - 1] = cand[r, c]
    return out, np.minimum(rank[:, -1], want)


def _first_accepted(cand: np.ndarray, bad: np.ndarray, log_u: np.ndarray, want: np.ndarray, width: int,
                    category: np.ndarray, log_keep: float):
    """_first_distinct with satiation: scanning each row's draws in order, a draw that is
    neither `bad` nor a repeat is kept with probability (1 - satiation)^(items of its
    category kept before it), i.e. log_u < log_keep x that count. Rejection from the
    undiscounted softmax, so the kept items follow the discounted one exactly."""
    rows = np.arange(len(cand))
    out = np.full((len(cand), width), -1, dtype=np.int64)
    have = np.zeros(len(cand), dtype=np.int64)
    counts = np.zeros((len(cand), int(category.max(initial=0)) + 1))
    for j in range(cand.shape[1]):
        item = cand[:, j]
        cat = category[item]
        ok = ~bad[:, j] & (have < want) & ~(out == item[:, None]).any(axis=1)
        ok &= log_u[:, j] < log_keep * counts[rows, cat]
        r = rows[ok]
        out[r, have[r]] = item[r]
        have[r] += 1
        counts[r, cat[r]] += 1
    return out, have


def _inverse_cdf(rng: np.random.Generator, cdf: np.ndarray, m: int) -> np.ndarray:
    """`m` draws per row of the index i taken with weight cdf[i] - cdf[i-1] (cdf rows are
    running sums over the last axis). u stays strictly below the total, so an index of
    zero weight never comes out."""
    top = cdf[..., -1:]
    u = np.minimum(rng.random(top.shape[:-1] + (m,), dtype=cdf.dtype) * top, np.nextafter(top, 0))
    return (cdf[..., None, :] <= u[..., None]).sum(axis=-1)


def _draw_without_replacement(
    rng: np.random.Generator, score: np.ndarray, seen: np.ndarray, want: np.ndarray,
    category: np.ndarray | None = None, log_keep: float = 0.0,
) -> np.ndarray:
    """Sequential sampling without replacement from softmax(score) over items not `seen`,
    `want[r]` items for row r, in draw order. Drawing with replacement and skipping
    repeats is exact. Each draw picks a bucket of GROUP items by its weight, then an item
    in it: bucket totals are far cheaper than a full-width CDF per row. With `category`
    and log_keep = log(1 - satiation) < 0, each item's weight is also discounted by
    (1 - satiation)^(earlier draws of its category in the row), by rejection
    (`_first_accepted`). `score` is overwritten; pass a width that is a multiple of GROUP
    to avoid a padded copy."""
    n_rows, n_items = score.shape
    np.copyto(score, -np.inf, where=seen)
    score -= score.max(axis=1, keepdims=True)
    weight = np.exp(score)  # score stays as log-weights for the underflow fallback
    if n_items % GROUP:
        weight = np.pad(weight, ((0, 0), (0, GROUP - n_items % GROUP)))
    buckets = weight.reshape(n_rows, -1, GROUP)
    bucket_cdf = np.cumsum(np.einsum("rgs->rg", buckets), axis=1)

    def draw(rows: np.ndarray, m: int) -> np.ndarray:
        bucket = _inverse_cdf(rng, bucket_cdf[rows], m)
        inner = np.cumsum(buckets[rows[:, None], bucket], axis=2)
        return bucket * GROUP + _inverse_cdf(rng, inner, 1)[..., 0]

    width = int(want.max(initial=0))
    out = np.full((n_rows, width), -1, dtype=np.int64)
    have = np.zeros(n_rows, dtype=np.int64)
    active = np.arange(n_rows)
    satiates = category is not None and log_keep < 0
    cand = draw(active, 2 * BLOCK)
    log_u = np.log(rng.random(cand.shape)) if satiates else None
    for _ in range(8 if satiates else 5):  # rows whose draws kept repeating (or being rejected) draw on
        bad = seen[active[:, None], cand]
        if satiates:
            out[active], have[active] = _first_accepted(cand, bad, log_u, want[active], width, category, log_keep)
        else:
            out[active], have[active] = _first_distinct(cand, bad, want[active], width)
        short = have[active] < want[active]
        if not short.any():
            return out
        active = active[short]
        more = draw(active, cand.shape[1])
        cand = np.concatenate([cand[short], more], axis=1)
        if satiates:  # the same uniforms for the same draws: the rescan keeps what it kept
            log_u = np.concatenate([log_u[short], np.log(rng.random(more.shape))], axis=1)
    # Only reachable when weights underflow (extreme popularity_exponent): fill the rest
    # with the heaviest remaining unseen items so histories keep their length.
    for r in np.flatnonzero(have < want):
        order = np.argsort(-score[r], kind="stable")
        extra = [i for i in order if not seen[r, i] and i not in out[r, : have[r]]]
        out[r, have[r] : want[r]] = extra[: want[r] - have[r]]
    return out


class Simulator:
    """A seeded synthetic world; see the module docstring for the generative model."""

    def __init__(self, cfg: SimulatorConfig | None = None, seed: int = 0):
        self.cfg = cfg or SimulatorConfig()
        self.seed = int(seed)
        streams = np.random.SeedSequence(self.seed).spawn(3)
        self._history_seed, self._rating_seed = (int(s.generate_state(1)[0]) for s in streams[1:])
        self._build_world(np.random.default_rng(streams[0]))
        self._index()

    # ----------------------------------------------------------------- world
    def _build_world(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        n_items, dim = cfg.items, cfg.latent_dim
        n_cats = min(cfg.categories, n_items)
        size_w = 1.0 / np.arange(1, n_cats + 1) ** CATEGORY_ZIPF
        sizes = 1 + rng.multinomial(n_items - n_cats, size_w / size_w.sum())
        self.item_category = rng.permutation(np.repeat(np.arange(n_cats), sizes)).astype(np.int64)
        centroids = _unit_rows(rng.normal(size=(n_cats, dim)))
        noise = rng.normal(size=(n_items, dim)) * ITEM_SPREAD / np.sqrt(dim)
        self.item_vector = centroids[self.item_category] + noise
        self.item_log_pop = -POPULARITY_ZIPF * np.log1p(rng.permutation(n_items).astype(np.float64))
        pop_z = (self.item_log_pop - self.item_log_pop.mean()) / self.item_log_pop.std()
        rho = QUALITY_POPULARITY_CORR
        self.item_quality = QUALITY_STD * (rho * pop_z + np.sqrt(1 - rho**2) * rng.normal(size=n_items))

        # Tastes: 1-3 categories per user, big categories drawing more fans (but less than
        # in proportion, or the popularity head collapses into one category), mixed with
        # Dirichlet weights.
        n_users = cfg.users
        picks = np.argsort(-(FAN_EXPONENT * np.log(sizes) + rng.gumbel(size=(n_users, n_cats))), axis=1)[:, :3]
        n_liked = rng.choice([1, 2, 3], size=n_users, p=[0.4, 0.4, 0.2])
        weights = rng.gamma(1.0, size=(n_users, picks.shape[1]))
        weights[np.arange(picks.shape[1])[None, :] >= n_liked[:, None]] = 0.0
        weights /= weights.sum(axis=1, keepdims=True)
        direction = np.einsum("uj,ujd->ud", weights, centroids[picks])
        direction += rng.normal(size=(n_users, dim)) * TASTE_NOISE / np.sqrt(dim)
        taste0 = TASTE_NORM * _unit_rows(direction)

        # History lengths: log-normal around the configured mean, at least MIN_HISTORY.
        cap = max(1, int(MAX_HISTORY_SHARE * n_items))
        floor = min(MIN_HISTORY, cfg.interactions_per_user, cap)
        spread = rng.lognormal(-0.18, 0.6, size=n_users)  # mean 1
        extra = max(cfg.interactions_per_user - floor, 0) * spread
        self.user_length = np.clip(floor + np.rint(extra), floor, cap).astype(np.int64)

        # Drift: a random walk of one step per interaction, observed at block boundaries
        # (a sum of n steps is one Gaussian step with variance n), so storage is per block.
        n_blocks = -(-self.user_length // BLOCK)
        pos = np.arange(n_blocks.sum()) - np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)
        self.block_steps = np.minimum(BLOCK, np.repeat(self.user_length, n_blocks) - pos * BLOCK)
        step = cfg.taste_drift * TASTE_NORM / np.sqrt(dim)
        moves = rng.normal(size=(len(pos), dim)) * step * np.sqrt(self.block_steps)[:, None]
        walked = _segment_cumsum(moves, n_blocks)
        self.block_taste = np.repeat(taste0, n_blocks, axis=0) + walked - moves
        self.user_taste = taste0 + walked[np.cumsum(n_blocks) - 1]
        self.click_bias = self._calibrate_bias(rng)

    def _calibrate_bias(self, rng: np.random.Generator) -> float:
        """Bias putting P(click) = 1/2 at the CLICK_QUANTILE of current affinities, so
        clicks stay in a realistic range whatever the dimensions and scales."""
        users = rng.choice(len(self.user_taste), size=min(500, len(self.user_taste)), replace=False)
        affinity = self.user_taste[users] @ self.item_vector.T + self.item_quality
        return float(np.quantile(affinity, CLICK_QUANTILE))

    def _index(self) -> None:
        self.user_ids = np.array([f"u{n}" for n in range(len(self.user_taste))], dtype=object)
        self.item_ids = np.array([f"i{n}" for n in range(len(self.item_vector))], dtype=object)
        self._user_index = pd.Index(self.user_ids)
        self._item_index = pd.Index(self.item_ids)
        self._category32 = self.item_category.astype(np.int32)  # halves the oracle's compares

    # ----------------------------------------------------------------- tables
    def generate(self) -> ReadResult:
        """The interaction and item tables; the same every call for a given seed."""
        items, block_of = self._sample_histories(np.random.default_rng(self._history_seed))
        rng = np.random.default_rng(self._rating_seed)
        lengths = self.user_length
        user = np.repeat(np.arange(len(lengths)), lengths)
        affinity = np.einsum("nd,nd->n", self.block_taste[block_of], self.item_vector[items])
        affinity += self.item_quality[items]
        # Standardised over the log, so the rating mix (~60% > 3, ~14% < 3) holds at any
        # scale; rating_noise is the noise-to-signal ratio.
        z = (affinity - affinity.mean()) / max(affinity.std(), 1e-12)
        noise = self.cfg.rating_noise
        signal = (z + noise * rng.normal(size=len(z))) / np.sqrt(1.0 + noise**2)
        rating = np.clip(np.rint(RATING_MEAN + RATING_SPREAD * signal), 1.0, 5.0)

        start = EPOCH_START + rng.integers(0, ACTIVE_DAYS * 86_400, size=len(lengths))
        gaps = 1 + np.floor(rng.lognormal(np.log(GAP_MEDIAN_S), GAP_SIGMA, size=len(user)))
        stamp = np.repeat(start, lengths) + _segment_cumsum(gaps.astype(np.int64), lengths)

        order = np.lexsort((user, stamp))  # one log, users interleaved in time
        columns = (self.user_ids[user[order]], self.item_ids[items[order]], rating[order], stamp[order])
        interactions = canonical_interactions(pd.DataFrame(dict(zip(INTERACTION_COLUMNS, columns))))
        items_table = pd.DataFrame({"item_id": self.item_ids, "categories": [[f"c{c}"] for c in self.item_category]})
        items_table["brand"] = items_table["title"] = None
        return ReadResult(interactions, items_table, Rejects(), (1.0, 5.0), [])

    def _sample_histories(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Each user's items in time order (flat, users end to end) and the block each
        came from. A block is one visit: the taste is fixed and items are drawn in order
        without replacement from softmax(taste . item + exponent x log pop) over unseen
        items; with `visit_satiation`, each weight times (1 - satiation)^(items of its
        category already drawn in the visit): the discount page_utility applies to a page,
        so the logs carry the satiation the judge rewards."""
        lengths = self.user_length
        n_blocks = -(-lengths // BLOCK)
        block_start = np.cumsum(n_blocks) - n_blocks
        user_start = np.cumsum(lengths) - lengths
        items = np.empty(lengths.sum(), dtype=np.int64)
        block_of = np.empty(lengths.sum(), dtype=np.int64)
        # One product gives taste . item + prior: the prior rides on a constant 1 column.
        # Padding columns (prior -inf: never drawn) make the width a multiple of GROUP.
        table = np.vstack([self.item_vector.T, self.cfg.popularity_exponent * self.item_log_pop])
        table = np.pad(table, ((0, 0), (0, -table.shape[1] % GROUP)))
        table[-1, len(self.item_log_pop) :] = -np.inf
        table = table.astype(np.float32)
        tastes = np.hstack([self.block_taste, np.ones((len(self.block_taste), 1))]).astype(np.float32)
        n_items = table.shape[1]
        category = np.pad(self.item_category, (0, n_items - len(self.item_category)))  # padding: never drawn
        # Satiation 1 (a repeat worth nothing) as a weight of 1e-9, not 0: a visit longer than
        # the number of categories must still draw something. Without visit_satiation the
        # sampler is the plain one, draw for draw (the same worlds as before the option).
        satiation = self.cfg.satiation if self.cfg.visit_satiation else 0.0
        log_keep = np.float32(np.log1p(-min(satiation, 1.0 - 1e-9)))
        chunk = int(np.clip(CHUNK_ELEMENTS // n_items, 64, 4096))
        for lo in range(0, len(lengths), chunk):
            users = np.arange(lo, min(lo + chunk, len(lengths)))
            seen = np.zeros((len(users), n_items), dtype=bool)
            for b in range(int(n_blocks[users].max())):
                rows = np.flatnonzero(n_blocks[users] > b)
                blocks = block_start[users[rows]] + b
                # einsum, not BLAS: with 9 inner terms threaded BLAS only adds contention.
                score = np.einsum("bd,di->bi", tastes[blocks], table)
                picks = _draw_without_replacement(rng, score, seen[rows], self.block_steps[blocks], category, log_keep)
                r, c = np.nonzero(picks >= 0)
                where = user_start[users[rows]][r] + b * BLOCK + c
                items[where] = picks[r, c]
                block_of[where] = blocks[r]
                seen[rows[r], picks[r, c]] = True
        return items, block_of

    # ----------------------------------------------------------------- truth
    def _user_rows(self, user_ids: Sequence[str]) -> np.ndarray:
        rows = self._user_index.get_indexer(pd.Index(list(user_ids), dtype=object))
        if (rows < 0).any():
            bad = [u for u, r in zip(user_ids, rows) if r < 0][:5]
            raise ValueError(f"{int((rows < 0).sum())} user id(s) not in the simulator, e.g. {bad}")
        return rows

    def _page_matrix(self, pages: Sequence[Sequence[str]]) -> np.ndarray:
        """Item indices, -1 for unknown ids and for padding of shorter pages."""
        lengths = np.array([len(p) for p in pages], dtype=np.int64)
        flat = [str(x) for p in pages for x in p]
        out = np.full((len(pages), int(lengths.max(initial=0))), -1, dtype=np.int64)
        if flat:
            col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out[np.repeat(np.arange(len(pages)), lengths), col] = self._item_rows(flat)
        return out

    def _item_rows(self, item_ids: list[str]) -> np.ndarray:
        return self._item_index.get_indexer(pd.Index(item_ids, dtype=object))

    def _click_prob(self, rows: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """P(click) before satiation: user rows x all items, or per (row, item) pairs."""
        taste = self.user_taste[rows]
        if items is None:
            logit = np.einsum("ud,id->ui", taste, self.item_vector) + self.item_quality
            return sigmoid(logit - self.click_bias)
        vec = self.item_vector[items]
        logit = np.einsum("ud,ukd->uk", taste, vec) + self.item_quality[items] - self.click_bias
        return sigmoid(logit)

    def page_utility(self, user_ids: Sequence[str], pages: Sequence[Sequence[str]]) -> np.ndarray:
        """Expected clicks of each page for its user. Unknown and repeated items are worth 0
        (a repeat still satiates its category: the user saw it again)."""
        if len(user_ids) != len(pages):
            raise ValueError(f"{len(user_ids)} users but {len(pages)} pages")
        rows = self._user_rows(user_ids)
        idx = self._page_matrix(pages)
        if idx.size == 0:
            return np.zeros(len(rows))
        known = idx >= 0
        safe = np.where(known, idx, 0)
        cat = np.where(known, self.item_category[safe], -1)
        earlier = np.tril(np.ones((idx.shape[1],) * 2, dtype=bool), -1)  # [k, j]: j before k
        same_cat = (cat[:, :, None] == cat[:, None, :]) & earlier & known[:, None, :]
        repeat = ((idx[:, :, None] == idx[:, None, :]) & earlier).any(axis=2)
        worth = self._click_prob(rows, safe) * (1.0 - self.cfg.satiation) ** same_cat.sum(axis=2)
        worth *= known & ~repeat
        return worth @ examination(idx.shape[1])

    def oracle_page(
        self, user_ids: Sequence[str], k: int, exclude: Sequence[set[str]] | None = None
    ) -> list[list[str]]:
        """Greedy page: each position takes the item with the largest marginal utility
        given the earlier picks, skipping excluded ids. Shorter only if items run out."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(user_ids):
            raise ValueError(f"{len(user_ids)} users but {len(exclude)} exclusion sets")
        rows = self._user_rows(user_ids)
        chunk = int(np.clip(CHUNK_ELEMENTS // len(self.item_ids), 64, CHUNK))
        pages: list[list[str]] = []
        for lo in range(0, len(rows), chunk):
            part = rows[lo : lo + chunk]
            prob = self._click_prob(part)
            banned = np.zeros(prob.shape, dtype=bool)
            if exclude is not None:
                sets = [list(s) for s in exclude[lo : lo + chunk]]
                flat = [str(x) for s in sets for x in s]
                if flat:
                    cols = self._item_rows(flat)
                    r = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
                    banned[r[cols >= 0], cols[cols >= 0]] = True
            picks = self._greedy(prob, banned, k)
            pages.extend([self.item_ids[p[p >= 0]].tolist() for p in picks])
        return pages

    def _greedy(self, prob: np.ndarray, banned: np.ndarray, k: int) -> np.ndarray:
        # The examination weight of a position is common to every candidate, so the
        # marginal gain ranks by P(click) x (1 - satiation)^(earlier picks of its category);
        # a pick only discounts its own category, so gains are updated in place.
        n = np.arange(len(prob))
        gain = np.where(banned, -1.0, prob)
        picks = np.full((len(prob), k), -1, dtype=np.int64)
        for pos in range(min(k, prob.shape[1])):
            best = gain.argmax(axis=1)
            ok = gain[n, best] >= 0
            picks[ok, pos] = best[ok]
            gain[n, best] = -1.0
            same = self._category32 == self._category32[best][:, None]
            same &= gain > 0
            np.multiply(gain, 1.0 - self.cfg.satiation, out=gain, where=same)
        return picks

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the true state to `path/` (state.npz + simulator.json)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path / "state.npz", **{n: getattr(self, n) for n in _ITEM_ARRAYS + _USER_ARRAYS})
        meta = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "config": self.cfg.model_dump(mode="json"),
            "click_bias": self.click_bias,
            "history_seed": self._history_seed,
            "rating_seed": self._rating_seed,
        }
        (path / "simulator.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Simulator":
        path = Path(path)
        meta_file, state_file = path / "simulator.json", path / "state.npz"
        if not meta_file.exists() or not state_file.exists():
            raise FileNotFoundError(f"no saved simulator in {path} (need simulator.json and state.npz)")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"{meta_file}: state version {meta.get('version')}, expected {STATE_VERSION}")
        sim = cls.__new__(cls)
        sim.cfg = SimulatorConfig.model_validate(meta["config"])
        sim.seed = int(meta["seed"])
        sim.click_bias = float(meta["click_bias"])
        sim._history_seed, sim._rating_seed = int(meta["history_seed"]), int(meta["rating_seed"])
        with np.load(state_file) as state:
            for name in _ITEM_ARRAYS + _USER_ARRAYS:
                setattr(sim, name, state[name])
        sim._index()
        return sim
