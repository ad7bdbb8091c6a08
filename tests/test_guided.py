"""stage3.algorithm guided: the validation rule that picks the repeat penalty, and a real stage
run whose published policy carries it (eval, KL and serve decode it from the layout)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from run_template import untrained_run
from served_page import assert_serves_its_stage3_policy

from pagellm.config import load_config
from pagellm.models.page_prior import PagePrior, standardise
from pagellm.models.policy import load_policy
from pagellm.train.guided import choose_penalty, run_guided_stage
from pagellm.vocab import PromptEncoder

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "stage3.algorithm=guided", "guided.val_users=8"]
QUIET = dict(log=lambda *_: None)


def test_the_largest_penalty_within_the_margin_is_chosen_and_the_search_stops_at_the_first_miss():
    sft = {"ndcg@10": np.array([0.5, 0.5, 0.5, 0.5])}
    cands = [{"ndcg@10": sft["ndcg@10"] + d} for d in (0.0, -0.004, -0.02, -0.001)]
    # Penalties given out of order: 0.5 (no change), 1 (-0.8 %), 2 (-4 %), 4 (-0.2 %, after the miss).
    chosen, records = choose_penalty([0.5, 1.0, 2.0, 4.0], sft, cands, margin=0.01)
    assert chosen == 1  # 4 would pass alone, but 2 failed before it: a later pass is noise
    assert [r["passes"] for r in records] == [True, True, False, True]
    assert records[1]["ndcg@10_change"] == pytest.approx(-0.004)
    shuffled, _ = choose_penalty([4.0, 2.0, 1.0, 0.5], sft, cands[::-1], margin=0.01)
    assert shuffled == 2  # the same penalty, 1.0, wherever it sits in the list
    assert choose_penalty([0.5], sft, [{"ndcg@10": sft["ndcg@10"] - 0.1}], margin=0.01)[0] == -1


def test_a_change_validation_cannot_tell_from_a_loss_beyond_the_margin_is_refused():
    # Mean change -0.5 % of the SFT mean (inside a 1 % margin) but spread over users: its
    # standard error (0.006) puts the change 1 se down at -1.7 %, beyond the margin.
    sft = {"ndcg@10": np.full(4, 0.5)}
    noisy = {"ndcg@10": sft["ndcg@10"] + np.array([-0.0025, 0.0075 * 2 - 0.0025, -0.0025, -0.0075 * 2 - 0.0025])}
    se = noisy["ndcg@10"].std(ddof=1) / 2
    assert se == pytest.approx(np.std([0, 0.015, 0, -0.015], ddof=1) / 2)
    chosen, records = choose_penalty([1.0], sft, [noisy], margin=0.01, standard_errors=1.0)
    assert chosen == -1 and records[0]["ndcg@10_change"] == pytest.approx(-0.0025)
    assert records[0]["ndcg@10_change_se"] == pytest.approx(se)
    assert choose_penalty([1.0], sft, [noisy], margin=0.01, standard_errors=0.0)[0] == 0  # the point estimate passes


def test_every_guarded_metric_must_hold():
    sft = {"ndcg@10": np.full(3, 0.4), "ndcg@100": np.full(3, 0.6)}
    cands = [{"ndcg@10": np.full(3, 0.41), "ndcg@100": np.full(3, 0.5)}]
    chosen, records = choose_penalty([1.0], sft, cands, margin=0.05)
    assert chosen == -1 and not records[0]["passes"]


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    """A run folder with data and an (untrained) SFT policy."""
    return untrained_run(tmp_path_factory.mktemp("guided") / "run", SMALL)


def with_prior(run_dir, satiation: float):
    items = pd.read_parquet(run_dir / "data" / "items.parquet").sort_values("index")
    (run_dir / "reward").mkdir(exist_ok=True)
    PagePrior(1.0, 0.5, satiation, standardise(items["score"].to_numpy(dtype=np.float64)).tolist()).save(run_dir / "reward")
    return items["cat_index"].to_numpy()


def test_guided_stage_publishes_the_sft_weights_with_the_chosen_penalty_in_the_layout(run_template, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    # hr@40 of a 40-item catalogue: every list holds every allowed item, so no penalty can
    # lose accuracy and the largest one is published.
    cfg = load_config(None, SMALL + ["guided.penalties=[1000, 0.5]", "guided.guard=[hr@40]"])
    with pytest.raises(FileNotFoundError, match="no page prior"):
        run_guided_stage(cfg, run_dir, **QUIET)
    cats = with_prior(run_dir, satiation=0.4)
    lines: list[str] = []
    selection = run_guided_stage(cfg, run_dir, log=lines.append)
    out = run_dir / "guided"
    assert selection["repeat_penalty"] == 1000 and selection["published_step"] == 2
    assert json.loads((out / "DONE").read_text())["published_step"] == 2
    saved = json.loads((out / "selection.json").read_text())
    assert sorted(r["penalty"] for r in saved["history"]) == [0.5, 1000] and all(r["passes"] for r in saved["history"])
    assert any("published repeat penalty 1000" in line for line in lines)
    guided_w, sft_w = load_file(out / "model.safetensors"), load_file(run_dir / "sft" / "model.safetensors")
    assert all(torch.equal(guided_w[k], sft_w[k]) for k in sft_w)  # no weight moved

    policy, tok, layout = load_policy(out, trainable=False)
    assert (layout.repeat_penalty, layout.penalty_positions) == (1000, cfg.data.page_len)
    assert layout.item_category == [int(c) for c in cats]
    from pagellm.models.decoding import generate_pages

    encoder = PromptEncoder(tok, layout)
    pages = generate_pages(policy, layout, [encoder.encode_prompt(u, [u]) for u in range(6)], k=4).items
    n_cats = len(set(int(c) for c in cats if c >= 0))
    for page in pages:  # as many distinct categories as the catalogue allows
        assert len({int(cats[i]) for i in page}) == min(4, n_cats)
    assert_serves_its_stage3_policy(run_dir, cfg, "guided")


def test_a_prior_without_a_category_discount_publishes_the_sft_policy_as_it_is(run_template, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    with_prior(run_dir, satiation=0.0)
    lines: list[str] = []
    selection = run_guided_stage(load_config(None, SMALL), run_dir, log=lines.append)
    assert selection["published_step"] == 0 and "c = 0" in selection["reason"]
    assert load_policy(run_dir / "guided", trainable=False)[2].repeat_penalty == 0.0
    assert any("as it is" in line for line in lines)
