"""The simulator is the ground truth for page quality, so its tables must look like a
real log and its utility must reward what a good recommender does (personalise, rank
the best first, diversify) while leaving popularity a beatable but honest baseline."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from pagellm.config import SimulatorConfig
from pagellm.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS
from pagellm.data.simulator import BLOCK, Simulator, examination

SMALL = SimulatorConfig(users=300, items=200)


@pytest.fixture(scope="module")
def world():
    sim = Simulator(SMALL, seed=3)
    result = sim.generate()
    df = result.interactions
    history = df.groupby("user_id")["item_id"].agg(set)
    users = sim.user_ids.tolist()
    return sim, result, users, [history[u] for u in users]


def _popularity_pages(df: pd.DataFrame, seen: list[set[str]], k: int = 10) -> list[list[str]]:
    ranked = df["item_id"].value_counts().index.tolist()
    return [[i for i in ranked if i not in s][:k] for s in seen]


def test_tables_follow_the_canonical_schema(world):
    sim, result, _, _ = world
    df, items = result.interactions, result.items
    assert list(df.columns) == INTERACTION_COLUMNS and list(items.columns) == ITEM_COLUMNS
    assert df["rating"].dtype == np.float64 and df["timestamp"].dtype == np.int64
    assert df["user_id"].str.fullmatch(r"u\d+").all() and df["item_id"].str.fullmatch(r"i\d+").all()
    assert set(df["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(items) == SMALL.items and set(df["item_id"]) <= set(items["item_id"])
    assert all(len(c) == 1 and c[0].startswith("c") for c in items["categories"])
    assert items["brand"].isna().all() and items["title"].isna().all()
    assert len(result.rejects) == 0 and result.rating_scale == (1.0, 5.0) and result.notes == []


def test_timestamps_increase_per_user_and_interleave(world):
    _, result, _, _ = world
    df = result.interactions
    assert df.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing and t.is_unique).all()
    assert df["timestamp"].is_monotonic_increasing  # one log in time order ...
    switches = (df["user_id"] != df["user_id"].shift()).sum()
    assert switches > 0.5 * len(df)  # ... where users take turns, not one block per user


def test_histories_never_repeat_items_and_vary_in_length(world):
    _, result, _, _ = world
    df = result.interactions
    assert not df.duplicated(["user_id", "item_id"]).any()
    lengths = df.groupby("user_id").size()
    assert len(lengths) == SMALL.users and lengths.min() >= 10
    assert abs(lengths.mean() - SMALL.interactions_per_user) < 0.15 * SMALL.interactions_per_user
    assert lengths.std() > 5


def test_rating_shares_leave_room_for_positives_and_negatives(world):
    df = world[1].interactions
    assert 0.55 <= (df["rating"] > 3).mean() <= 0.70
    assert (df["rating"] < 3).mean() >= 0.08


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = (Simulator(SMALL, seed=s).generate() for s in (7, 7, 8))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)


def test_save_load_round_trip_keeps_the_truth(world, tmp_path):
    sim, result, users, seen = world
    pages = sim.oracle_page(users, 10, seen)
    sim.save(tmp_path / "sim")
    back = Simulator.load(tmp_path / "sim")
    assert np.array_equal(back.page_utility(users, pages), sim.page_utility(users, pages))
    assert back.oracle_page(users, 10, seen) == pages
    pd.testing.assert_frame_equal(back.generate().interactions, result.interactions)
    with pytest.raises(FileNotFoundError, match="no saved simulator"):
        Simulator.load(tmp_path / "nothing")


def test_unknown_items_are_worth_nothing_and_never_fail(world):
    sim, _, users, _ = world
    u = users[:1]
    assert sim.page_utility(u, [["nope", "i999999", None, 5]])[0] == 0.0
    alone = sim.page_utility(u, [["i0"]])[0]
    behind = sim.page_utility(u, [["zzz", "i0"]])[0]
    assert alone > 0 and behind == pytest.approx(alone * examination(2)[1] / examination(2)[0])
    assert sim.page_utility(u, [[]])[0] == 0.0
    # Invalid pages longer than the catalogue are scored, not rejected.
    assert sim.page_utility(u, [["i0"] * 500])[0] == pytest.approx(alone)
    # A repeated item adds nothing the second time.
    assert sim.page_utility(u, [["i0", "i0"]])[0] == pytest.approx(alone)
    with pytest.raises(ValueError, match="not in the simulator"):
        sim.page_utility(["ghost"], [["i0"]])


def test_satiation_penalises_pages_of_one_category():
    # Every item equally relevant to everyone: only the category mix can differ.
    sim = Simulator(SimulatorConfig(users=5, items=200, categories=12, satiation=0.5), seed=0)
    sim.item_vector[:] = 0.0
    sim.item_quality[:] = 0.0
    p = 1.0 / (1.0 + np.exp(sim.click_bias))
    cats = sim.item_category
    one_cat = [f"i{i}" for i in np.flatnonzero(cats == 0)[:10]]
    spread = [f"i{np.flatnonzero(cats == c)[0]}" for c in range(10)]
    same, diverse = sim.page_utility(["u0", "u0"], [one_cat, spread])
    w = examination(10)
    assert diverse == pytest.approx(p * w.sum())
    assert same == pytest.approx(p * (w * 0.5 ** np.arange(10)).sum())
    assert same < 0.5 * diverse


def test_logs_show_the_satiation_the_utility_applies():
    """With visit_satiation a visit's items are drawn with the page's category discount, so the next item repeats
    the previous one's category less often the more a repeat satiates: a stage can read it
    off the logs (page_prior.satiation_from_logs) instead of the judge."""
    def repeat_rate(satiation: float) -> float:
        sim = Simulator(SimulatorConfig(users=300, items=200, satiation=satiation, visit_satiation=True), seed=2)
        df = sim.generate().interactions.sort_values(["user_id", "timestamp"])
        cat = sim.item_category[df["item_id"].str[1:].astype(int).to_numpy()]
        same_user = df["user_id"].to_numpy()[1:] == df["user_id"].to_numpy()[:-1]
        return float((cat[1:] == cat[:-1])[same_user].mean())

    none, half, full = repeat_rate(0.0), repeat_rate(0.5), repeat_rate(1.0)
    assert half < 0.7 * none and full < 0.25 * none  # across visits a repeat is still free


def test_without_visit_satiation_histories_ignore_it_draw_for_draw():
    # The option off is the world every earlier number was measured in: the same histories
    # whatever the satiation, which then only enters the utility.
    def log(**kw) -> pd.DataFrame:
        return Simulator(SimulatorConfig(users=80, items=100, **kw), seed=5).generate().interactions

    plain = log(satiation=0.0)
    pd.testing.assert_frame_equal(plain, log(satiation=0.5))
    pd.testing.assert_frame_equal(plain, log(satiation=0.0, visit_satiation=True))  # nothing to discount
    assert not log(satiation=0.5, visit_satiation=True).equals(plain)


def test_position_bias_rewards_the_best_item_first(world):
    sim, _, users, seen = world
    pages = sim.oracle_page(users, 10, seen)
    best_last = [p[1:] + p[:1] for p in pages]
    first, last = sim.page_utility(users, pages), sim.page_utility(users, best_last)
    assert (first >= last - 1e-12).all() and first.mean() > 1.05 * last.mean()


def test_oracle_is_distinct_honours_exclusions_and_beats_any_shuffle(world):
    sim, _, users, seen = world
    pages = sim.oracle_page(users, 10, seen)
    assert all(len(p) == 10 == len(set(p)) and not (set(p) & s) for p, s in zip(pages, seen))
    rng = np.random.default_rng(0)
    shuffled = [list(rng.permutation(p)) for p in pages]
    assert (sim.page_utility(users, pages) >= sim.page_utility(users, shuffled) - 1e-12).all()
    # More pages than items left: the page is shorter, never padded with excluded items.
    everything = set(sim.item_ids) - {"i1", "i2"}
    assert sorted(sim.oracle_page(["u0"], 5, [everything])[0]) == ["i1", "i2"]


def test_popularity_is_an_honest_but_beatable_baseline(world):
    sim, result, users, seen = world
    rng = np.random.default_rng(1)
    random_pages = [
        list(rng.choice([i for i in sim.item_ids if i not in s], 10, replace=False)) for s in seen
    ]
    affinity = sim.user_taste @ sim.item_vector.T + sim.item_quality
    taste_pages = [
        [sim.item_ids[j] for j in np.argsort(-affinity[n]) if sim.item_ids[j] not in s][:10]
        for n, s in enumerate(seen)
    ]
    popular = sim.page_utility(users, _popularity_pages(result.interactions, seen)).mean()
    rand = sim.page_utility(users, random_pages).mean()
    taste = sim.page_utility(users, taste_pages).mean()
    oracle = sim.page_utility(users, sim.oracle_page(users, 10, seen)).mean()
    assert popular > 0.2 and popular > 1.5 * rand  # popularity carries real signal
    assert oracle > 1.5 * popular  # ... and leaves a lot to win
    assert taste > 1.2 * popular  # personalisation is what wins it
    assert oracle >= taste


def test_drift_pulls_late_history_towards_the_current_taste():
    sim = Simulator(SimulatorConfig(users=400, items=300, taste_drift=0.3), seed=1)
    df = sim.generate().interactions
    n_blocks = -(-sim.user_length // BLOCK)
    initial = sim.block_taste[np.cumsum(n_blocks) - n_blocks]
    u = df["user_id"].str[1:].astype(int).to_numpy()
    i = df["item_id"].str[1:].astype(int).to_numpy()
    shift = np.einsum("nd,nd->n", sim.user_taste[u] - initial[u], sim.item_vector[i])
    when = df.groupby("user_id")["timestamp"].rank(pct=True).to_numpy()
    assert shift[when > 0.8].mean() > shift[when <= 0.2].mean() + 0.2
    still = Simulator(SimulatorConfig(users=50, items=100, taste_drift=0.0), seed=1)
    first = np.cumsum(-(-still.user_length // BLOCK)) - (-(-still.user_length // BLOCK))
    assert np.allclose(still.user_taste, still.block_taste[first])


def test_speed_is_vectorised():
    start = time.process_time()
    sim = Simulator(SimulatorConfig(users=2500, items=1000), seed=0)
    n = len(sim.generate().interactions)
    assert n > 80_000 and time.process_time() - start < 4.0
    users = sim.user_ids[:1000].tolist()
    start = time.process_time()
    pages = sim.oracle_page(users, 10, None)
    sim.page_utility(users, pages)
    assert time.process_time() - start < 2.0


def test_sampler_keeps_history_length_when_weights_underflow():
    from pagellm.data.simulator import _draw_without_replacement

    # One item holds all the float32 mass; the others still have to come out, unseen first.
    score = np.array([[0.0, -200.0, -300.0, -250.0, -400.0]], dtype=np.float32)
    seen = np.array([[False, False, False, False, True]])
    picks = _draw_without_replacement(np.random.default_rng(0), score, seen, np.array([4]))
    assert picks.tolist() == [[0, 1, 3, 2]]


def test_sampler_matches_sequential_softmax_without_replacement():
    from pagellm.data.simulator import _draw_without_replacement

    rng = np.random.default_rng(0)
    base = rng.normal(size=70).astype(np.float32) * 1.5
    n = 40_000
    seen = np.zeros((n, 70), dtype=bool)
    seen[:, 5] = True  # never drawn; the rest renormalise
    picks = _draw_without_replacement(rng, np.tile(base, (n, 1)), seen, np.full(n, 2))
    p = np.exp(base - base.max())
    p[5] = 0.0
    p /= p.sum()
    first = np.bincount(picks[:, 0], minlength=70) / n
    assert np.abs(first - p).max() < 4 * np.sqrt(p.max() / n) and first[5] == 0
    a = int(np.argmax(p))  # second draw given the heaviest came first: p / (1 - p_a)
    second = np.bincount(picks[picks[:, 0] == a, 1], minlength=70) / (picks[:, 0] == a).sum()
    expected = np.where(np.arange(70) == a, 0.0, p / (1 - p[a]))
    assert np.abs(second - expected).max() < 0.03 and (picks[:, 0] != picks[:, 1]).all()
