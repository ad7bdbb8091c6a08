"""DeGRe (stage3.algorithm degre): the evaluator's cumulative targets and losses and the
distillation loss by hand, beam mining's pages, and a real stage run that serve reads."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from run_template import untrained_run
from served_page import assert_serves_its_stage3_policy

from pagellm.config import load_config
from pagellm.models.beam_mining import EvaluatorGains, PriorGains, mine_pages
from pagellm.models.lookahead import (
    LookaheadEvaluator,
    cumulative_regression_loss,
    cumulative_targets,
    page_values,
    pair_loss,
    prefix_values,
    rating_value,
)
from pagellm.models.decoding import constrained_logprobs, first_item_scores
from pagellm.models.page_prior import PagePrior, standardise, step_gains
from pagellm.models.policy import build_policy
from pagellm.train.distill_loss import distill_loss, page_weights, soft_labels
from pagellm.vocab import PromptEncoder, Vocab

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "stage3.algorithm=degre", "degre.epochs=1", "degre.batch_size=16", "degre.val_users=8",
         "degre.log_every=1000", "degre.lr=1e-3", "degre.beam=3", "degre.expand=4",
         "degre.evaluator.epochs=2", "degre.evaluator.n_embd=16"]
QUIET = dict(log=lambda *_: None)


def test_rating_values_and_cumulative_targets_by_hand():
    # Scale 1..5, positive threshold 3: 5 -> +1, 4 -> +0.5, 3 -> 0, 2 -> -0.5, 1 -> -1; no rating -> +1.
    assert [rating_value(r, 3.0, 1.0, 5.0) for r in (5, 4, 3, 2, 1)] == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert rating_value(float("nan"), 3.0, 1.0, 5.0) == 1.0
    # y_k = sum_{t<k} v_t / log2(t + 2): 1/1, then + 0.5/log2(3), then - 1/2.
    y = cumulative_targets(np.array([1.0, 0.5, -1.0]))
    assert y == pytest.approx([1.0, 1.0 + 0.5 / math.log2(3), 1.0 + 0.5 / math.log2(3) - 0.5])


def test_prefix_values_and_evaluator_losses_by_hand():
    picked = torch.tensor([[0.3, 1.0], [-1.0, 5.0]])  # the second page ends after one item
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    values = prefix_values(picked, mask)
    assert values.flatten().tolist() == pytest.approx([0.3, 1.3, -1.0, -1.0])
    targets = torch.tensor([[0.5, 1.0], [0.0, 9.0]])  # the masked target never counts
    # (0.2^2 + 0.3^2 + 1^2) / 3 prefixes
    assert float(cumulative_regression_loss(values, targets, mask)) == pytest.approx((0.04 + 0.09 + 1.0) / 3)
    # BT: -log sigmoid(1.3 - (-1.0)) and -log sigmoid(0) averaged
    expected = (-math.log(1 / (1 + math.exp(-2.3))) + math.log(2)) / 2
    assert float(pair_loss(torch.tensor([1.3, 0.0]), torch.tensor([-1.0, 0.0]))) == pytest.approx(expected)


def test_distillation_loss_with_hard_and_soft_labels_and_page_weights_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    hard = torch.tensor([0, 1])
    proposals = torch.tensor([[0, 2], [1, 0]])
    soft = torch.tensor([[0.75, 0.25], [1.0, 0.0]])  # the second row's 0 is padding
    weights = torch.tensor([2.0, 1.0])
    loss, parts = distill_loss(logp, hard, proposals, soft, weights, alpha=0.5)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.2)
    kl1 = 1.0 * math.log(1.0 / 0.6)
    hard0, hard1 = -math.log(0.5), -math.log(0.6)
    assert float(loss) == pytest.approx((2 * (hard0 + 0.5 * kl0) + 1 * (hard1 + 0.5 * kl1)) / 3)
    assert float(parts["hard_nll"]) == pytest.approx((2 * hard0 + hard1) / 3)
    assert float(parts["soft_kl"]) == pytest.approx((2 * kl0 + kl1) / 3)
    # alpha 0 leaves the hard labels alone
    assert float(distill_loss(logp, hard, proposals, soft, weights, 0.0)[0]) == pytest.approx((2 * hard0 + hard1) / 3)
    # B x softmax(V / tau): values 0 and ln 3 at tau 1 -> 2 x (1/4, 3/4)
    assert page_weights(np.array([0.0, math.log(3)]), 1.0) == pytest.approx([0.5, 1.5])
    assert page_weights(np.array([0.0, math.log(3)]), 1e9) == pytest.approx([1.0, 1.0])
    assert soft_labels(np.array([0.0, math.log(3)]), 1.0) == pytest.approx([0.25, 0.75])


def test_picked_gains_are_the_full_gain_head_read_at_the_page_items():
    evaluator = LookaheadEvaluator.build(30, 12, 32, 1, 16, 2, seed=0).eval()
    ids = torch.randint(0, 30, (3, 7))
    mask = torch.ones_like(ids)
    items = torch.tensor([[4, 0, 11], [2, 2, -1], [7, 1, 5]])
    with torch.no_grad():
        hidden = evaluator.hidden(ids, mask)[:, 3:6]
        full = evaluator(ids, mask)[:, 3:6]
        picked = evaluator.picked_gains(hidden, items)
        assert torch.allclose(picked, full.gather(2, items.clamp(min=0).unsqueeze(-1)).squeeze(-1), atol=1e-6)
        assert torch.allclose(evaluator.last_gains(ids, mask), evaluator(ids, mask)[:, -1], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_models():
    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"])
    vocab = Vocab.build([f"u{i}" for i in range(5)], [f"i{i}" for i in range(12)])
    policy, tok, layout = build_policy(cfg.model, vocab, seed=0)
    evaluator = LookaheadEvaluator.build(layout.vocab_size, layout.n_items, 64, 1, 16, 2, seed=1)
    return policy, evaluator, PromptEncoder(tok, layout)


def test_beam_mining_returns_distinct_valid_pages_valued_as_the_evaluator_values_them(tiny_models):
    policy, evaluator, encoder = tiny_models
    layout = encoder.layout
    prompts = [encoder.encode_prompt(0, [1, 2, 3]), encoder.encode_prompt(3, [7])]
    exclude = [[1, 2, 3, 4], [7, 0]]
    mined = mine_pages(policy, EvaluatorGains(evaluator, layout.pad_id), layout, prompts, exclude, k=4, beam=5,
                       expand=3)
    assert [len(pages) for pages in mined] == [5, 5]
    for pages, banned, prompt in zip(mined, exclude, prompts):
        seen = set()
        for m in pages:
            assert len(m.items) == 4 == len(set(m.items))  # k items, no repeats
            assert all(0 <= i < layout.n_items for i in m.items)  # known items only
            assert not set(m.items) & set(banned)  # never the history
            assert tuple(m.items) not in seen  # B distinct pages
            seen.add(tuple(m.items))
            # each step chose among the policy's top `expand` proposals, and recorded them
            assert len(m.proposals) == 4 and all(len(p) == 3 for p in m.proposals)
            assert all(item in step for item, step in zip(m.items, m.proposals))
        values = [m.value for m in pages]
        assert values == sorted(values, reverse=True)
        evaluator.eval()
        with torch.no_grad():
            recomputed = page_values(evaluator, [prompt] * len(pages), [m.items for m in pages], layout.item_offset,
                                     layout.pad_id)[:, -1]
        assert recomputed.tolist() == pytest.approx(values, abs=1e-5)


def test_mining_with_the_page_prior_writes_its_greedy_page_and_counts_the_policy_weight(tiny_models):
    """degre.value_model=page_prior: with one beam and every item proposed, mining writes the
    page that adds the prior's largest gain at each step (computed here from step_gains and
    the policy's first-item scores alone); each page's value is its R_p and its logp the
    policy's own teacher-forced log-probability; a large policy_weight follows the policy."""
    policy, _, encoder = tiny_models
    layout = encoder.layout
    n = layout.n_items
    cat = np.arange(n) % 3
    prior = PagePrior(1.0, 1.5, 0.5, standardise(np.linspace(-1, 1, n)).tolist())
    prompts = [encoder.encode_prompt(0, [1, 2]), encoder.encode_prompt(4, [9])]
    exclude = [[1, 2], [9]]
    mined = mine_pages(policy, PriorGains(prior, cat), layout, prompts, exclude, k=4, beam=1, expand=n)
    z = standardise(first_item_scores(policy, layout, prompts).double().numpy())
    for row, (pages, banned) in enumerate(zip(mined, exclude)):
        want: list[int] = []
        for _ in range(4):
            gains = step_gains(prior, z[row : row + 1], [want], cat)[0]
            gains[banned + want] = -np.inf
            want.append(int(gains.argmax()))
        assert pages[0].items == want
        assert pages[0].value == pytest.approx(float(prior.value(z[row : row + 1, want], [want], cat)[0]), abs=1e-4)
        logp, _, _ = constrained_logprobs(policy.eval(), layout, [prompts[row]],
                                          [[layout.item_token(i) for i in want] + [layout.eos_id]], exclude=[banned],
                                          k=4)
        assert pages[0].logp == pytest.approx(float(logp[0, :4].sum()), abs=1e-4)  # the items, not the eos
    # With the policy's log-probability weighted far above the prior, one beam is the
    # policy's own greedy page.
    from pagellm.models.decoding import generate_pages

    greedy = generate_pages(policy, layout, prompts, k=4, exclude=exclude).items
    led = mine_pages(policy, PriorGains(prior, cat), layout, prompts, exclude, k=4, beam=1, expand=n,
                     policy_weight=1e6)
    assert [pages[0].items for pages in led] == greedy


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    """A run folder with data and an (untrained) SFT policy."""
    return untrained_run(tmp_path_factory.mktemp("degre") / "run", SMALL)


def test_degre_stage_publishes_a_distilled_policy_that_serve_reads(run_template, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from pagellm.train.degre import run_degre_stage

    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    cfg = load_config(None, SMALL + ["stage3.publish=last"])
    lines: list[str] = []
    summary = run_degre_stage(cfg, run_dir, log=lines.append)
    out = run_dir / "degre"
    # The evaluator is a from_pretrained directory; mined pages: B per training prompt.
    LookaheadEvaluator.from_pretrained(str(out / "evaluator"))
    mined = pd.read_parquet(out / "mined.parquet")
    users = len(pd.read_parquet(run_dir / "data" / "eval.parquet"))
    assert len(mined) == 3 * users == summary["pages_generated"]
    assert mined.groupby("user_index")["weight"].sum().to_numpy() == pytest.approx(np.full(users, 3.0))
    saved = json.loads((out / "selection.json").read_text())
    assert [h["step"] for h in saved["history"]] == [0, 1] and saved["published_step"] == 1
    assert json.loads((out / "DONE").read_text())["published_step"] == 1
    degre_w, sft_w = load_file(out / "model.safetensors"), load_file(run_dir / "sft" / "model.safetensors")
    assert any(not torch.equal(degre_w[k], sft_w[k]) for k in degre_w)  # distillation moved it

    # A rerun reuses the evaluator and the mined pages.
    lines.clear()
    run_degre_stage(cfg, run_dir, log=lines.append)
    assert any("evaluator: reusing" in line for line in lines) and any("mining: reusing" in line for line in lines)

    assert_serves_its_stage3_policy(run_dir, cfg, "degre")


def test_degre_stage_mines_with_the_page_prior_without_fitting_an_evaluator(run_template, tmp_path):
    """degre.value_model=page_prior reads <run>/reward/page_prior.json, fits no evaluator, and
    the mined pages carry the prior's value of each page."""
    import shutil

    from pagellm.train.degre import run_degre_stage

    run_dir = tmp_path / "run"
    shutil.copytree(run_template, run_dir)
    cfg = load_config(None, SMALL + ["stage3.publish=last", "degre.value_model=page_prior", "degre.epochs=1"])
    with pytest.raises(FileNotFoundError, match="page_prior.json not found"):
        run_degre_stage(cfg, run_dir, **QUIET)
    items = pd.read_parquet(run_dir / "data" / "items.parquet").sort_values("index")
    prior = PagePrior(1.0, 0.5, 0.4, standardise(items["score"].to_numpy(dtype=np.float64)).tolist())
    (run_dir / "reward").mkdir()
    prior.save(run_dir / "reward", {"fit": {"quality_weight": 0.5, "satiation": 0.4}})
    lines: list[str] = []
    run_degre_stage(cfg, run_dir, log=lines.append)
    assert not (run_dir / "degre" / "evaluator").exists()
    assert any("value model: the page prior" in line for line in lines)
    mined = pd.read_parquet(run_dir / "degre" / "mined.parquet").head(6)
    from pagellm.models.policy import load_policy

    policy, tok, layout = load_policy(run_dir / "sft", trainable=False)
    encoder = PromptEncoder(tok, layout)
    prompts = [encoder.encode_prompt(int(u), list(p)) for u, p in zip(mined["user_index"], mined["prompt"])]
    pages = [list(map(int, p)) for p in mined["page"]]
    want = prior.score(first_item_scores(policy, layout, prompts).double().numpy(), pages, items["cat_index"].to_numpy())
    assert mined["value"].to_numpy() == pytest.approx(want, abs=1e-4)
    assert (run_dir / "degre" / "DONE").exists()
    # Resuming with other mining settings would distill pages the config did not ask for:
    # refused before any work, naming what changed and how to start afresh.
    other = load_config(None, SMALL + ["stage3.publish=last", "degre.value_model=lookahead"])
    with pytest.raises(ValueError, match=r"degre.value_model 'page_prior' -> 'lookahead'.*--from degre"):
        run_degre_stage(other, run_dir, **QUIET)
    assert not (run_dir / "degre" / "evaluator").exists()
