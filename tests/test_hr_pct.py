"""HR@k% inside the evaluation (pagellm/eval/runner.py): random pages valued by the judge,
each model's page ranked against them. A small simulator world, no Ray, no policy."""

from __future__ import annotations

import numpy as np
import pytest

from pagellm.config import SimulatorConfig
from pagellm.data.simulator import Simulator
from pagellm.eval.metrics import random_pages
from pagellm.eval.runner import EvalSet, ModelOutput, hr_pct, random_page_values, sasrec_judge, simulator_judge

USERS, ITEMS, K = 30, 60, 5


@pytest.fixture(scope="module")
def world():
    sim = Simulator(SimulatorConfig(users=USERS, items=ITEMS, categories=4), seed=0)
    item_ids, user_ids = sim.item_ids.tolist(), sim.user_ids.tolist()
    rng = np.random.default_rng(0)
    exclude = [set(rng.choice(ITEMS, 8, replace=False).tolist()) for _ in range(USERS)]
    es = EvalSet(user_index=np.arange(USERS), prompts=[], histories=[[] for _ in range(USERS)], train_sequences=[],
                 exclude=exclude, targets=[], n_items=ITEMS, cats_of={}, popularity=np.ones(ITEMS))
    position = {raw: n for n, raw in enumerate(item_ids)}
    oracle = sim.oracle_page(user_ids, K, [{item_ids[i] for i in s} for s in exclude])
    sim_ctx = (sim, item_ids, user_ids, None, [[position[i] for i in p] for p in oracle])
    return sim, es, sim_ctx


def test_the_simulator_judge_values_random_pages_as_the_simulator_does(world):
    sim, es, sim_ctx = world
    judge = simulator_judge(sim_ctx, es)
    values = random_page_values(judge, es, K, 200, seed=1)
    assert values.shape == (USERS, 200)
    assert np.array_equal(values, random_page_values(judge, es, K, 200, seed=1))  # seeded
    # Redraw user 3's pages from the same stream and ask the simulator directly.
    rng = np.random.default_rng(1)
    pages = [random_pages(rng, ITEMS, es.exclude[u], 200, K) for u in range(4)][3]
    truth = sim.page_utility([sim_ctx[2][3]] * 200, [[sim_ctx[1][i] for i in p] for p in pages])
    assert values[3] == pytest.approx(truth, abs=1e-12)


def test_the_oracle_page_beats_random_pages_and_a_bad_page_does_not(world):
    sim, es, sim_ctx = world
    judge = simulator_judge(sim_ctx, es)
    reference = random_page_values(judge, es, K, 200, seed=1)
    assert hr_pct(judge, reference, sim_ctx[4], K)["hr@1%"] >= 0.9
    single = sim.page_utility(np.repeat(sim_ctx[2], ITEMS).tolist(), [[i] for i in sim_ctx[1]] * USERS)
    single = single.reshape(USERS, ITEMS)  # each item's utility alone, per user
    worst = [sorted(set(range(ITEMS)) - s, key=lambda i: single[u, i])[:K] for u, s in enumerate(es.exclude)]
    assert hr_pct(judge, reference, worst, K)["hr@10%"] <= 0.2


def test_the_sasrec_judge_ranks_pages_by_expected_relevance(world):
    _, es, _ = world
    logits = np.tile(np.linspace(0.0, 3.0, ITEMS), (USERS, 1))  # higher index, more relevant
    judge = sasrec_judge(ModelOutput(lists=[], scores=lambda a, b: logits[a:b], seconds=0.0))
    reference = random_page_values(judge, es, K, 100, seed=0)
    best = [sorted(set(range(ITEMS)) - s, reverse=True)[:K] for s in es.exclude]
    assert hr_pct(judge, reference, best, K) == {"hr@1%": 1.0, "hr@10%": 1.0}
    assert hr_pct(judge, reference, [p[::-1] for p in best], K)["hr@1%"] == 1.0  # same items, worse order: still far above random
    assert hr_pct(judge, reference, [[0, 1]] * USERS, K) == {"hr@1%": 0.0, "hr@10%": 0.0}  # short, irrelevant


def test_the_report_names_the_judge():
    from pagellm.eval.report import hr_pct_section

    result = {"hr_pct_judge": "sasrec", "hr_pct_pages": 1000, "page_len": 10,
              "models": {"sasrec": {}, "sft": {"hr@1%": 0.25, "hr@10%": 0.5}}}
    text = "\n".join(hr_pct_section(result))
    assert "1,000 random pages" in text and "SASRec itself is therefore not ranked" in text
    assert "| sft | 0.2500 | 0.5000 |" in text and "| sasrec | – | – |" in text
    assert hr_pct_section({"models": {}}) == []
