"""Position schemes: by-hand position ids, and the same positions in SFT, decoding, teacher
forcing and the reward model, with the scheme travelling inside the checkpoint."""

import pytest
import torch

from pagellm.config import ModelConfig
from pagellm.models.decoding import constrained_logprobs, generate_pages
from pagellm.models.policy import build_policy, load_policy, save_policy
from pagellm.models.positions import check_context, position_ids, prompt_anchor, prompt_room
from pagellm.train.sft import item_token_loss
from pagellm.train.sft_rows import collate, page_rows
from pagellm.vocab import PromptEncoder, Vocab

HISTORIES = [[1, 2], [3, 4, 5, 6], [7]]


def anchored_policy(positions="prompt_end"):
    vocab = Vocab.build([f"u{n}" for n in range(4)], [f"i{n:02d}" for n in range(20)])
    cfg = ModelConfig(init={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}, positions=positions)
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    return model.eval(), tok, layout, PromptEncoder(tok, layout)


def test_position_ids_by_hand():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(left, [3, 5], None).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # Prompt of 2 real tokens then a page token: the page token lands on the anchor (10).
    assert position_ids(left, [2, 4], 10).tolist() == [[0, 0, 8, 9, 10], [6, 7, 8, 9, 10]]
    right = torch.tensor([[1, 1, 1, 0]])
    assert position_ids(right, [1], 10).tolist() == [[9, 10, 11, 0]]


def test_the_anchor_is_half_the_context_and_survives_save_and_load(tmp_path):
    model, tok, layout, _ = anchored_policy()
    assert prompt_anchor(model) == 32
    save_policy(model, tok, layout, tmp_path / "p")
    again, _, _ = load_policy(tmp_path / "p", trainable=False)
    assert prompt_anchor(again) == 32
    assert prompt_anchor(anchored_policy("start")[0]) is None


def test_context_checks_follow_the_scheme():
    model, *_ = anchored_policy()
    assert prompt_room(model, 11) == 32  # prompts end at 32 whatever the page length
    check_context(model, 32, 32)
    with pytest.raises(ValueError, match="prompts end at position 32"):
        check_context(model, 33, 5)
    with pytest.raises(ValueError, match="64 positions"):
        check_context(model, 5, 33)
    start, *_ = anchored_policy("start")
    assert prompt_room(start, 11) == 53


def test_anchored_decoding_is_consistent_batched_cached_and_teacher_forced():
    model, _, layout, enc = anchored_policy()
    prompts = [enc.encode_prompt(u, h) for u, h in enumerate(HISTORIES)]
    exclude = [set(h) for h in HISTORIES]
    batch = generate_pages(model, layout, prompts, 4, exclude=exclude)
    for row, prompt in enumerate(prompts):
        # No cache, no padding, positions written out: prompt ends at anchor - 1.
        seq, items = list(prompt), []
        for _ in range(4):
            pos = torch.arange(len(seq)) + (32 - len(prompt))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq]), position_ids=pos[None]).logits[0, -1]
            allowed = [i for i in range(layout.n_items) if i not in items and i not in exclude[row]]
            best = allowed[int(logits[[layout.item_token(i) for i in allowed]].argmax())]
            items.append(best)
            seq.append(layout.item_token(best))
        assert batch.items[row] == items
    logp, _, _ = constrained_logprobs(model, layout, prompts, batch.response_ids, exclude, k=4)
    torch.testing.assert_close(logp, batch.logprobs, atol=1e-5, rtol=0)


def test_sft_rows_see_the_positions_decoding_uses():
    model, _, layout, enc = anchored_policy()
    prompts, pages = [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]]
    batch = collate(page_rows(enc, [0, 1], prompts, pages, 0.0, 0), layout.pad_id, anchor=prompt_anchor(model))
    item_logps = torch.cat([
        constrained_logprobs(model, layout, [enc.encode_prompt(u, p)], [enc.encode_page(page)], exclude=[p])[0][0, :-1]
        for u, p, page in zip([0, 1], prompts, pages)
    ])
    assert torch.allclose(item_token_loss(model, batch, layout), -item_logps.mean(), atol=1e-5)


def test_reward_model_scores_do_not_depend_on_padding_under_an_anchor():
    from pagellm.models.reward import RewardModel, pad_pages

    model, _, layout, enc = anchored_policy()
    reward = RewardModel(model, ("coarse", "fine")).eval()
    rows = [(enc.encode_prompt(u, h), enc.encode_page([10, 11, 12])) for u, h in enumerate(HISTORIES)]
    together = reward(**pad_pages(rows, layout))
    for n, row in enumerate(rows):
        alone = reward(**pad_pages([row], layout))
        torch.testing.assert_close(alone.coarse[0], together.coarse[n], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.fine[0], together.fine[n], atol=1e-5, rtol=0)
