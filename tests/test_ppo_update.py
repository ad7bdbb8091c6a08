"""The learner's PPO update on a tiny policy, without Ray: it must learn what the reward pays."""

import pytest
import torch

from pagellm.config import ModelConfig, PPOConfig
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import build_policy
from pagellm.rl.prompts import PromptSource
from pagellm.rl.ppo_update import (PolicyWithValue, ScoredBatch, admit_batch, combine_parts, merge_shards, minibatches,
                                   prepare_batch)
from pagellm.rl.value_head import ValueHead
from pagellm.vocab import PromptEncoder, Vocab

TARGET = 3  # the item the reward pays for


def tiny_setup(seed=0):
    vocab = Vocab.build([f"u{i}" for i in range(4)], [f"i{i}" for i in range(12)])
    cfg = ModelConfig(init={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64})
    policy, tok, layout = build_policy(cfg, vocab, seed=seed)
    policy.eval()
    ppo = PPOConfig(lr=3e-3, epochs=2, mini_batch_size=16, kl_beta=0.0, normalize_reward=False)
    module = PolicyWithValue(policy, layout, ValueHead(32), ppo)
    prompts = [PromptEncoder(tok, layout).encode_prompt(u % 4, [u % 12, (u + 5) % 12]) for u in range(32)]
    return module, layout, ppo, prompts


def sample_batch(module, layout, prompts, gen, batch_id=0, per_prompt=1):
    prompts = [p for p in prompts for _ in range(per_prompt)]
    with torch.no_grad():
        pages = generate_pages(module.policy, layout, prompts, k=3, mode="sample", generator=gen)
    reward = torch.tensor([float(TARGET in p) for p in pages.items])
    return ScoredBatch(batch_id, 0, prompts, [[] for _ in prompts], pages.response_ids, pages.logprobs,
                       pages.logprobs.clone(), reward, components={"model": reward},
                       group_ids=torch.arange(len(prompts)) // per_prompt,
                       reward_parts={"r_c": float(reward.mean()), "r_f": 0.0})


@pytest.mark.parametrize("advantage, per_prompt", [("gae", 1), ("grpo", 4), ("rloo", 4)])
def test_ppo_updates_raise_the_rewarded_item(advantage, per_prompt):
    """Every estimator, with its own batch shape (critic-free ones sample 4 pages per
    prompt), learns to put the paid item on the page."""
    torch.manual_seed(0)
    module, layout, ppo, prompts = tiny_setup()
    ppo = ppo.model_copy(update={"advantage": advantage, "samples_per_prompt": per_prompt})
    module.cfg = ppo
    opt = torch.optim.Adam(module.parameters(), lr=ppo.lr)
    gen = torch.Generator().manual_seed(1)
    moments = {}
    before = float(sample_batch(module, layout, prompts * 4, torch.Generator().manual_seed(9)).reward.mean())
    for step in range(12):
        batch = sample_batch(module, layout, prompts[: len(prompts) // per_prompt], gen, step, per_prompt)
        prepared = prepare_batch(module, batch, moments, ppo)
        for _ in range(ppo.epochs):
            for mb in minibatches(prepared, ppo.mini_batch_size, gen):
                loss, stats = module(mb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    after = float(sample_batch(module, layout, prompts * 4, torch.Generator().manual_seed(9)).reward.mean())
    assert after > before + 0.25, (before, after)
    assert all(k in stats for k in ("policy_loss", "value_loss", "entropy"))


def test_first_epoch_ratio_is_one_and_kl_zero_against_itself():
    """Learner logprobs reproduce the rollout's, so the first PPO ratio is exactly 1."""
    module, layout, ppo, prompts = tiny_setup()
    batch = sample_batch(module, layout, prompts, torch.Generator().manual_seed(3))
    prepared = prepare_batch(module, batch, {}, ppo)
    assert abs(prepared["kl"]) < 1e-5
    with torch.no_grad():
        logprobs, _, mask, _ = module.evaluate(batch.prompts, batch.response_ids, batch.exclude)
    assert torch.allclose(logprobs[mask.bool()], batch.logprobs[mask.bool()], atol=1e-5)


def test_prompt_source_is_a_pure_function_of_batch_id():
    src = PromptSource([[i] for i in range(10)], [[] for _ in range(10)], [[] for _ in range(10)], batch_size=4, seed=7)
    first = [src.batch(b) for b in range(5)]
    assert first == [src.batch(b) for b in range(5)]  # resume samples the same prompts
    epoch0 = first[0] + first[1] + first[2][:2]
    assert sorted(epoch0) == list(range(10))  # every prompt once per pass


def test_prompt_source_groups_hold_one_prompt_each():
    src = PromptSource([[i] for i in range(10)], [[] for _ in range(10)], [[] for _ in range(10)], batch_size=6,
                       seed=7, samples_per_prompt=3)
    rows = src.batch(0) + src.batch(1) + src.batch(2) + src.batch(3)
    groups = [rows[a : a + 3] for a in range(0, len(rows), 3)]
    assert all(len(set(g)) == 1 for g in groups)  # a group is one prompt, three times
    assert sorted(g[0] for g in groups[:8])[:8] == sorted({g[0] for g in groups[:8]})  # no prompt twice in a pass
    with pytest.raises(ValueError, match="multiple"):
        PromptSource([[1]], [[]], [[]], batch_size=5, seed=0, samples_per_prompt=2)


def test_combine_parts_normalises_each_part_on_its_own_statistics():
    ppo = PPOConfig(model_reward_weight=1.0, hits_reward_weight=2.0, prompts="cuts")
    parts = {"model": torch.tensor([10.0, 20.0, 30.0]), "hits": torch.tensor([0.0, 0.5, 1.0])}
    raw = combine_parts(parts, ppo)
    torch.testing.assert_close(raw, torch.tensor([10.0, 21.0, 32.0]))
    moments = {}
    normed = combine_parts(parts, ppo, moments)
    # Both parts standardise to (-1, 0, 1) x c (same shape of spread), so hits' weight 2 makes
    # it count twice as much as R, whatever their raw scales.
    z = (parts["model"] - 20.0) / parts["model"].std(unbiased=False)
    torch.testing.assert_close(normed, 3.0 * z, rtol=1e-4, atol=1e-4)
    assert set(moments) == {"model", "hits"} and moments["hits"].count == 3


def test_merge_shards_keeps_the_stalest_version():
    module, layout, ppo, prompts = tiny_setup()
    a = sample_batch(module, layout, prompts[:4], torch.Generator().manual_seed(1))
    b = sample_batch(module, layout, prompts[4:8], torch.Generator().manual_seed(2))
    b.policy_version = 3
    a.policy_version = 2
    merged = merge_shards([a, b])
    assert merged.policy_version == 2 and len(merged) == 8
    assert torch.equal(merged.reward, torch.cat([a.reward, b.reward]))


def test_admit_batch_drops_stale_batches_and_refuses_out_of_order_or_repeated_ones():
    common = {"next_batch": 5, "trained_ids": [0, 1, 3, 4], "max_staleness": 1}
    assert admit_batch(5, 7, learner_version=8, **common) == (True, 1)  # one version behind: trained
    assert admit_batch(5, 8, learner_version=8, **common) == (True, 0)
    assert admit_batch(5, 6, learner_version=8, **common) == (False, 2)  # two behind: dropped
    assert admit_batch(5, 8, learner_version=8, **{**common, "max_staleness": 0}) == (True, 0)
    assert admit_batch(5, 7, learner_version=8, **{**common, "max_staleness": 0}) == (False, 1)
    with pytest.raises(RuntimeError, match="expected 5"):
        admit_batch(6, 8, learner_version=8, **common)  # batch 5 skipped
    with pytest.raises(RuntimeError, match="trained twice"):
        admit_batch(4, 8, learner_version=8, **{**common, "next_batch": 4})


def test_history_cuts_exclude_only_what_came_before_the_cut():
    from pagellm.config import load_config
    from pagellm.rl.prompts import history_cuts

    cfg = load_config(None, ["data.page_len=2", "data.sft_windows=2", "data.history_len=3"])
    items = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 11, 14, 17 were not liked
    positives = [10, 12, 13, 15, 16, 18, 19]
    # sft_windows(7 positives, page 2, 2 windows) = (4, 7), (3, 5): cuts before positives 16 and 15.
    cuts = history_cuts(items, positives, cfg)
    assert cuts[0] == ([12, 13, 15], [10, 11, 12, 13, 14, 15], [16, 18, 19])
    assert cuts[1] == ([10, 12, 13], [10, 11, 12, 13, 14], [15, 16, 18, 19])
