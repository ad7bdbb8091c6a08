"""Logit adjustment (sft.logit_adjust): the offsets, the item losses that train on them, and
the config check. Plain math, no Ray."""

import math

import pytest
import torch

from pagellm.config import ConfigError, load_config
from pagellm.models.policy import build_policy
from pagellm.models.positions import prompt_anchor
from pagellm.train.logit_adjust import adjusted, popularity_offsets
from pagellm.train.sft_rows import collate, history_rows, page_rows
from pagellm.vocab import PromptEncoder, Vocab

TINY = ["model.init.n_layer=1", "model.init.n_embd=32", "model.ranking_prior=0"]


def test_offsets_are_tau_times_log_one_plus_the_training_count():
    offsets = popularity_offsets([[0, 1, 1], [1, 2]], n_items=4, tau=0.5)
    assert offsets.tolist() == pytest.approx([0.5 * math.log(2), 0.5 * math.log(4), 0.5 * math.log(2), 0.0])
    assert popularity_offsets([[0, 1]], n_items=2, tau=0.0) is None  # off: the losses stay as they were
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        popularity_offsets([[0, 5]], n_items=2, tau=1.0)


def test_adjusted_item_loss_is_the_loss_on_shifted_logits_and_favours_rare_targets():
    """With offsets the loss is the plain loss of logits + offsets; a rare target's loss
    rises (the logits must make up the popularity the offset no longer gives it) and a
    popular target's falls."""
    from pagellm.train.sft import item_token_loss

    vocab = Vocab.build(["u0"], [f"i{i}" for i in range(6)])
    model, tok, layout = build_policy(load_config(None, TINY).model, vocab, seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)

    def loss(target, offsets):
        batch = collate(page_rows(enc, [0], [[0, 1]], [[target]], 0.0, 0), layout.pad_id, anchor=prompt_anchor(model))
        return float(item_token_loss(model, batch, layout, offsets=offsets))

    popular = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0])  # item 5 popular, the rest rare
    assert loss(2, None) == pytest.approx(loss(2, torch.zeros(6)))
    assert loss(2, popular) > loss(2, None)
    assert loss(5, popular) < loss(5, None)
    assert adjusted(torch.zeros(2, 6), popular)[1].tolist() == popular.tolist()


def test_ranking_kl_carries_the_offsets_on_both_sides():
    """A student identical to its teacher has zero KL at the positions the teacher is read at
    (a one-item page's first position, every history position) with offsets too: the
    teacher's distribution is read with the same offsets the student trains with."""
    from pagellm.train.sft import item_loss_with_ranking

    vocab = Vocab.build(["u0"], [f"i{i}" for i in range(6)])
    model, tok, layout = build_policy(load_config(None, TINY).model, vocab, seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    rows = page_rows(enc, [0], [[0, 1]], [[2]], 0.0, 0, page_loss="set") + history_rows(enc, [0], [[4, 0, 1]], 50)
    batch = collate(rows, layout.pad_id, anchor=prompt_anchor(model))
    offsets = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0, 3.0])
    _, extra = item_loss_with_ranking(model, model, batch, layout, 1.0, replayed=True, offsets=offsets)
    assert extra["rank_kl"] == pytest.approx(0.0, abs=1e-6) and extra["replay_kl"] == pytest.approx(0.0, abs=1e-6)


def test_logit_adjust_needs_the_item_loss():
    with pytest.raises(ConfigError, match="logit_adjust"):
        load_config(None, ["sft.logit_adjust=0.3", "sft.item_loss=false"])
    with pytest.raises(ConfigError):
        load_config(None, ["sft.logit_adjust=-0.1"])
    assert load_config(None, ["sft.logit_adjust=0.3"]).sft.logit_adjust == 0.3
