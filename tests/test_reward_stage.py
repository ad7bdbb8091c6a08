"""Reward stage: user split, early stopping, held-out metrics, and `pagellm reward` end to end
on a 60-user simulator run (Ray Train, 1 worker, untrained tiny SFT policy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pagellm.train.harness import patience_exhausted
from pagellm.train.reward import heldout_metrics, user_in_validation

SMALL = ["data.simulator.users=60", "data.simulator.items=80", "data.simulator.categories=5",
         "data.simulator.interactions_per_user=30", "data.sft_windows=2",
         "model.init={n_layer: 1, n_embd: 16, n_head: 2, n_positions: 96}",
         "reward.epochs=2", "reward.batch_size=16", "reward.lr=3e-3", "reward.val_fraction=0.25", "reward.log_every=50",
         "reward.onpolicy_samples=0"]  # the data pairs alone here; the on-policy test sets its own S
METRIC_KEYS = {"pair_accuracy", "score_variance", "val_loglik", "pairs", "epochs_run"}


def test_user_split_is_seeded_by_user_and_about_the_fraction():
    users = np.repeat(np.arange(2000), 3)
    val = user_in_validation(users, 0.1, seed=0)
    per_user = val.reshape(-1, 3)
    assert (per_user == per_user[:, :1]).all()  # a user's pairs all fall on one side
    assert 0.08 < per_user[:, 0].mean() < 0.12
    shuffled = np.random.default_rng(1).permutation(users)
    assert (user_in_validation(shuffled, 0.1, 0) == np.isin(shuffled, users[val])).all()  # order-free
    assert (user_in_validation(users, 0.1, seed=1) != val).any()


def test_should_stop_after_patience_epochs_without_a_better_loglik():
    hist = [{"val_loglik": v} for v in (-0.6, -0.5, -0.55)]
    assert not patience_exhausted(hist, "val_loglik", patience=2)
    assert patience_exhausted(hist + [{"val_loglik": -0.51}], "val_loglik", patience=2)
    assert not patience_exhausted(hist + [{"val_loglik": -0.4}], "val_loglik", patience=2)
    assert not patience_exhausted([{"train_loss": 1.0}], "val_loglik", patience=1)  # no validation: never stops


def test_heldout_metrics_per_head_and_a_disabled_head():
    chosen = (np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 0.0]))
    rejected = (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0]))
    m = heldout_metrics({"heads": ["coarse"], "chosen": chosen, "rejected": rejected},
                        ["ranking", "ranking", "diversity"])
    assert m["pair_accuracy"]["coarse"] == {"ranking": 0.5, "diversity": 1.0}
    assert m["pair_accuracy_all"]["coarse"] == pytest.approx(2 / 3)
    assert m["pair_accuracy"]["fine"] == {"ranking": None, "diversity": None}
    assert m["score_variance"]["fine"] is None and m["pair_accuracy_all"]["fine"] is None
    assert m["pair_accuracy"]["sum"] == m["pair_accuracy"]["coarse"]
    assert m["score_variance"]["coarse"] == pytest.approx(np.var([1, 0, 2, 0, 1, 0]))
    # log σ(1), log σ(-1), log σ(2)
    assert m["val_loglik"] == pytest.approx(np.mean([-math.log1p(math.exp(-d)) for d in (1, -1, 2)]))


@pytest.fixture(scope="module")
def reward_run(ray_local, tmp_path_factory):
    from jobs import reward as reward_job
    from pagellm.data.pipeline import run_data_stage
    from pagellm.models.policy import build_policy, save_policy
    from pagellm.runfolder import resolve_run
    from pagellm.vocab import Vocab

    folder, cfg = resolve_run(tmp_path_factory.mktemp("reward") / "run", None, SMALL)
    run_data_stage(cfg, folder.data, log=lambda *_: None)
    vocab = Vocab.from_parquet(folder.data / "vocab.parquet")
    save_policy(*build_policy(cfg.model, vocab, seed=cfg.seed), folder.sft)  # untrained: enough here
    reward_job.main(["--run", str(folder.root)])
    return folder, cfg


def test_reward_stage_writes_checkpoint_and_metrics(reward_run):
    from pagellm.models.reward_scorer import RewardScorer

    folder, cfg = reward_run
    out = folder.reward
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    pairs = pd.read_parquet(folder.data / "pairs.parquet")
    val = user_in_validation(pairs["user_index"], cfg.reward.val_fraction, cfg.seed)
    families = set(pairs.loc[val, "family"])
    assert families == set(pairs["family"])  # every family is held out for some user
    for head in ("coarse", "fine", "sum"):
        assert set(metrics["pair_accuracy"][head]) == families
        assert all(0.0 <= a <= 1.0 for a in metrics["pair_accuracy"][head].values())
        assert metrics["score_variance"][head] > 0
    assert metrics["pairs"]["train"] + metrics["pairs"]["val"] == len(pairs)
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert metrics["val_loglik"] > math.log(0.5)  # better than a coin on held-out users
    assert (out / "accuracy_by_family.png").stat().st_size > 1000
    assert "| family | pairs | R_c | R_f | R_c + R_f |" in (out / "report.md").read_text()

    # The stage held out exactly the pairs of the validation users (split by user).
    assert metrics["pairs"]["val"] == int(val.sum())
    assert metrics["val_pairs_by_family"] == pairs.loc[val, "family"].value_counts().to_dict()

    # The published folder alone is a working scorer, and it is the best epoch's model.
    scorer = RewardScorer.load(out)
    held = pairs[val]
    r_c, r_f = scorer.score(held["user_index"].tolist(), held["prompt"].tolist(), held["chosen"].tolist())
    assert np.isfinite(r_c).all() and np.isfinite(r_f).all() and r_f.std() > 0
    best = max(metrics["history"], key=lambda r: r["val_loglik"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["val_loglik"] == pytest.approx(best["val_loglik"], abs=1e-4)

    # The page prior was fitted on the same training users and judged on the held-out ones:
    # the pages that corrupt the golden one by disliked items or one category score lower.
    from pagellm.models.page_prior import PagePrior

    prior = PagePrior.load(out)
    fit = metrics["page_prior"]
    assert prior is not None and 0 < prior.satiation < 1 and len(prior.quality) == len(pd.read_parquet(
        folder.data / "items.parquet"))
    assert fit["train_pairs"] == metrics["pairs"]["train"] and fit["heldout_pairs"] == metrics["pairs"]["val"]
    assert fit["heldout_accuracy"]["preference"] > 0.8 and fit["heldout_accuracy"]["diversity"] > 0.8
    assert fit["satiation_source"] == "pairs" and "log_repeat_odds" not in fit
    # b from the training users' last training positives (the default), not the pairs
    assert fit["quality_source"] == "next_item" and fit["next_item_users"] > 0
    assert fit["next_item_loglik"] >= fit["next_item_loglik_without_quality"]  # b = 0 is a candidate
    assert "## Page prior" in (out / "report.md").read_text()


def test_training_categories_read_only_the_train_split_in_time_order(tmp_path):
    from pagellm.train.prior import training_categories

    (tmp_path / "data").mkdir()
    pd.DataFrame({
        "user_index": [0, 1],
        "train_items": [[0, 2, 1], [0, 3]],  # in the data stage's time order
        "val_items": [[], [1]],
        "test_items": [[3], [2]],
    }).to_parquet(tmp_path / "data" / "eval.parquet")
    item_cat = np.array([7, 8, -1, 9])  # item 2 has no category
    got = training_categories(tmp_path, item_cat)
    assert [g.tolist() for g in got] == [[7, 8], [7, 9]]  # user 0: items 0, 1 (2 uncategorised, 3 is test)


def test_a_prior_fitted_on_data_without_categories_holds_no_category_discount(tmp_path, monkeypatch):
    """No item has a category: no page repeats one, so c has nothing to fit; it is 0, not the
    fit's starting 0.5 (which the guided stage would read as a discount the data showed)."""
    import pagellm.train.prior as prior_mod
    from pagellm.models.page_prior import PagePrior

    (tmp_path / "data").mkdir()
    (tmp_path / "reward").mkdir()  # the reward stage has written its heads there first
    pd.DataFrame({"index": range(6), "score": [4.5, 4.0, 3.0, 2.5, 4.8, 3.3],
                  "cat_index": [-1] * 6}).to_parquet(tmp_path / "data" / "items.parquet")
    pairs = pd.DataFrame({"user_index": [0, 1, 2, 3], "family": ["preference"] * 4, "prompt": [[5]] * 4,
                          "chosen": [[0, 4], [4, 1], [0, 1], [4, 0]], "rejected": [[3, 2], [2, 5], [3, 5], [2, 3]]})
    # The SFT policy's preferences come from a Ray worker; here, none (all items alike).
    monkeypatch.setattr(prior_mod, "in_worker", lambda fn, *args: [np.zeros((4, 2)), np.zeros((4, 2))])
    stats = prior_mod.run_prior_fit(tmp_path, pairs, np.array([False, False, False, True]), "pairs", "pairs", 50,
                                    log=lambda *_: None)
    assert stats["satiation"] == 0.0 and stats["satiation_source"] == "no categories"
    assert PagePrior.load(tmp_path / "reward").satiation == 0.0
    assert stats["quality_weight"] > 0  # chosen pages hold the better-rated items


def test_the_quality_weight_reads_each_training_users_last_training_positive(tmp_path):
    from pagellm.train.prior import next_item_rows

    (tmp_path / "data").mkdir()
    pd.DataFrame({
        "user_index": [0, 1, 2, 3],
        "train_positives": [[4, 2, 7, 1], [5], [3, 6], [1, 2, 3]],
        "train_items": [[4, 9, 2, 7, 1], [5, 8], [3, 6], [1, 2, 3]],  # 9, 8: rated, not positive
        "val_items": [[3], [2], [1], [4]],
        "test_items": [[5], [3], [2], [6]],
    }).to_parquet(tmp_path / "data" / "eval.parquet")
    users, prompts, targets, seen = next_item_rows(tmp_path, history_len=2, skip_users={3})
    # user 1 has one positive (no step), user 3's pairs judge the prior: left out
    assert users == [0, 2] and targets == [1, 6]
    assert prompts == [[2, 7], [3]]  # the history_len positives before the target
    assert seen == [{4, 9, 2, 7}, {3}]  # the user's other training items; nothing held out
    assert next_item_rows(tmp_path, 2, set(), max_users=1)[0] in ([0], [2], [3])


def test_the_prior_holds_the_next_item_quality_weight_and_fits_the_discount(tmp_path, monkeypatch):
    import pagellm.train.prior as prior_mod
    from pagellm.models.page_prior import PagePrior

    (tmp_path / "data").mkdir()
    (tmp_path / "reward").mkdir()
    pd.DataFrame({"index": range(6), "score": [4.5, 4.0, 3.0, 2.5, 4.8, 3.3],
                  "cat_index": [0, 0, 1, 1, 2, 2]}).to_parquet(tmp_path / "data" / "items.parquet")
    pd.DataFrame({"user_index": [0, 1, 2, 3], "train_positives": [[0, 1, 2]] * 4, "train_items": [[0, 1, 2]] * 4,
                  "val_items": [[3]] * 4, "test_items": [[4]] * 4}).to_parquet(tmp_path / "data" / "eval.parquet")
    pairs = pd.DataFrame({"user_index": [0, 1, 2, 3], "family": ["diversity"] * 4, "prompt": [[5]] * 4,
                          "chosen": [[0, 2, 4]] * 4, "rejected": [[0, 1, 2]] * 4})
    calls = []

    def worker(fn, *args):  # the SFT policy's forwards run in Ray workers; here, canned answers
        calls.append(fn.__name__)
        if fn.__name__ == "next_item_quality_weight":
            assert args[1] == [0, 1, 2]  # user 3's pairs are held out: not in the fit
            return {"quality_weight": 0.3, "users": 3, "loglik": -1.0, "loglik_without": -1.2}
        return [np.zeros((4, 3)), np.zeros((4, 3))]

    monkeypatch.setattr(prior_mod, "in_worker", worker)
    stats = prior_mod.run_prior_fit(tmp_path, pairs, np.array([False, False, False, True]), "pairs", "next_item", 50,
                                    log=lambda *_: None)
    assert calls == ["prompt_preferences", "next_item_quality_weight"]
    assert stats["quality_weight"] == 0.3 and stats["quality_source"] == "next_item" and stats["next_item_users"] == 3
    assert stats["satiation"] > 0.5  # the pairs prefer the diverse page: c is still theirs
    assert PagePrior.load(tmp_path / "reward").quality_weight == 0.3


def test_heads_none_fits_the_prior_alone_and_fidelity_measures_it(reward_run, tmp_path):
    """`reward.heads: none`: no reward model trained or published, the prior fitted as with
    the heads; the simulator's fidelity block then holds the prior and the policy's own
    signals, no R."""
    import shutil

    from pagellm.config import load_config
    from pagellm.eval.runner import run_eval_stage
    from pagellm.models.page_prior import PagePrior
    from pagellm.models.reward import REWARD_FILE
    from pagellm.train.reward import run_reward_stage

    folder, _ = reward_run
    run_dir = tmp_path / "run"
    for part in ("data", "sft"):
        shutil.copytree(folder.root / part, run_dir / part)
    cfg = load_config(None, SMALL + ["reward.heads=none", "stage3.algorithm=guided", "eval.baselines=[popularity]",
                                     "guided.evaluator=none",
                                     "eval.fidelity_samples=2", "eval.hr_pct_pages=0", "eval.list_len=20"])
    shutil.copytree(folder.reward, run_dir / "reward")  # an earlier run's heads: not this stage's
    metrics = run_reward_stage(cfg, run_dir, log=lambda *_: None)
    assert metrics["heads"] == [] and not (run_dir / "reward" / REWARD_FILE).exists()
    assert not (run_dir / "ray_train").exists()  # no Ray Train run at all
    assert PagePrior.load(run_dir / "reward") is not None and metrics["page_prior"]["quality_source"] == "next_item"
    assert "the page prior only" in (run_dir / "reward" / "report.md").read_text()
    block = run_eval_stage(cfg, run_dir, log=lambda *_: None)["reward_fidelity"]
    assert "spearman/prior" in block and "spearman/policy_logprob" in block
    assert not any(k.endswith(("/R", "/R_c", "/R_f")) for k in block)


def test_heads_none_is_refused_where_a_stage_reads_the_heads():
    from pagellm.config import load_config

    none = ["reward.heads=none", "reward.onpolicy_samples=0"]  # the tiny default builds on-policy pairs for heads

    with pytest.raises(ValueError, match="set reward.page_prior=true"):
        load_config(None, [*none, "reward.page_prior=false", "stage3.algorithm=none"])
    with pytest.raises(ValueError, match="trains none"):
        load_config(None, [*none, "stage3.algorithm=ppo"])  # PPO reads R by default
    with pytest.raises(ValueError, match="trains none"):
        load_config(None, [*none, "stage3.algorithm=dpo", "dpo.on_policy=true", "dpo.ranker=reward"])
    for ok in (["stage3.algorithm=guided"], ["stage3.algorithm=ppo", "ppo.model_reward_weight=0",
                                             "ppo.prior_reward_weight=1"]):
        assert load_config(None, [*none, *ok]).reward.heads == "none"


def test_heads_keep_their_own_peak_lr_under_deepspeeds_schedule():
    """train_ds_config gives WarmupDecayLR one peak lr; the heads must still get lr x head_lr_mult."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    from test_reward_model import reward_model

    from pagellm.config import RewardConfig
    from pagellm.train.reward import param_groups, use_group_peak_lrs

    model, _, _ = reward_model()
    cfg = RewardConfig(lr=1e-3, head_lr_mult=10.0)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    engine = SimpleNamespace(optimizer=optimizer, lr_scheduler=WarmupDecayLR(
        optimizer, total_num_steps=10, warmup_min_lr=0.0, warmup_max_lr=cfg.lr, warmup_num_steps=2,
        warmup_type="linear"))
    use_group_peak_lrs(engine)
    head_ids = {id(p) for h in (model.coarse, model.fine) for p in h.parameters()}
    for step in range(6):  # warmup, peak, decay: the heads stay at 10x the backbone throughout
        engine.lr_scheduler.step()
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        heads = {lrs[i] for i in head_ids}
        body = {v for k, v in lrs.items() if k not in head_ids}
        assert len(heads) == len(body) == 1, (heads, body)
        assert heads.pop() == pytest.approx(10 * body.pop())
    assert max(g["lr"] for g in optimizer.param_groups) < 1e-2  # decaying after the peak


def test_sample_pairs_are_disjoint_better_first_with_their_margin_and_skip_ties():
    from pagellm.train.onpolicy_pairs import sample_pairs

    values = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.4])
    pairs = sample_pairs(values, np.random.default_rng(0))
    used = [i for a, b, _ in pairs for i in (a, b)]
    assert len(pairs) == 3 and len(set(used)) == 6  # every sample in at most one pair; one left over
    for better, worse, margin in pairs:
        assert values[better] > values[worse] and margin == pytest.approx(values[better] - values[worse])
    assert sample_pairs(values, np.random.default_rng(0)) == pairs  # seeded
    assert sample_pairs(np.array([1.0, 1.0, 1.0, 1.0]), np.random.default_rng(0)) == []  # ties: no pair


@pytest.mark.parametrize("setting, message", [
    (["reward.onpolicy_samples=1"], "makes no pair"),
    (["reward.onpolicy_samples=4", "reward.page_prior=false"], "ranks the policy's pages by the page prior"),
    (["reward.onpolicy_samples=4", "reward.heads=none"], "trains none"),
])
def test_onpolicy_settings_that_cannot_work_fail_at_load(setting, message):
    from pagellm.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, setting)


def test_onpolicy_pairs_rank_the_policys_own_pages_by_the_prior_and_train_the_heads(reward_run, tmp_path):
    """`reward.onpolicy_samples`: the SFT policy's sampled pages, paired better-above-worse by
    the page prior fitted first, with its margin, are trained on and held out by user like the
    data pairs."""
    import shutil

    from pagellm.config import load_config
    from pagellm.models.page_prior import PagePrior, first_item_preferences, item_categories
    from pagellm.models.policy import load_policy
    from pagellm.train.onpolicy_pairs import FAMILY, onpolicy_prompts, write_pairs
    from pagellm.train.reward import ONPOLICY_FILE, run_reward_stage
    from pagellm.vocab import PromptEncoder

    folder, _ = reward_run
    run_dir = tmp_path / "run"
    for part in ("data", "sft"):
        shutil.copytree(folder.root / part, run_dir / part)
    cfg = load_config(None, SMALL + ["reward.onpolicy_samples=4", "reward.epochs=1"])
    metrics = run_reward_stage(cfg, run_dir, log=lambda *_: None)
    data_pairs = pd.read_parquet(run_dir / "data" / "pairs.parquet")
    onpolicy = pd.read_parquet(run_dir / ONPOLICY_FILE)
    prompts = onpolicy_prompts(cfg, run_dir)
    assert set(onpolicy["family"]) == {FAMILY} and 0 < len(onpolicy) <= 2 * len(prompts)
    assert metrics["pairs"]["train"] + metrics["pairs"]["val"] == len(data_pairs) + len(onpolicy)
    assert metrics["val_pairs_by_family"].get(FAMILY, 0) > 0 and FAMILY in metrics["pair_accuracy"]["sum"]
    # The prior is fitted on the data pairs alone (it ranked the others) and survives publishing.
    prior = PagePrior.load(run_dir / "reward")
    assert prior is not None and metrics["page_prior"]["train_pairs"] + metrics["page_prior"]["heldout_pairs"] == len(
        data_pairs)

    # Each pair: the prior values the chosen page above the rejected one; pages are written
    # under the decoding constraints (page_len distinct items, none the prompt excluded).
    model, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    encoder = PromptEncoder(tokenizer, layout)
    ids = [encoder.encode_prompt(int(u), list(p)) for u, p in zip(onpolicy["user_index"], onpolicy["prompt"])]
    pref = first_item_preferences(model, layout, ids)
    cats = item_categories(run_dir / "data")
    chosen, rejected = [list(p) for p in onpolicy["chosen"]], [list(p) for p in onpolicy["rejected"]]
    assert (prior.score(pref, chosen, cats) > prior.score(pref, rejected, cats)).all()
    # ... and the pair's margin is that difference, the target the heads regress.
    np.testing.assert_allclose(onpolicy["margin"], prior.score(pref, chosen, cats) - prior.score(pref, rejected, cats),
                               rtol=1e-4, atol=1e-4)
    banned = {(u, tuple(p)): set(ex) for u, p, ex in prompts}
    for u, p, page in zip([*onpolicy["user_index"]] * 2, [*onpolicy["prompt"]] * 2, chosen + rejected):
        assert len(page) == cfg.data.page_len == len(set(page)) and not set(page) & banned[(int(u), tuple(p))]

    # Deterministic in the seed: a resumed stage rebuilds the same pairs.
    again = write_pairs(run_dir / "sft", prompts, run_dir / "reward", cats, 4, cfg.data.page_len, cfg.seed)
    pd.testing.assert_frame_equal(again, onpolicy)
