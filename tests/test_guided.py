"""stage3.algorithm guided: the validation rules that pick the evaluator weight and the repeat
penalty, and real stage runs whose published policy carries them (eval, KL and serve decode it
from the layout and the evaluator saved beside it)."""

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
from pagellm.train.guided import (choose_page_terms, choose_weight, judged_rows, page_grid, page_terms_base, publish,
                                  run_guided_stage)
from pagellm.vocab import PromptEncoder

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "stage3.algorithm=guided", "guided.val_users=8",
         # the evaluator: the evaluation's SASRec, a short fit on this small world
         "eval.sasrec.epochs=3", "eval.sasrec.patience=1", "eval.sasrec.verbose=false"]
QUIET = dict(log=lambda *_: None)


def test_on_one_axis_the_largest_penalty_within_the_margin_is_chosen_and_a_pass_after_a_miss_is_noise():
    sft = {"ndcg@10": np.array([0.5, 0.5, 0.5, 0.5])}
    assert page_grid([2.0, 0.5, 4.0, 1.0], []) == [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (4.0, 0.0)]  # sorted
    # 0.5 (no change), 1 (-0.8 %), 2 (-4 %), 4 (-0.2 %, after the miss); the prior values each more.
    cands = [{"ndcg@10": sft["ndcg@10"] + d} for d in (0.0, -0.004, -0.02, -0.001)]
    chosen, records = choose_page_terms([0.5, 1.0, 2.0, 4.0], [], sft, cands, [1.0, 2.0, 3.0, 4.0], base_value=0.0,
                                        margin=0.01)
    assert chosen == (1.0, 0.0)  # 4 would pass alone, but 2 failed before it
    assert [r["passes"] for r in records] == [True, True, False, True]
    assert [r["eligible"] for r in records] == [True, True, False, False]
    assert records[1]["ndcg@10_change"] == pytest.approx(-0.004) and records[1]["prior_value"] == 2.0
    assert choose_page_terms([0.5], [], sft, [{"ndcg@10": sft["ndcg@10"] - 0.1}], [1.0], 0.0, margin=0.01)[0] is None
    with pytest.raises(ValueError, match="pairs"):
        choose_page_terms([0.5, 1.0], [], sft, cands[:1], [1.0], 0.0, margin=0.01)


def test_on_the_grid_the_eligible_pair_the_prior_values_most_is_chosen():
    sft = {"ndcg@10": np.full(4, 0.5)}
    grid = page_grid([1.0, 2.0], [0.1])
    assert grid == [(0.0, 0.1), (1.0, 0.0), (1.0, 0.1), (2.0, 0.0), (2.0, 0.1)]
    change = {(0.0, 0.1): 0.0, (1.0, 0.0): -0.001, (1.0, 0.1): -0.002, (2.0, 0.0): -0.02, (2.0, 0.1): 0.0}
    value = {(0.0, 0.1): 6.0, (1.0, 0.0): 4.0, (1.0, 0.1): 5.0, (2.0, 0.0): 7.0, (2.0, 0.1): 9.0}
    cands = [{"ndcg@10": sft["ndcg@10"] + change[p]} for p in grid]
    chosen, records = choose_page_terms([2.0, 1.0], [0.1], sft, cands, [value[p] for p in grid], 0.0, margin=0.01)
    # (2, 0.1) passes and is valued most, but (2, 0) below it missed: not eligible. Of the rest
    # the prior prefers the quality term alone over both terms at penalty 1.
    assert chosen == (0.0, 0.1)
    assert {(r["penalty"], r["quality"]): r["eligible"] for r in records} == {
        (0.0, 0.1): True, (1.0, 0.0): True, (1.0, 0.1): True, (2.0, 0.0): False, (2.0, 0.1): False}
    # Nothing the prior values above the decoding without page terms: none.
    assert choose_page_terms([2.0, 1.0], [0.1], sft, cands, [value[p] for p in grid], 10.0, margin=0.01)[0] is None


def test_a_change_validation_cannot_tell_from_a_loss_beyond_the_margin_is_refused():
    # Mean change -0.5 % of the SFT mean (inside a 1 % margin) but spread over users: its
    # standard error (0.006) puts the change 1 se down at -1.7 %, beyond the margin.
    sft = {"ndcg@10": np.full(4, 0.5)}
    noisy = {"ndcg@10": sft["ndcg@10"] + np.array([-0.0025, 0.0075 * 2 - 0.0025, -0.0025, -0.0075 * 2 - 0.0025])}
    se = noisy["ndcg@10"].std(ddof=1) / 2
    assert se == pytest.approx(np.std([0, 0.015, 0, -0.015], ddof=1) / 2)
    chosen, records = choose_page_terms([1.0], [], sft, [noisy], [1.0], 0.0, margin=0.01, standard_errors=1.0)
    assert chosen is None and records[0]["ndcg@10_change"] == pytest.approx(-0.0025)
    assert records[0]["ndcg@10_change_se"] == pytest.approx(se)
    assert choose_page_terms([1.0], [], sft, [noisy], [1.0], 0.0, margin=0.01,
                             standard_errors=0.0)[0] == (1.0, 0.0)  # the point estimate passes


def test_every_guarded_metric_must_hold():
    sft = {"ndcg@10": np.full(3, 0.4), "ndcg@100": np.full(3, 0.6)}
    cands = [{"ndcg@10": np.full(3, 0.41), "ndcg@100": np.full(3, 0.5)}]
    chosen, records = choose_page_terms([], [1.0], sft, cands, [1.0], 0.0, margin=0.05)
    assert chosen is None and not records[0]["passes"]


def test_the_evaluator_weight_with_the_largest_gain_validation_can_tell_is_kept_and_none_without_one():
    sft = {"ndcg@10": np.full(4, 0.5), "hr@10": np.full(4, 0.5)}
    up = lambda d, spread=0.0: sft["ndcg@10"] + d + np.array([spread, -spread, spread, -spread])  # noqa: E731
    # weights 0.25: +2 % certain; 0.5: +6 % on average but too noisy to tell; 1: +4 % certain.
    cands = [{"ndcg@10": up(0.01), "hr@10": up(0.01)}, {"ndcg@10": up(0.03, 0.2), "hr@10": up(0.03, 0.2)},
             {"ndcg@10": up(0.02), "hr@10": up(0.02)}]
    chosen, records = choose_weight([0.25, 0.5, 1.0], sft, cands, standard_errors=1.0)
    assert chosen == 2 and [r["passes"] for r in records] == [True, False, True]
    assert records[2]["bound"] == pytest.approx(0.04)
    assert choose_weight([0.25, 0.5, 1.0], sft, cands, standard_errors=0.0)[0] == 1  # the point estimate
    # Every guarded metric must gain: a gain on one and a loss on the other is no gain.
    mixed = [{"ndcg@10": up(0.02), "hr@10": up(-0.01)}]
    assert choose_weight([1.0], sft, mixed)[0] == -1
    assert choose_weight([1.0], sft, [{"ndcg@10": up(0.0), "hr@10": up(0.0)}])[0] == -1  # level is not a gain


def test_the_page_terms_cannot_spend_the_evaluators_gain():
    # The evaluator weight gains 10 % over SFT; a penalty on top keeps +5 % over SFT (within any
    # margin of SFT) but costs 4.5 % of the decoding it is added to: refused.
    sft = {"ndcg@10": np.full(4, 0.5)}
    weights = [{"ndcg@10": np.full(4, 0.51)}, {"ndcg@10": np.full(4, 0.55)}]
    chosen, _ = choose_weight([0.5, 1.0], sft, weights)
    base = page_terms_base(sft, weights, chosen)
    assert chosen == 1 and base is weights[1]
    assert page_terms_base(sft, weights, -1) is sft  # no weight kept: the page terms are paired with SFT
    penalty = [{"ndcg@10": np.full(4, 0.525)}]
    assert choose_page_terms([1.0], [], sft, penalty, [2.0], 1.0, margin=0.01)[0] == (1.0, 0.0)  # the old reference
    picked, records = choose_page_terms([1.0], [], base, penalty, [2.0], 1.0, margin=0.01)
    assert picked is None and records[0]["ndcg@10_change"] == pytest.approx(-0.025)


def test_the_stage_judges_on_validation_users_the_sft_stage_did_not_select_on():
    from pagellm.eval.probe import probe_rows

    for n, sft_users, users in [(670, 2000, 2000), (400, 100, 2000), (5000, 1000, 300), (3, 2000, 2000)]:
        rows = judged_rows(n, sft_users, users)
        assert not set(rows) & set(probe_rows(n, sft_users, "sft"))
        assert len(rows) == min(users, n - len(probe_rows(n, sft_users, "sft"))) and len(set(rows)) == len(rows)
    assert len(judged_rows(670, 2000, 2000)) == 335  # the stage-3 half, as the other algorithms'
    spread = judged_rows(5000, 1000, 300)
    assert spread.min() < 50 and spread.max() > 4950  # evenly over the users, not the first 300
    assert list(judged_rows(1, 2000, 2000)) == [0]


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    """A run folder with data and an (untrained) SFT policy."""
    return untrained_run(tmp_path_factory.mktemp("guided") / "run", SMALL)


def with_prior(run_dir, satiation: float, quality_weight: float = 0.5):
    items = pd.read_parquet(run_dir / "data" / "items.parquet").sort_values("index")
    (run_dir / "reward").mkdir(exist_ok=True)
    PagePrior(1.0, quality_weight, satiation, standardise(items["score"].to_numpy(dtype=np.float64)).tolist()).save(run_dir / "reward")
    return items["cat_index"].to_numpy()


def test_guided_stage_publishes_the_sft_weights_with_the_chosen_penalty_in_the_layout(run_template, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    # hr@40 of a 40-item catalogue: every list holds every allowed item, so no page term can
    # lose accuracy, and a prior that counts a repeated category as nearly worthless values
    # diverse pages of good items most.
    cfg = load_config(None, SMALL + ["guided.penalties=[1000, 0.5]", "guided.qualities=[0.5]",
                                     "guided.guard=[hr@40]"])
    with pytest.raises(FileNotFoundError, match="no page prior"):
        run_guided_stage(cfg, run_dir, **QUIET)
    cats = with_prior(run_dir, satiation=0.99)
    lines: list[str] = []
    selection = run_guided_stage(cfg, run_dir, log=lines.append)
    out = run_dir / "guided"
    records = {(r["penalty"], r["quality"]): r for r in selection["history"]}
    assert list(records) == page_grid([0.5, 1000], [0.5]) and all(r["passes"] and r["eligible"] for r in records.values())
    # Penalty 0.5 already writes pages as diverse as 1000 here: on a tie the smaller term wins.
    assert records[(0.5, 0.5)]["prior_value"] == records[(1000, 0.5)]["prior_value"]
    assert records[(0.5, 0.5)]["prior_value"] == max(r["prior_value"] for r in records.values()) > selection["prior_base"]
    assert (selection["repeat_penalty"], selection["quality_weight"]) == (0.5, 0.5)
    assert selection["published_step"] == 3 == json.loads((out / "DONE").read_text())["published_step"]
    # Every list holds every item under every weight too: no gain, no evaluator published.
    assert selection["evaluator_weight"] == 0 and len(selection["evaluator_history"]) == 12
    # Each model alone, then their average, at every weight.
    assert [r["evaluator"] for r in selection["evaluator_history"]] == \
        [["sasrec"]] * 4 + [["ease"]] * 4 + [["sasrec", "ease"]] * 4
    assert selection["evaluator"] == [] and selection["evaluators_tried"] == ["sasrec", "ease"]
    assert not any(r["passes"] for r in selection["evaluator_history"]) and not (out / "evaluator").exists()
    from pagellm.eval.report import stage3_section

    report = "\n".join(stage3_section(run_dir, "guided", tmp_path))  # what the run's report.md shows
    assert "published repeat penalty 0.5 and quality weight 0.5." in report
    assert report.count("| no |") == 12  # four weights for each of three mixes
    assert "| 1000 | 0.5 |" in report and "| sasrec + ease | 0.25 |" in report
    saved = json.loads((out / "selection.json").read_text())
    assert [(r["penalty"], r["quality"]) for r in saved["history"]] == list(records)
    assert any("published repeat penalty 0.5 and quality weight 0.5" in line for line in lines)
    guided_w, sft_w = load_file(out / "model.safetensors"), load_file(run_dir / "sft" / "model.safetensors")
    assert all(torch.equal(guided_w[k], sft_w[k]) for k in sft_w)  # no weight moved

    policy, tok, layout = load_policy(out, trainable=False)
    assert (layout.repeat_penalty, layout.quality_weight, layout.page_positions) == (0.5, 0.5, cfg.data.page_len)
    assert layout.item_category == [int(c) for c in cats]
    assert layout.item_quality == pytest.approx(PagePrior.load(run_dir / "reward").quality)
    from pagellm.models.decoding import generate_pages

    encoder = PromptEncoder(tok, layout)
    pages = generate_pages(policy, layout, [encoder.encode_prompt(u, [u]) for u in range(6)], k=4).items
    n_cats = len(set(int(c) for c in cats if c >= 0))
    for page in pages:  # as many distinct categories as the catalogue allows
        assert len({int(cats[i]) for i in page}) == min(4, n_cats)
    assert_serves_its_stage3_policy(run_dir, cfg, "guided")


def test_a_kept_evaluator_weight_is_published_with_its_evaluator_and_served(run_template, tmp_path):
    from pagellm.eval.output_cache import files_key
    from pagellm.eval.runner import load_eval_set, policy_output
    from pagellm.models.decoding import generate_pages
    from pagellm.models.evaluator import EVALUATOR_DIR, Guidance, evaluator_mixes, fit_evaluator

    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    cfg = load_config(None, SMALL)
    evaluator = fit_evaluator(run_dir / "data", {k: cfg.eval.baseline_params(k) for k in cfg.guided.evaluator},
                              cfg.seed, **QUIET)
    assert evaluator.kinds == ["sasrec", "ease"]  # the default
    # The stage tries each alone and both averaged; a kept single model is published alone.
    mixes = evaluator_mixes(evaluator)
    assert [m.kinds for m in mixes] == [["sasrec"], ["ease"], ["sasrec", "ease"]] and mixes[-1] is evaluator
    publish(run_dir, {"weight": 1.0}, mixes[1])
    assert {p.name for p in (run_dir / "guided" / EVALUATOR_DIR).iterdir()} == {"evaluator.json", "ease.safetensors"}
    out = publish(run_dir, {"weight": 50.0}, evaluator)
    plain_key = files_key(run_dir / "sft")
    policy, tok, layout = load_policy(out, trainable=False)
    assert layout.evaluator_weight == 50.0
    assert {p.name for p in (out / EVALUATOR_DIR).iterdir()} == {"evaluator.json", "sasrec.safetensors",
                                                                  "ease.safetensors"}
    assert files_key(out) != plain_key  # the evaluator's files key the evaluation's list cache too
    guidance = Guidance.load(out, layout)
    es = load_eval_set(run_dir / "data", "test", None)
    output = policy_output(out, es, 5, 16, exclude=True, **QUIET)
    written = output.lists
    encoder = PromptEncoder(tok, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    scores = guidance.scores(es.prompts)
    torch.testing.assert_close(scores, evaluator.scores(es.prompts))
    # Each model's scores standardised per user, then averaged: equal say whatever their scale.
    parts = [standardise(m.score(es.prompts)) for m in evaluator.models]
    torch.testing.assert_close(scores, torch.from_numpy(np.mean(parts, axis=0).astype(np.float32)))
    assert written == generate_pages(policy, layout, prompts, 5, exclude=es.exclude, evaluator_scores=scores).items
    # At weight 50 the evaluator's ranking decides the page.
    assert written[0] == [i for i in scores[0].argsort(descending=True).tolist() if i not in es.exclude[0]][:5]
    # The full-ranking track scores the published policy's first position, evaluator term included.
    first = output.scores(0, 1)[0]
    assert first.argmax() == int(scores[0].argmax())
    plain = policy_output(run_dir / "sft", es, 5, 16, exclude=True, **QUIET).scores(0, 1)[0]
    assert np.corrcoef(first, scores[0].numpy())[0, 1] > np.corrcoef(plain, scores[0].numpy())[0, 1]
    assert_serves_its_stage3_policy(run_dir, cfg, "guided")
    # A second publish without the weight leaves no stale evaluator behind.
    publish(run_dir, {})
    assert not (out / EVALUATOR_DIR).exists() and load_policy(out, trainable=False)[2].evaluator_weight == 0
    shutil.rmtree(out)
    publish(run_dir, {"weight": 1.0}, evaluator)
    shutil.rmtree(out / EVALUATOR_DIR)
    with pytest.raises(FileNotFoundError, match="evaluator/ is missing"):
        Guidance.load(out, load_policy(out, trainable=False)[2])


def test_guided_config_needs_a_term_to_choose():
    with pytest.raises(ValueError, match="no term to choose"):
        load_config(None, SMALL + ["guided.penalties=[]", "guided.evaluator=none", "guided.qualities=[]"])
    with pytest.raises(ValueError, match="qualities must all be > 0"):
        load_config(None, SMALL + ["guided.qualities=[0]"])
    assert load_config(None, SMALL + ["guided.penalties=[]", "guided.evaluator=none",
                                      "guided.qualities=[0.5]"]).guided.qualities == [0.5]  # the quality term alone
    assert load_config(None, SMALL + ["guided.penalties=[]"]).guided.penalties == []  # the evaluator alone


def test_a_prior_without_a_category_discount_or_a_quality_weight_publishes_the_sft_policy_as_it_is(run_template,
                                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    with_prior(run_dir, satiation=0.0, quality_weight=-0.2)
    lines: list[str] = []
    cfg = load_config(None, SMALL + ["guided.evaluator=none", "guided.qualities=[0.5]"])
    selection = run_guided_stage(cfg, run_dir, log=lines.append)
    assert selection["published_step"] == 0 and "c = 0" in selection["reason"] and "b = -0.20" in selection["reason"]
    layout = load_policy(run_dir / "guided", trainable=False)[2]
    assert layout.repeat_penalty == 0.0 == layout.quality_weight
    assert any("as it is" in line for line in lines)
    # With the quality term off (the default) only the penalty's reason is given.
    selection = run_guided_stage(load_config(None, SMALL + ["guided.evaluator=none", "guided.qualities=[]"]), run_dir,
                                 **QUIET)
    assert selection["published_step"] == 0 and "quality" not in selection["reason"] and "c = 0" in selection["reason"]


def test_a_guided_policy_published_with_one_sasrec_still_loads(tmp_path):
    """The evaluator's files before it could hold several models: model.safetensors and
    evaluator.json naming one kind."""
    from safetensors.torch import save_file

    from pagellm.eval.baselines.sasrec import SASRec
    from pagellm.models.evaluator import EVALUATOR_DIR, ItemEvaluator

    sasrec = SASRec({"hidden": 8, "blocks": 1, "max_len": 4, "fixed_epochs": 1, "verbose": False})
    sasrec.fit([[0, 1, 2], [1, 2, 3], [2, 3, 0]], 4)
    where = tmp_path / EVALUATOR_DIR
    where.mkdir()
    save_file({k: v.contiguous() for k, v in sasrec.state().items()}, str(where / "model.safetensors"))
    (where / "evaluator.json").write_text(json.dumps({"kind": "sasrec", "n_items": 4, "params": sasrec.params}))
    loaded = ItemEvaluator.load(tmp_path)
    assert loaded.kinds == ["sasrec"]
    torch.testing.assert_close(loaded.scores([[0, 1], [2]]), ItemEvaluator([sasrec]).scores([[0, 1], [2]]))
