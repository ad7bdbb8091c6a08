"""Reward model: Bradley–Terry arithmetic, padding/length invariance, fine-head gradients,
head ablation, save/load and the scoring API (tiny GPT-2 / Llama, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagellm.config import ModelConfig
from pagellm.models.policy import build_policy, save_policy
from pagellm.models.reward import (
    RewardModel,
    load_reward_model,
    pad_pages,
    reward_model_from_policy,
    save_reward_model,
)
from pagellm.models.reward_scorer import RewardScorer
from pagellm.train.engine import weight_decay_groups
from pagellm.train.reward_loss import (accuracy_by_family, bradley_terry_loss, multi_head_loss, pair_accuracy,
                                       pair_losses)
from pagellm.vocab import PromptEncoder, Vocab

GPT2 = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
LLAMA = {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 64}


def tiny_policy(arch="gpt2", lora=False):
    cfg = ModelConfig(arch=arch, init=GPT2 if arch == "gpt2" else LLAMA,
                      lora={"enabled": lora, "r": 2, "alpha": 4, "dropout": 0.0})
    vocab = Vocab.build([f"u{n}" for n in range(4)], [f"i{n:02d}" for n in range(20)])
    return build_policy(cfg, vocab, seed=0)


def reward_model(heads=("coarse", "fine"), arch="gpt2", lora=False, seed=0):
    policy, tokenizer, layout = tiny_policy(arch, lora)
    torch.manual_seed(seed)
    return RewardModel(policy, heads, slots=10).eval(), tokenizer, layout


def rows(layout, pages, user=1, history=(2, 3, 4)):
    enc = PromptEncoder(None, layout)
    return [(enc.encode_prompt(user, history), enc.encode_page(page)) for page in pages]


# ----------------------------------------------------------------------------- loss math


def test_bradley_terry_loss_matches_hand_arithmetic():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    loss = bradley_terry_loss(chosen, rejected)
    # -log σ(2) = log(1 + e^-2) = 0.126928; -log σ(0) = log 2 = 0.693147; -log σ(-2) = 2.126928
    assert loss.item() == pytest.approx((0.126928 + 0.693147 + 2.126928) / 3, abs=1e-5)
    loss.backward()
    # d/dchosen_i = -(1 - σ(Δ_i)) / B: the pair the model gets most wrong pulls hardest.
    expected = [-(1 - 1 / (1 + math.exp(-d))) / 3 for d in (2.0, 0.0, -2.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_multi_head_loss_sums_each_head_and_reports_accuracy():
    chosen = {"coarse": torch.tensor([1.0, 0.0]), "fine": torch.tensor([0.0, 3.0])}
    rejected = {"coarse": torch.tensor([0.0, 1.0]), "fine": torch.tensor([0.0, 0.0])}
    loss, extras = multi_head_loss(chosen, rejected)
    coarse = bradley_terry_loss(chosen["coarse"], rejected["coarse"])
    fine = bradley_terry_loss(chosen["fine"], rejected["fine"])
    assert loss.item() == pytest.approx((coarse + fine).item())
    assert extras["acc_coarse"] == 0.5 and extras["acc_fine"] == 0.5  # fine's first pair is a tie: wrong
    assert extras["acc_sum"] == 1.0  # sums: 1 > 0 and 3 > 1
    with pytest.raises(ValueError, match="heads differ"):
        multi_head_loss({"coarse": torch.zeros(1)}, {"fine": torch.zeros(1)})


def test_a_pair_with_a_margin_regresses_it_and_one_without_keeps_bradley_terry():
    chosen = torch.tensor([2.0, 1.0, 0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.0])
    margin = torch.tensor([float("nan"), 3.0, 0.5])
    losses = pair_losses(chosen, rejected, margin)
    # -log σ(2); ½ (1 - 3)²; ½ (0.5 - 0.5)²
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-2.0)), 2.0, 0.0], abs=1e-6)
    losses.sum().backward()
    # A pair short of its margin is pulled up, one at its margin not at all (BT would still push it).
    assert chosen.grad.tolist() == pytest.approx([-(1 - 1 / (1 + math.exp(-2.0))), -2.0, 0.0], abs=1e-6)
    assert pair_losses(chosen, rejected).tolist() == pytest.approx(
        [-math.log(1 / (1 + math.exp(-d))) for d in (2.0, 1.0, 0.5)], abs=1e-6)  # no margins: BT
    loss, _ = multi_head_loss({"coarse": chosen}, {"coarse": rejected}, margin)
    assert loss.item() == pytest.approx(losses.mean().item())


def test_accuracy_by_family():
    acc = accuracy_by_family([1, 2, 0, 5], [0, 3, 1, 1], ["ranking", "ranking", "diversity", "diversity"])
    assert acc == {"ranking": 0.5, "diversity": 0.5}
    assert pair_accuracy(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == 0.5


# ----------------------------------------------------------------------------- masking


def test_pad_pages_marks_only_page_items():
    _, _, layout = reward_model()
    batch = pad_pages(rows(layout, [[5, 6], [7, 8, 9, 10]]), layout)
    ids, items = batch["input_ids"], batch["item_mask"]
    assert items.sum(-1).tolist() == [2, 4]  # prompt items and eos are not page items
    assert (ids[items] - layout.item_offset).tolist() == [5, 6, 7, 8, 9, 10]
    assert batch["attention_mask"][0].sum() == ids.shape[1] - 2  # two pad columns on the right
    with pytest.raises(ValueError, match="must end with eos"):
        pad_pages([([1, 2], [layout.item_offset])], layout)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_and_batch_mates_do_not_change_scores(arch):
    model, _, layout = reward_model(arch=arch)
    short, long = rows(layout, [[5, 6, 7], [1, 2, 3, 4, 8, 9, 10, 11, 12, 13]], history=(2, 3))
    alone = model(**pad_pages([short], layout))
    mixed = model(**pad_pages([short, long], layout))  # short row right-padded by 7 columns
    # The same row left-padded: positions come from the mask, so the scores are the same.
    right = pad_pages([short, long], layout)
    shift = right["attention_mask"][0].numel() - right["attention_mask"][0].sum()
    left = {k: torch.roll(v[:1], int(shift), dims=1) for k, v in right.items()}
    lefty = model(**left)
    for got in (mixed, lefty):
        assert torch.allclose(got.coarse[0], alone.coarse[0], atol=1e-5)
        assert torch.allclose(got.fine[0], alone.fine[0], atol=1e-5)
    # R_f is a mean over real items: garbage written into the padding changes nothing.
    dirty = pad_pages([short, long], layout)
    dirty["input_ids"][0, dirty["attention_mask"][0] == 0] = layout.item_offset + 3
    assert torch.allclose(model(**dirty).fine[0], alone.fine[0], atol=1e-5)


def test_fine_score_is_the_mean_of_per_item_scores():
    model, _, layout = reward_model()
    out = model(**pad_pages(rows(layout, [[5, 6, 7], [1, 2, 3, 4, 8]]), layout))
    assert torch.allclose(out.fine, out.per_item.sum(-1) / torch.tensor([3.0, 5.0]), atol=1e-6)


def test_fine_logit_term_is_the_policys_logit_for_each_page_item():
    model, _, layout = reward_model(heads=("fine",), arch="llama")  # untied output layer
    batch = pad_pages(rows(layout, [[5, 6, 7], [1, 2, 3, 4, 8]]), layout)
    with torch.no_grad():
        model.fine.slot_weight.zero_()  # leave only g · ℓ, with g = 1 at init
        per_item = model(**batch).per_item
        logits = model.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, items = batch["input_ids"], batch["item_mask"]
    # The item at column t was predicted by the logits at column t - 1.
    want = torch.zeros_like(per_item)
    want[:, 1:] = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * items[:, 1:]
    assert torch.allclose(per_item, want, atol=1e-5)


def test_without_the_logit_term_the_fine_head_reads_only_hidden_states(tmp_path):
    """reward.logit_term=false: the gain is a fixed 0, not a parameter, and survives a save;
    R_f is then exactly the per-slot readout of h[k], whatever the output layer says."""
    policy, tokenizer, layout = tiny_policy("llama")  # untied output layer: changing it leaves h alone
    torch.manual_seed(0)
    model = RewardModel(policy, ("fine",), slots=10, logit_term=False).eval()
    assert "fine.logit_gain" not in dict(model.named_parameters()) and "fine.logit_gain" in model.state_dict()
    batch = pad_pages(rows(layout, [[5, 6, 7], [1, 2, 3, 4, 8]]), layout)
    with torch.no_grad():
        before = model(**batch).fine
        policy.get_output_embeddings().weight.mul_(3.0)
        assert torch.equal(model(**batch).fine, before)
    save_reward_model(model, tokenizer, layout, tmp_path / "reward")
    again = RewardScorer.load(tmp_path / "reward").model
    assert again.fine.logit_term is False and torch.equal(again.fine.logit_gain, torch.zeros(10))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).fine, before)
    # With the term (the default) the same change to the output layer moves R_f.
    torch.manual_seed(0)
    with_term = RewardModel(tiny_policy("llama")[0], ("fine",), slots=10).eval()
    with torch.no_grad():
        first = with_term(**batch).fine
        with_term.policy.get_output_embeddings().weight.mul_(3.0)
        assert not torch.allclose(with_term(**batch).fine, first)


def test_fine_head_gives_a_gradient_for_one_misplaced_item():
    model, _, layout = reward_model(heads=("fine",))
    model.train()
    # Same items, one moved (slot 3 -> slot 1): a ranking-style pair.
    batch = pad_pages(rows(layout, [[5, 6, 7, 8, 9], [5, 8, 6, 7, 9]]), layout)
    model.zero_grad()
    scores = model(**batch)
    loss, _ = multi_head_loss({"fine": scores.fine[:1]}, {"fine": scores.fine[1:]})
    loss.backward()
    grad = model.fine.slot_weight.grad.abs().sum(-1)
    assert (grad[1:4] > 0).all()  # the slots whose items (or their context) changed learn
    assert (grad[5:] == 0).all()  # slots past the 5-item page get nothing
    emb = model.policy.get_input_embeddings().weight.grad
    assert emb[layout.item_offset + 8].abs().sum() > 0  # the misplaced item's token learns too
    # Per-item scores agree up to the first changed slot (a causal backbone) and differ after.
    model.eval()
    with torch.no_grad():
        per = model(**batch).per_item
    first = batch["item_mask"][0].nonzero()[0].item()
    assert torch.allclose(per[0, first], per[1, first])
    assert not torch.allclose(per[0, first + 1], per[1, first + 1])


# ----------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("heads,absent", [(("coarse",), "fine"), (("fine",), "coarse")])
def test_a_disabled_head_has_no_parameters(heads, absent):
    model, _, _ = reward_model(heads=heads)
    both, _, _ = reward_model()
    assert getattr(model, absent) is None and model.heads == heads
    assert not any(name.startswith(absent + ".") for name, _ in model.named_parameters())
    trained = sum(p.numel() for g in weight_decay_groups(model, 0.0) for p in g["params"])
    missing = sum(p.numel() for p in getattr(both, absent).parameters())
    assert trained == sum(p.numel() for g in weight_decay_groups(both, 0.0) for p in g["params"]) - missing


def test_untied_output_layer_is_frozen():
    model, _, _ = reward_model(arch="llama")
    assert not model.policy.get_output_embeddings().weight.requires_grad
    assert model.policy.get_input_embeddings().weight.requires_grad


# ----------------------------------------------------------------------------- save, load, scoring


@pytest.mark.parametrize("heads", [("coarse", "fine"), ("coarse",)])
def test_save_load_and_scorer_match_the_model(tmp_path, heads):
    model, tokenizer, layout = reward_model(heads=heads)
    with torch.no_grad():
        if model.fine is not None:
            model.fine.slot_weight.uniform_(-0.5, 0.5)  # slots that differ must survive the round trip
    save_reward_model(model, tokenizer, layout, tmp_path / "reward")
    scorer = RewardScorer.load(tmp_path / "reward")
    assert scorer.heads == heads
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.model.training
    pages = [[5, 6, 7], [9, 1], [10, 11, 12, 13, 14, 15]]
    users, histories = [1, None, 3], [[2, 3], [4], [5, 6, 7, 8]]
    r_c, r_f = scorer.score(users, histories, pages, batch_size=2)
    enc = PromptEncoder(None, layout)
    with torch.no_grad():
        direct = model(**pad_pages([(enc.encode_prompt(u, h), enc.encode_page(p))
                                    for u, h, p in zip(users, histories, pages)], layout))
    np.testing.assert_allclose(r_c, direct.coarse.numpy(), atol=1e-5)
    if "fine" in heads:
        np.testing.assert_allclose(r_f, direct.fine.numpy(), atol=1e-5)
    else:
        assert (r_f == 0).all()  # a disabled head scores zero, so R_c + R_f = R_c


def test_save_from_a_gathered_state_dict(tmp_path):
    """The trainer hands save_fn the full weights (ZeRO-3 shards are empty on the module)."""
    model, tokenizer, layout = reward_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # what the module would hold if its weights lived elsewhere
    save_reward_model(model, tokenizer, layout, tmp_path / "r", state_dict=state)
    loaded, _, _ = load_reward_model(tmp_path / "r")
    assert torch.equal(loaded.coarse.linear.weight, state["coarse.linear.weight"])
    assert torch.equal(loaded.policy.get_input_embeddings().weight, state["policy.transformer.wte.weight"])


def test_score_tokens_accepts_rollout_shaped_ids(tmp_path):
    model, tokenizer, layout = reward_model()
    save_reward_model(model, tokenizer, layout, tmp_path / "reward")
    scorer = RewardScorer.load(tmp_path / "reward")
    enc = PromptEncoder(None, layout)
    expected = scorer.score([1, 2], [[2, 3, 4], [5]], [[6, 7, 8], [9, 10]])
    prompts = [enc.encode_prompt(1, [2, 3, 4]), enc.encode_prompt(2, [5])]
    width = max(map(len, prompts))
    left_padded = torch.tensor([[layout.pad_id] * (width - len(p)) + p for p in prompts])
    responses = torch.tensor([
        enc.encode_page([6, 7, 8]),
        enc.encode_page([9, 10]) + [layout.pad_id],  # ended early, padded after its eos
    ])
    got = scorer.score_tokens(left_padded, responses)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)
    no_eos = scorer.score_tokens([prompts[0]], [[layout.item_offset + i for i in (6, 7, 8)]])
    np.testing.assert_allclose(no_eos[0], expected[0][:1], atol=1e-5)
    with pytest.raises(ValueError, match="non-item tokens"):
        scorer.score_tokens([prompts[0]], [[layout.user_offset, layout.eos_id]])
    with pytest.raises(ValueError, match="index out of range"):
        scorer.score([1], [[2]], [[99]])


def test_lora_backbone_trains_and_round_trips(tmp_path):
    policy, tokenizer, layout = tiny_policy("llama", lora=True)
    save_policy(policy, tokenizer, layout, tmp_path / "sft")
    torch.manual_seed(0)
    model, tokenizer, layout = reward_model_from_policy(tmp_path / "sft", ("coarse", "fine"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("coarse.") for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)  # the base stays frozen
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter matter, so a lost adapter would show
    save_reward_model(model.eval(), tokenizer, layout, tmp_path / "reward")
    batch = pad_pages(rows(layout, [[5, 6, 7]]), layout)
    with torch.no_grad():
        want = model(**batch)
    loaded, _, _ = load_reward_model(tmp_path / "reward")
    with torch.no_grad():
        got = loaded(**batch)
    assert torch.allclose(got.coarse, want.coarse, atol=1e-5) and torch.allclose(got.fine, want.fine, atol=1e-5)
