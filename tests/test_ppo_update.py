"""The learner's PPO update on a tiny policy, without Ray: it must learn what the reward pays."""

import pytest
import torch

from pagellm.config import ModelConfig, PPOConfig
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import build_policy
from pagellm.rl.prompts import PromptSource
from pagellm.rl.ppo_update import PolicyWithValue, ScoredBatch, admit_batch, merge_shards, minibatches, prepare_batch
from pagellm.rl.stats import RunningMoments
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


def sample_batch(module, layout, prompts, gen, batch_id=0):
    with torch.no_grad():
        pages = generate_pages(module.policy, layout, prompts, k=3, mode="sample", generator=gen)
    reward = torch.tensor([float(TARGET in p) for p in pages.items])
    return ScoredBatch(batch_id, 0, prompts, [[] for _ in prompts], pages.response_ids, pages.logprobs,
                       pages.logprobs.clone(), reward, {"r_c": float(reward.mean()), "r_f": 0.0})


def test_ppo_updates_raise_the_rewarded_item():
    torch.manual_seed(0)
    module, layout, ppo, prompts = tiny_setup()
    opt = torch.optim.Adam(module.parameters(), lr=ppo.lr)
    gen = torch.Generator().manual_seed(1)
    moments = RunningMoments()
    before = float(sample_batch(module, layout, prompts * 4, torch.Generator().manual_seed(9)).reward.mean())
    for step in range(12):
        batch = sample_batch(module, layout, prompts, gen, step)
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
    prepared = prepare_batch(module, batch, RunningMoments(), ppo)
    assert abs(prepared["kl"]) < 1e-5
    with torch.no_grad():
        logprobs, _, mask, _ = module.evaluate(batch.prompts, batch.response_ids, batch.exclude)
    assert torch.allclose(logprobs[mask.bool()], batch.logprobs[mask.bool()], atol=1e-5)


def test_prompt_source_is_a_pure_function_of_batch_id():
    src = PromptSource([[i] for i in range(10)], [[] for _ in range(10)], batch_size=4, seed=7)
    first = [src.batch(b) for b in range(5)]
    assert first == [src.batch(b) for b in range(5)]  # resume samples the same prompts
    epoch0 = first[0] + first[1] + first[2][:2]
    assert sorted(epoch0) == list(range(10))  # every prompt once per pass


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
