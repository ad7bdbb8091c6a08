"""PPO math of stage 3, checked against hand-computed numbers (arithmetic in comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pagellm.config import PPOConfig
from pagellm.rl.advantages import (
    discounted_returns,
    gae_advantages,
    kl_penalty,
    last_token_index,
    reinforce_advantages,
    grpo_advantages,
    rloo_advantages,
    token_rewards,
)
from pagellm.rl.kl_control import adaptive_kl_beta
from pagellm.rl.verifiable import hit_ndcg
from pagellm.rl.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    dual_clip_policy_loss,
    entropy_from_logits,
    logprobs_from_logits,
    token_entropy,
)
from pagellm.rl.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    get_advantage,
    get_kl_estimator,
    get_policy_loss,
    register_advantage,
)
from pagellm.rl.stats import RunningMoments, masked_mean, masked_var, masked_whiten
from pagellm.rl.value_head import VALUE_HEAD_FILE, ValueHead

PAD = 99.0  # garbage in padding: any leak shows up as a large error


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# Two right-padded pages: 3 real tokens and 2 real tokens.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
REWARDS = t([[0.1, -0.2, 1.0, PAD], [0.0, 2.0, PAD, PAD]])
VALUES = t([[0.5, 0.3, 0.2, PAD], [1.0, 0.5, PAD, PAD]])


# ----------------------------------------------------------------------------- masked stats


def test_masked_mean_ignores_nan_padding_and_handles_empty_rows():
    x = t([[1.0, 3.0, float("nan")], [float("-inf"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 3) / 2
    assert masked_mean(x, mask, dim=1).tolist() == [2.0, 0.0]  # an empty row gives 0, not nan
    with pytest.raises(ValueError, match="selects no position"):
        masked_mean(x, torch.zeros_like(mask))


def test_masked_whiten_is_mean0_var1_over_the_mask_only():
    torch.manual_seed(0)
    x = torch.randn(6, 9, dtype=torch.float64) * 3 + 5
    mask = torch.rand(6, 9) > 0.4
    x_padded = torch.where(mask, x, torch.full_like(x, float("nan")))
    white = masked_whiten(x_padded, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(white[~mask] == 0)
    sel = x[mask].numpy()
    np.testing.assert_allclose(white[mask].numpy(), (sel - sel.mean()) / sel.std(ddof=1), rtol=1e-6)
    # Without the shift the mean is kept: mean(x) + 0 after scaling.
    kept = masked_whiten(x_padded, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(sel.mean(), rel=1e-6)


def test_running_moments_match_numpy_over_concatenated_batches(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 64, 13)]
    moments = RunningMoments()
    for b in batches:
        moments.update(torch.from_numpy(b))
    everything = np.concatenate(batches)
    assert moments.count == everything.size
    assert moments.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std(), rel=1e-12)
    x = torch.tensor([0.0, 3.0, 10.0])
    expected = (x.numpy() - everything.mean()) / everything.std()
    np.testing.assert_allclose(moments.normalize(x).numpy(), expected, rtol=1e-5)

    # Checkpoints through json and through torch.save(weights_only=True).
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    assert restored.state_dict() == moments.state_dict()
    torch.save(moments.state_dict(), tmp_path / "m.pt")
    again = RunningMoments()
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert again.mean == moments.mean and again.m2 == moments.m2


def test_running_moments_refuses_bad_input_and_only_centres_a_constant_stream():
    moments = RunningMoments()
    with pytest.raises(RuntimeError, match="before any update"):
        moments.normalize(torch.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        moments.update(torch.tensor([1.0, float("nan")]))
    moments.update(torch.full((4,), 2.0))
    # std = 0: dividing would blow 2.5 up to ~1e6; only the shift is applied.
    assert moments.normalize(torch.tensor([2.5])).tolist() == [0.5]


# ----------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_zero_when_equal_and_hand_values():
    logp = torch.log(t([[0.5, 0.2]]))
    mask = torch.ones(1, 2)
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(logp, logp.clone(), mask, kind) == 0)
    # logp = log .5, ref = log .25 -> d = log 2 = 0.693147
    d = math.log(2.0)
    logp1, ref1 = torch.log(t([[0.5]])), torch.log(t([[0.25]]))
    one = torch.ones(1, 1)
    assert kl_penalty(logp1, ref1, one, "k1").item() == pytest.approx(d)  # 0.6931
    assert kl_penalty(logp1, ref1, one, "k2").item() == pytest.approx(0.5 * d * d)  # 0.2402
    assert kl_penalty(logp1, ref1, one, "k3").item() == pytest.approx(0.5 - 1 + d)  # e^-d - 1 + d = 0.1931


def test_k3_is_non_negative_and_padding_is_zero():
    torch.manual_seed(1)
    logp, ref = torch.randn(8, 12) * 3, torch.randn(8, 12) * 3
    mask = torch.rand(8, 12) > 0.3
    kl = kl_penalty(logp, ref, mask, "k3")
    assert torch.all(kl >= 0) and torch.all(kl[~mask] == 0)
    assert torch.isfinite(kl_penalty(t([[0.0]]), t([[-1e4]]), torch.ones(1, 1), "k3")).all()  # clamped exp
    assert (kl_penalty(logp, ref, mask, "k1") < 0).any()  # why k3 exists: k1 goes negative


def test_token_rewards_put_the_page_reward_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = torch.zeros(2, 3, dtype=torch.float64)
    logp = t([[0.1, 0.2, 0.3], [0.4, 0.5, PAD]])  # k1 = logp - ref = logp
    rewards, kl = token_rewards(t([1.0, -2.0]), logp, ref, mask, kl_beta=0.1, kl_kind="k1")
    # row 0: -0.1*[.1,.2,.3] + [0,0,1] = [-0.01, -0.02, 0.97]
    # row 1: -0.1*[.4,.5] + [0,-2] = [-0.04, -2.05], padding 0
    torch.testing.assert_close(rewards, t([[-0.01, -0.02, 0.97], [-0.04, -2.05, 0.0]]))
    torch.testing.assert_close(kl, t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]]))
    assert last_token_index(mask).tolist() == [2, 1]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="seq_reward must be"):
        token_rewards(t([1.0]), logp, ref, mask, 0.1)


# ----------------------------------------------------------------------------- advantages


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    # row 0: reward-to-go [0.1-0.2+1, -0.2+1, 1] = [0.9, 0.8, 1.0]; minus V [.5,.3,.2] -> [0.4, 0.5, 0.8]
    # row 1: reward-to-go [2.0, 2.0]; minus V [1.0, 0.5] -> [1.0, 1.5]
    torch.testing.assert_close(adv, t([[0.4, 0.5, 0.8, 0], [1.0, 1.5, 0, 0]]))
    torch.testing.assert_close(ret, t([[0.9, 0.8, 1.0, 0], [2.0, 2.0, 0, 0]]))
    torch.testing.assert_close(ret, discounted_returns(REWARDS, MASK, 1.0))


def test_gae_lambda0_is_the_td_residual_without_bootstrap_past_the_end():
    adv, _ = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    # delta_t = r_t + V_{t+1} - V_t, V after the last real token = 0 (not the padding's 99):
    # row 0: 0.1+0.3-0.5 = -0.1; -0.2+0.2-0.3 = -0.3; 1.0+0-0.2 = 0.8
    # row 1: 0.0+0.5-1.0 = -0.5; 2.0+0-0.5 = 1.5
    torch.testing.assert_close(adv, t([[-0.1, -0.3, 0.8, 0], [-0.5, 1.5, 0, 0]]))


def test_gae_with_discount_and_lambda():
    adv, _ = gae_advantages(REWARDS[:1], VALUES[:1], MASK[:1], gamma=0.5, lam=0.5)
    # deltas: t2 = 1.0 - 0.2 = 0.8; t1 = -0.2 + 0.5*0.2 - 0.3 = -0.4; t0 = 0.1 + 0.5*0.3 - 0.5 = -0.25
    # A2 = 0.8; A1 = -0.4 + 0.25*0.8 = -0.2; A0 = -0.25 + 0.25*(-0.2) = -0.3
    torch.testing.assert_close(adv, t([[-0.3, -0.2, 0.8, 0]]))


def test_padding_gets_zero_advantage_and_does_not_leak():
    torch.manual_seed(2)
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    lengths = [6, 4, 1, 3]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.9)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    # Changing what sits in padding changes nothing.
    noisy_r = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    noisy_v = torch.where(mask, values, torch.full_like(values, float("nan")))
    adv2, ret2 = gae_advantages(noisy_r, noisy_v, mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)
    # Each row equals GAE run on that row alone, truncated to its length.
    for b, n in enumerate(lengths):
        a_row, _ = gae_advantages(rewards[b : b + 1, :n], values[b : b + 1, :n], torch.ones(1, n), 1.0, 0.9)
        torch.testing.assert_close(adv[b, :n], a_row[0])
    # An interior hole is skipped: [r0, hole, r2] behaves as [r0, r2].
    hole, _ = gae_advantages(t([[1.0, PAD, 2.0]]), t([[0.5, PAD, 0.25]]), torch.tensor([[1, 0, 1]]), 1.0, 1.0)
    packed, _ = gae_advantages(t([[1.0, 2.0]]), t([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    torch.testing.assert_close(hole[0, [0, 2]], packed[0])


def test_reinforce_and_rloo_estimators():
    adv, ret = reinforce_advantages(REWARDS, None, MASK, gamma=1.0)
    torch.testing.assert_close(adv, t([[0.9, 0.8, 1.0, 0], [2.0, 2.0, 0, 0]]))
    torch.testing.assert_close(ret, adv)
    # One-token pages, groups {1,2,3} and {5,7}: baseline = mean of the other pages.
    # 1-(2+3)/2 = -1.5; 2-(1+3)/2 = 0; 3-(1+2)/2 = 1.5; 5-7 = -2; 7-5 = 2
    rewards = t([[1.0], [2.0], [3.0], [5.0], [7.0]])
    adv, _ = rloo_advantages(rewards, None, torch.ones(5, 1), group_ids=torch.tensor([4, 4, 4, 9, 9]))
    torch.testing.assert_close(adv[:, 0], t([-1.5, 0.0, 1.5, -2.0, 2.0]))
    # Longer pages: the whole page's return is the advantage on every real token.
    adv, _ = rloo_advantages(REWARDS, None, MASK, group_ids=torch.tensor([0, 0]))
    # page returns 0.9 and 2.0 -> 0.9-2.0 = -1.1, 2.0-0.9 = 1.1
    torch.testing.assert_close(adv, t([[-1.1, -1.1, -1.1, 0], [1.1, 1.1, 0, 0]]))
    with pytest.raises(ValueError, match="single page"):
        rloo_advantages(rewards, None, torch.ones(5, 1), group_ids=torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="needs group_ids"):
        rloo_advantages(rewards, None, torch.ones(5, 1))


def test_grpo_standardises_each_page_within_its_group():
    # Groups {1,2,3}: mean 2, sample std 1 -> -1, 0, 1. {5,7}: mean 6, std sqrt(2) -> -/+0.7071.
    rewards = t([[1.0], [2.0], [3.0], [5.0], [7.0]])
    adv, ret = grpo_advantages(rewards, None, torch.ones(5, 1), group_ids=torch.tensor([4, 4, 4, 9, 9]))
    torch.testing.assert_close(adv[:, 0], t([-1.0, 0.0, 1.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, rewards)
    # Multi-token pages: the whole page return (0.9 vs 2.0, std 0.7778) on every real token, 0 on padding.
    adv, _ = grpo_advantages(REWARDS, None, MASK, group_ids=torch.tensor([0, 0]))
    z = 1.1 / 2 / (1.1 / math.sqrt(2))
    torch.testing.assert_close(adv, t([[-z, -z, -z, 0], [z, z, 0, 0]]), atol=1e-5, rtol=0)
    # A group whose pages tie gets no push either way.
    adv, _ = grpo_advantages(t([[2.0], [2.0]]), None, torch.ones(2, 1), group_ids=torch.tensor([0, 0]))
    assert adv.abs().max() == 0
    with pytest.raises(ValueError, match="single page"):
        grpo_advantages(rewards, None, torch.ones(5, 1), group_ids=torch.tensor([0, 0, 1, 1, 2]))


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_estimators_compare_rewards_and_add_the_kl_penalty_unscaled(estimator):
    # Two pages of one prompt tie on reward (1.0) but pay different KL penalties: 2 tokens,
    # -0.1 and -0.3 on the first token of page 0; -0.2 on the first of page 1. The reward
    # comparison is 0 for both; each token's advantage is only its own KL penalty to go.
    seq = t([1.0, 1.0])
    rewards = t([[-0.1, -0.3 + 1.0], [-0.2, 1.0]])
    adv, _ = estimator(rewards, None, torch.ones(2, 2), group_ids=torch.tensor([0, 0]), seq_reward=seq)
    torch.testing.assert_close(adv, t([[-0.4, -0.3], [-0.2, 0.0]]), atol=1e-6, rtol=0)
    # Different rewards (0 and 2), no KL: grpo gives -/+ 1/sqrt(2), rloo -/+ 2.
    adv, _ = estimator(t([[0.0, 0.0], [0.0, 2.0]]), None, torch.ones(2, 2), group_ids=torch.tensor([0, 0]),
                       seq_reward=t([0.0, 2.0]))
    want = 1 / math.sqrt(2) if estimator is grpo_advantages else 2.0
    torch.testing.assert_close(adv, t([[-want, -want], [want, want]]), atol=1e-5, rtol=0)


def test_hit_ndcg_by_hand():
    d = [1.0, 1 / math.log2(3), 0.5]  # discounts of positions 1..3
    # Page [5, 1, 2] against {1, 9}: hit at position 2; ideal fills 2 positions.
    # Page [3, 4, 7] against {3, 4, 7, 8}: all hit; ideal 3 positions -> 1.
    # A repeat counts once; an empty target set scores 0.
    got = hit_ndcg([[5, 1, 2], [3, 4, 7], [1, 1, 2], [1, 2, 3]], [[1, 9], [3, 4, 7, 8], [1], []], k=3)
    np.testing.assert_allclose(got, [d[1] / (d[0] + d[1]), 1.0, 1.0, 0.0], rtol=1e-6)
    assert hit_ndcg([[1, 2, 3, 4]], [[4]], k=3)[0] == 0  # past k does not count
    with pytest.raises(ValueError, match="2 pages but 1"):
        hit_ndcg([[1], [2]], [[1]], k=3)


def test_adaptive_kl_beta_moves_toward_the_target_and_clips_the_error():
    # kl 2x the target: error clipped to +0.2; 64 of 10,000 pages -> beta x (1 + 0.2 * 0.0064)
    assert adaptive_kl_beta(0.1, 2.0, 1.0, 64, 10_000) == pytest.approx(0.1 * (1 + 0.2 * 0.0064))
    assert adaptive_kl_beta(0.1, 0.9, 1.0, 100, 100) == pytest.approx(0.1 * 0.9)  # error -0.1, full horizon
    assert adaptive_kl_beta(0.1, 1.0, 1.0, 64, 100) == pytest.approx(0.1)  # on target: unchanged
    with pytest.raises(ValueError):
        adaptive_kl_beta(0.1, 1.0, 0.0, 64, 100)


# ----------------------------------------------------------------------------- losses


def _ratios_to_logprobs(ratios):
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    new = torch.log(t([ratios])).requires_grad_(True)
    return new, old


def test_clipped_loss_equals_unclipped_inside_the_trust_region():
    new, old = _ratios_to_logprobs([1.1, 0.9])
    adv = t([[1.0, -1.0]])
    loss, stats = clipped_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    # mean(-1*1.1, +1*0.9) = -0.1; nothing clipped
    assert loss.item() == pytest.approx(-0.1)
    assert stats["clipfrac"] == 0.0
    loss.backward()
    # d/dlogp of -A*exp(logp) = -A*ratio, averaged over 2 tokens: [-1.1/2, 0.9/2]
    torch.testing.assert_close(new.grad, t([[-0.55, 0.45]]))


def test_clipped_loss_clips_outside_with_zero_gradient():
    new, old = _ratios_to_logprobs([1.5, 0.5, 0.5, 1.5])
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = clipped_policy_loss(new, old, adv, torch.ones(1, 4), clip=0.2)
    # per token max(-A r, -A clip(r)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: pessimistic side)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8 (clipped, no gradient)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5 (unclipped)
    # mean = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approx_kl"] > 0
    loss.backward()
    # gradients -A*r/4: [0, -0.5/4, 0, 1.5/4]
    torch.testing.assert_close(new.grad, t([[0.0, -0.125, 0.0, 0.375]]))


def test_dual_clip_caps_negative_advantage_tokens():
    new, old = _ratios_to_logprobs([5.0, 1.5])
    adv = t([[-1.0, 1.0]])
    loss, stats = dual_clip_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2, clip_c=3.0)
    # A=-1, r=5: ppo max(5, 1.2) = 5, capped at -A*c = 3; A=+1, r=1.5: -1.2 -> mean (3 - 1.2)/2 = 0.9
    assert loss.item() == pytest.approx(0.9)
    assert stats["clipfrac"] == 1.0
    plain, _ = clipped_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    assert plain.item() == pytest.approx(1.9)  # (5 - 1.2) / 2


def test_policy_loss_ignores_padding():
    new, old = _ratios_to_logprobs([1.1, 1e3])  # the padding token's ratio is absurd
    loss, _ = clipped_policy_loss(new, old, t([[1.0, float("nan")]]), torch.tensor([[1, 0]]), clip=0.2)
    assert loss.item() == pytest.approx(-1.1)
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 1] == 0


def test_clipped_value_loss():
    values = t([[1.5, 1.1, 0.5]]).requires_grad_(True)
    old, returns = torch.ones(1, 3, dtype=torch.float64), torch.full((1, 3), 2.0, dtype=torch.float64)
    loss, stats = clipped_value_loss(values, old, returns, torch.ones(1, 3), value_clip=0.2)
    # V=1.5: unclipped (1.5-2)^2 = 0.25, clipped V=1.2 -> 0.64; max 0.64 (clipped)
    # V=1.1: inside the clip -> 0.81
    # V=0.5: unclipped 2.25, clipped V=0.8 -> 1.44; max 2.25
    # 0.5 * (0.64 + 0.81 + 2.25) / 3 = 0.616667
    assert loss.item() == pytest.approx(0.5 * 3.7 / 3)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # clipped token has no gradient; others 0.5*2*(V-R)/3: (1.1-2)/3 = -0.3, (0.5-2)/3 = -0.5
    torch.testing.assert_close(values.grad, t([[0.0, -0.3, -0.5]]))
    plain, _ = clipped_value_loss(values, old, returns, torch.ones(1, 3), value_clip=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.81 + 2.25) / 3)


def test_entropy_is_finite_with_constrained_logits():
    ninf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 0.0, ninf, ninf], [0.0, 0.0, 0.0, 0.0], [ninf, ninf, ninf, ninf]]], requires_grad=True
    )
    ent = token_entropy(logits)
    # two allowed tokens: log 2; uniform over 4: log 4; every token forbidden: 0
    torch.testing.assert_close(ent, torch.tensor([[math.log(2), math.log(4), 0.0]]))
    mean = entropy_from_logits(logits, torch.tensor([[1, 1, 0]]))
    assert mean.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    peaked = torch.tensor([[[5.0, 0.0, ninf, ninf]]], requires_grad=True)
    entropy_from_logits(peaked, torch.ones(1, 1)).backward()
    assert torch.isfinite(peaked.grad).all() and peaked.grad[0, 0, 0] < 0  # sharpening lowers entropy
    mean.backward()
    assert torch.isfinite(logits.grad).all()


def test_logprobs_from_logits():
    logits = torch.tensor([[[2.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]]])
    lp = logprobs_from_logits(logits, torch.tensor([[0, 2]]))
    # log(e^2 / (e^2 + 1)) = -0.126928; log(1/3)
    torch.testing.assert_close(lp, torch.tensor([[2.0 - math.log(math.exp(2) + 1), -math.log(3)]]))


# ----------------------------------------------------------------------------- registries and value head


def test_registries_resolve_config_defaults_and_name_unknowns():
    cfg = PPOConfig()
    assert get_advantage(cfg.advantage) is gae_advantages
    assert get_policy_loss(cfg.policy_loss) is clipped_policy_loss
    assert get_kl_estimator("k3") is KL_ESTIMATORS["k3"]
    assert {"gae", "reinforce", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
    assert {"clipped", "dual_clip"} <= set(POLICY_LOSSES)
    with pytest.raises(KeyError, match=r"unknown advantage estimator 'grpoo'; known: gae, grpo, reinforce, rloo"):
        get_advantage("grpoo")
    with pytest.raises(KeyError, match="known: clipped, dual_clip"):
        get_policy_loss("ppo2")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("gae")(lambda *a, **k: None)


def test_every_advantage_estimator_takes_the_shared_signature():
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv, ret = fn(REWARDS, VALUES, MASK, gamma=1.0, lam=0.95, group_ids=torch.tensor([0, 0]))
        assert adv.shape == ret.shape == REWARDS.shape, name
        assert torch.all(adv[MASK == 0] == 0), name


def test_value_head_shapes_init_and_saved_file(tmp_path):
    torch.manual_seed(0)
    head = ValueHead(64, dropout=0.1)
    assert head.summary.weight.std().item() == pytest.approx(1 / math.sqrt(65), rel=0.3)
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    head.eval()
    out = head(hidden)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    path = head.save(tmp_path / "ckpt")
    assert path.name == VALUE_HEAD_FILE
    saved = load_file(str(path))
    assert saved.keys() == head.state_dict().keys()
    for name, tensor in head.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"hidden_size": "64", "dropout": "0.1"}
    with pytest.raises(ValueError, match="hidden size"):
        head(torch.randn(1, 2, 8))


# ----------------------------------------------------------------------------- end to end


def test_ppo_on_a_one_step_bandit_raises_the_rewarded_action():
    """Categorical policy over 5 actions, reward 1 for action 3: PPO with these functions
    (KL to the uniform reference, reward normalisation, GAE, whitening, clipped losses)
    must move most of the probability onto action 3."""
    torch.manual_seed(0)
    n_actions, batch, good = 5, 64, 3
    policy_logits = torch.nn.Parameter(torch.zeros(n_actions))
    value = torch.nn.Parameter(torch.zeros(()))
    ref_logits = torch.zeros(n_actions)  # frozen "SFT" reference: uniform
    opt = torch.optim.Adam([policy_logits, value], lr=0.05)
    moments, mask = RunningMoments(), torch.ones(batch, 1)
    cfg = PPOConfig()
    for _ in range(12):
        with torch.no_grad():
            actions = torch.distributions.Categorical(logits=policy_logits).sample((batch, 1))
            old_logp = logprobs_from_logits(policy_logits.expand(batch, 1, n_actions), actions)
            ref_logp = logprobs_from_logits(ref_logits.expand(batch, 1, n_actions), actions)
            old_values = value.expand(batch, 1).clone()
        page_reward = (actions[:, 0] == good).float()
        moments.update(page_reward)
        rewards, _ = token_rewards(moments.normalize(page_reward), old_logp, ref_logp, mask, cfg.kl_beta, "k1")
        adv, ret = get_advantage(cfg.advantage)(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        adv = masked_whiten(adv, mask)
        for _ in range(4):
            logits = policy_logits.expand(batch, 1, n_actions)
            logp = logprobs_from_logits(logits, actions)
            pg, stats = get_policy_loss(cfg.policy_loss)(logp, old_logp, adv, mask, cfg.clip)
            vf, _ = clipped_value_loss(value.expand(batch, 1), old_values, ret, mask, cfg.value_clip)
            loss = pg + cfg.vf_coef * vf - 0.01 * entropy_from_logits(logits, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert 0.0 <= stats["clipfrac"] <= 1.0
    p_good = torch.softmax(policy_logits.detach(), -1)[good].item()
    assert p_good > 0.6, f"P(rewarded action) = {p_good:.3f}, started at 0.2"
