"""DPO (stage3.algorithm dpo): the loss by hand, one likelihood for policy and reference,
on-policy pairs, and a real stage run on Ray Train that eval and serve read unchanged."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from run_template import untrained_run
from served_page import assert_serves_its_stage3_policy

from pagellm.config import load_config
from pagellm.models.decoding import constrained_logprobs
from pagellm.models.policy import build_policy, load_policy
from pagellm.models.positions import prompt_anchor
from pagellm.train.dpo_loss import dpo_loss, page_logprobs
from pagellm.train.dpo_pairs import best_and_worst, build_pairs, ranking_page, reference_logprobs
from pagellm.train.sft_rows import collate, page_rows
from pagellm.vocab import PromptEncoder, Vocab

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "stage3.algorithm=dpo", "dpo.epochs=1", "dpo.batch_size=16", "dpo.val_users=8", "dpo.log_every=1000",
         "dpo.lr=1e-3"]
QUIET = dict(log=lambda *_: None)


def _nll_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-1.5, -1.5])
    # Log-ratio margins: (0.5 - (-0.5)) = 1 for pair 0, (-0.5 - 0.5) = -1 for pair 1.
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx((_nll_sigmoid(0.1) + _nll_sigmoid(-0.1)) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["chosen_reward"].item() == pytest.approx(0.1 * (0.5 - 0.5) / 2, abs=1e-7)
    assert m["rejected_reward"].item() == pytest.approx(0.1 * (-0.5 + 0.5) / 2, abs=1e-7)
    loss1, _ = dpo_loss(pc, pr, rc, rr, beta=1.0)  # beta scales the margin inside the sigmoid
    assert loss1.item() == pytest.approx((_nll_sigmoid(1.0) + _nll_sigmoid(-1.0)) / 2, abs=1e-6)
    assert loss1.item() > loss.item()
    # RPO: + sft_coef x the chosen NLL per item, here mean(1/2, 3/4) = 0.625.
    rpo, m = dpo_loss(pc, pr, rc, rr, beta=0.1, chosen_items=torch.tensor([2, 4]), sft_coef=0.5)
    assert rpo.item() == pytest.approx(loss.item() + 0.5 * 0.625, abs=1e-6)
    assert m["sft_nll"].item() == pytest.approx(0.625)
    with pytest.raises(ValueError, match="chosen_items"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, sft_coef=0.5)


def test_best_and_worst_and_ties():
    best, worst, tie = best_and_worst(np.array([[0.1, 0.5, -1.0], [2.0, 2.0, 2.0]]))
    assert best.tolist() == [1, 0] and worst.tolist() == [2, 0] and tie.tolist() == [False, True]


def test_ranking_page_is_the_best_unseen_items_best_first():
    scores = np.log(np.array([0.05, 0.30, 0.10, 0.30, 0.20, 0.05]))
    # Item 3 is excluded; 1 before 4 before 2; the tie of 0 and 5 goes to the lower index.
    assert ranking_page(scores, {3}, 4) == [1, 4, 2, 0]
    assert ranking_page(scores, set(), 2) == [1, 3]  # equal scores: lower index first
    assert ranking_page(scores, {0, 1, 2, 3}, 5) == [4, 5]  # fewer unseen items than k


@pytest.mark.parametrize("positions", ["start", "prompt_end"])
def test_policy_and_reference_score_pages_with_the_constrained_decoding_likelihood(positions):
    """The per-row summed item terms the training step takes, and the driver's reference
    log-probs, both equal the summed constrained decoding logprobs of the same pages
    (prompt items excluded), row by row, on rows of different lengths in one batch, with
    model.ranking_prior on: DPO moves the distribution decoding reads."""
    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32", f"model.positions={positions}",
                             "model.ranking_prior=2.0"]).model
    vocab = Vocab.build(["u0", "u1", "u2"], [f"i{i}" for i in range(12)])
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    users, prompts = [0, 1, 2], [[1, 2, 3], [4], [9, 10]]
    chosen, rejected = [[5, 6], [7, 8, 0], [1, 2, 3, 4]], [[6, 5], [0, 8, 7], [11, 0, 5, 6]]

    @torch.no_grad()
    def decoded(pages):
        return torch.stack([
            constrained_logprobs(model, layout, [enc.encode_prompt(u, p)], [enc.encode_page(page)], exclude=[p])[0].sum()
            for u, p, page in zip(users, prompts, pages)])

    batch = collate(page_rows(enc, users, prompts, chosen, 0.0, 0), layout.pad_id, anchor=prompt_anchor(model))
    with torch.no_grad():
        assert torch.allclose(page_logprobs(model, batch, layout), decoded(chosen), atol=1e-5)
    pairs = pd.DataFrame({"user_index": users, "prompt": prompts, "chosen": chosen, "rejected": rejected})
    ref_c, ref_r = reference_logprobs(model, tok, layout, pairs)
    assert np.allclose(ref_c, decoded(chosen).numpy(), atol=1e-5)
    assert np.allclose(ref_r, decoded(rejected).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    """A run folder with data and an (untrained) SFT policy."""
    return untrained_run(tmp_path_factory.mktemp("dpo") / "run", SMALL)


def fresh_copy(template, tmp_path):
    import shutil

    shutil.copytree(template, tmp_path / "run")
    return tmp_path / "run"


def test_missing_inputs_and_families_fail_clearly(run_template, tmp_path):
    from pagellm.train.dpo import run_dpo_stage

    run_dir = fresh_copy(run_template, tmp_path)
    with pytest.raises(FileNotFoundError, match="pagellm reward"):
        run_dpo_stage(load_config(None, SMALL + ["dpo.on_policy=true"]), run_dir, **QUIET)
    pairs = pd.read_parquet(run_dir / "data" / "pairs.parquet")
    pairs[pairs["family"] != "redundancy"].to_parquet(run_dir / "data" / "pairs.parquet")  # as if none were built
    present = sorted(set(pairs["family"]) - {"redundancy"})
    with pytest.raises(ValueError, match="no such pairs; families present: " + ", ".join(present)):
        build_pairs(load_config(None, SMALL + ["dpo.families=[ranking,redundancy]"]), run_dir, **QUIET)
    import shutil

    shutil.rmtree(run_dir / "sft")
    with pytest.raises(FileNotFoundError, match="pagellm sft"):
        run_dpo_stage(load_config(None, SMALL), run_dir, **QUIET)


@pytest.mark.parametrize("ranker", ["reward", "prior"])
def test_on_policy_pairs_are_the_best_and_worst_sampled_pages(run_template, tmp_path, ranker):
    from pagellm.models.page_prior import PagePrior
    from pagellm.models.reward import reward_model_from_policy, save_reward_model

    run_dir = fresh_copy(run_template, tmp_path)
    reward, tok, layout = reward_model_from_policy(run_dir / "sft", ["coarse", "fine"])
    save_reward_model(reward, tok, layout, run_dir / "reward")
    n_items = len(pd.read_parquet(run_dir / "data" / "items.parquet"))
    PagePrior(1.0, 0.5, 0.5, [0.0] * n_items).save(run_dir / "reward")
    cfg = load_config(None, SMALL + ["dpo.on_policy=true", f"dpo.ranker={ranker}", "dpo.samples_per_prompt=3"])
    path, stats = build_pairs(cfg, run_dir, **QUIET)
    pairs = pd.read_parquet(path)
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    assert stats["pages_generated"] == 3 * len(evals)
    assert len(pairs) + stats["ties_skipped"] + stats["dropped"] == len(evals)
    assert (pairs["family"] == "on_policy").all() and (pairs["score_chosen"] > pairs["score_rejected"]).all()
    history = dict(zip(evals["user_index"], evals["train_items"]))
    for user, c, r in zip(pairs["user_index"], pairs["chosen"], pairs["rejected"]):
        assert not (set(c) | set(r)) & set(history[user])  # sampled with the history excluded
        assert len(c) == cfg.data.page_len and len(set(c)) == len(c)
    assert np.isfinite(pairs[["ref_chosen", "ref_rejected"]].to_numpy()).all()
    # A second call (a resumed run) reuses the saved pairs instead of sampling again.
    lines = []
    build_pairs(cfg, run_dir, log=lines.append)
    assert lines and lines[0].startswith("[dpo] reusing")


def test_next_item_pairs_are_the_ranking_top_against_the_written_page(run_template, tmp_path):
    """dpo.ranker=next_item: chosen = the top page_len of the SFT policy's own first-position
    scores with the history excluded, rejected = its greedy page; no reward model needed."""
    from pagellm.models.decoding import first_item_scores, generate_pages

    run_dir = fresh_copy(run_template, tmp_path)
    assert not (run_dir / "reward").exists()
    cfg = load_config(None, SMALL + ["dpo.on_policy=true", "dpo.ranker=next_item"])
    path, stats = build_pairs(cfg, run_dir, **QUIET)
    pairs = pd.read_parquet(path)
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    assert stats["pages_generated"] == len(evals)
    assert len(pairs) + stats["ties_skipped"] + stats["dropped"] == len(evals) and len(pairs) > 0
    model, tok, layout = load_policy(run_dir / "sft", trainable=False)
    model.eval()
    enc = PromptEncoder(tok, layout)
    history = dict(zip(evals["user_index"], evals["train_items"]))
    for user, prompt, chosen, rejected, mass_c, mass_r in pairs[
            ["user_index", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"]].itertuples(index=False):
        ids = [enc.encode_prompt(int(user), list(prompt))]
        seen = {int(i) for i in history[user]}
        with torch.no_grad():
            scores = first_item_scores(model, layout, ids)[0].double().numpy()
            greedy = generate_pages(model, layout, ids, k=cfg.data.page_len, exclude=[seen]).items[0]
        scores[sorted(seen)] = -np.inf
        top = np.argsort(-scores, kind="stable")[: cfg.data.page_len]
        assert list(chosen) == top.tolist() and list(rejected) == list(greedy)
        # The ranking's top holds at least as much next-item probability as any page.
        assert mass_c >= mass_r - 1e-9 and mass_c == pytest.approx(np.exp(scores[top]).sum())


def test_dpo_stage_publishes_a_policy_that_serve_reads(run_template, tmp_path):
    from safetensors.torch import load_file

    from pagellm.train.dpo import run_dpo_stage

    run_dir = fresh_copy(run_template, tmp_path)
    cfg = load_config(None, SMALL + ["dpo.families=[ranking,redundancy]", "stage3.publish=last"])
    lines = []
    selection = run_dpo_stage(cfg, run_dir, log=lines.append)
    out = run_dir / "dpo"
    assert any(line.startswith("[dpo] training on") for line in lines)
    saved = json.loads((out / "selection.json").read_text())
    assert saved == json.loads(json.dumps(selection, default=float))
    assert [h["step"] for h in saved["history"]] == [0, 1] and saved["published_step"] == 1
    done = json.loads((out / "DONE").read_text())
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert done["pages_generated"] == 0 and done["pairs"] == len(pairs)
    assert set(done["pairs_by_family"]) <= {"ranking", "redundancy"} and sum(done["pairs_by_family"].values()) == len(pairs)
    epoch = saved["history"][1]
    assert 0.0 <= epoch["train_accuracy"] <= 1.0 and math.isfinite(epoch["train_margin"])
    # The published policy loads, and training moved it away from SFT.
    load_policy(out, trainable=False)
    dpo_w, sft_w = load_file(out / "model.safetensors"), load_file(run_dir / "sft" / "model.safetensors")
    assert dpo_w.keys() == sft_w.keys() and any(not torch.equal(dpo_w[k], sft_w[k]) for k in dpo_w)

    # `pagellm serve` finds it by the run config's algorithm and writes pages from it.
    assert_serves_its_stage3_policy(run_dir, cfg, "dpo")
