"""Vocabulary table, tokenizer build/extend, and direct prompt encoding.

No hub access: the "pretrained" tokenizers are stand-ins trained here on a few sentences,
saved with save_pretrained and reloaded through AutoTokenizer like a downloaded one.
"""

from __future__ import annotations

import random
import time

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from pagellm.vocab import (
    PromptEncoder,
    TokenLayout,
    Vocab,
    build_tokenizer,
    check_layout,
    extend_tokenizer,
    load_tokenizer,
    render_page,
    render_prompt,
    save_tokenizer,
)

CORPUS = ["the user has interacted with these items : the user will interact with more"] * 5 + [
    "The user will interact with : yes , The user has interacted with : no"
] * 5


def gpt2_style_tokenizer(directory) -> GPT2TokenizerFast:
    """A byte-level BPE GPT2TokenizerFast built from vocab.json/merges.txt, as gpt2 ships."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = core.model.save(str(directory))
    tok = GPT2TokenizerFast(vocab_file=vocab_file, merges_file=merges_file)
    tok.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def llama_style_tokenizer(directory) -> PreTrainedTokenizerFast:
    """Llama-2-like: sentencepiece-style BPE (▁ normalizer, byte fallback), BOS prepended, no pad."""
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def small_vocab(n_users=5, n_items=40) -> Vocab:
    return Vocab.build([f"u{n}" for n in range(n_users)], [f"i{n:03d}" for n in range(n_items)])


def random_prompts(vocab: Vocab, count=20, seed=0):
    rng = random.Random(seed)
    out = [(0, [])]  # empty history: the template joins differently
    for _ in range(count):
        out.append((rng.randrange(vocab.n_users), [rng.randrange(vocab.n_items) for _ in range(rng.randrange(1, 8))]))
    return out


# --- Vocab -----------------------------------------------------------------------------


def test_vocab_build_is_sorted_deduplicated_and_indexed():
    vocab = Vocab.build(["b", "a", "b", 3], ["z", "x", "y", "x"])
    assert vocab.user_ids == ["3", "a", "b"] and vocab.item_ids == ["x", "y", "z"]
    assert (vocab.n_users, vocab.n_items) == (3, 3)
    assert vocab.user_index("a") == 1 and vocab.item_index("z") == 2 and vocab.item_index("nope") is None
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "a"], ["x"])


def test_vocab_parquet_round_trip_matches_the_data_contract(tmp_path):
    vocab = small_vocab()
    vocab.to_parquet(tmp_path / "vocab.parquet")
    frame = pd.read_parquet(tmp_path / "vocab.parquet")
    assert list(frame.columns) == ["kind", "raw_id", "index", "token"]
    assert frame.loc[frame["kind"] == "item", "token"].iloc[3] == "<item_3>"
    assert Vocab.from_parquet(tmp_path / "vocab.parquet") == vocab
    # Rows may come in any order; indices decide.
    assert Vocab.from_frame(frame.sample(frac=1.0, random_state=0)) == vocab
    broken = frame[frame["token"] != "<item_5>"]
    with pytest.raises(ValueError, match="not dense"):
        Vocab.from_frame(broken)


# --- Local tokenizer ---------------------------------------------------------------------


def test_local_tokenizer_layout_and_template():
    vocab = small_vocab()
    tok, layout = build_tokenizer(vocab)
    assert len(tok) == layout.vocab_size == 3 + 8 + vocab.n_users + vocab.n_items
    assert tok.convert_tokens_to_ids("<item_7>") == layout.item_token(7) == layout.item_offset + 7
    assert layout.token_to_item(layout.item_offset + 39) == 39
    assert layout.token_to_item(layout.item_offset + 40) is None and layout.token_to_item(layout.eos_id) is None
    t = torch.tensor([layout.eos_id, layout.item_offset, layout.item_offset + 39, layout.item_offset + 40])
    assert layout.is_item_token(t).tolist() == [False, True, True, False]
    assert layout.tokens_to_items(t).tolist() == [-1, 0, 39, -1]
    assert (layout.pad_id, layout.eos_id, layout.bos_id) == (0, 2, None)
    expected = "<user_7> has interacted with : <item_3> <item_91> The user will interact with :"
    assert render_prompt(7, [3, 91]) == expected
    assert render_page([12, 5]) == "<item_12> <item_5> <eos>"


@pytest.mark.parametrize("kind", ["local", "gpt2", "llama"])
def test_encode_prompt_equals_tokenizing_the_rendered_prompt(kind, tmp_path):
    vocab = small_vocab()
    if kind == "local":
        tok, layout = build_tokenizer(vocab)
    else:
        base = gpt2_style_tokenizer(tmp_path / "base") if kind == "gpt2" else llama_style_tokenizer(tmp_path / "base")
        n_base = len(base)
        tok, layout = extend_tokenizer(base, vocab)
        assert layout.user_offset == n_base and layout.item_offset == n_base + vocab.n_users
        assert layout.pad_id == layout.eos_id  # neither stand-in has a pad token
    assert layout.bos_id == (1 if kind == "llama" else None)
    enc = PromptEncoder(tok, layout)
    for user, items in random_prompts(vocab):
        ids = enc.encode_prompt(user, items)
        assert ids == tok(render_prompt(user, items))["input_ids"], (kind, user, items)
        # Items sit back to back: no whitespace token between them in a prompt either.
        n_items_in_ids = sum(layout.token_to_item(t) is not None for t in ids)
        assert n_items_in_ids == len(items)
    page = enc.encode_page([12, 5, 0])
    assert page == [layout.item_token(12), layout.item_token(5), layout.item_token(0), layout.eos_id]
    assert enc.decode_page(page + [layout.pad_id]) == [12, 5, 0]
    if kind == "local":  # only the word-level tokenizer has no space token before eos
        assert tok(render_page([12, 5, 0], layout.eos_text))["input_ids"] == page

    save_tokenizer(tok, layout, tmp_path / "saved")
    tok2, layout2 = load_tokenizer(tmp_path / "saved")
    assert layout2 == layout
    user, items = 3, [4, 0, 39]
    assert tok2(render_prompt(user, items))["input_ids"] == PromptEncoder(tok2, layout2).encode_prompt(user, items)


def test_encoder_rejects_out_of_range_indices():
    tok, layout = build_tokenizer(small_vocab())
    enc = PromptEncoder(tok, layout)
    with pytest.raises(ValueError, match="item index out of range"):
        enc.encode_prompt(0, [1, 40])
    with pytest.raises(ValueError, match="user index out of range"):
        enc.encode_prompt(5, [1])
    with pytest.raises(ValueError, match="not an item token"):
        enc.decode_page([layout.item_token(1), layout.user_offset])


def test_extending_twice_or_a_mismatched_layout_fails_loudly(tmp_path):
    vocab = small_vocab()
    tok, layout = extend_tokenizer(gpt2_style_tokenizer(tmp_path / "base"), vocab)
    with pytest.raises(ValueError, match="already holds"):
        extend_tokenizer(tok, vocab)
    wrong = TokenLayout(**{**layout.__dict__, "item_offset": layout.item_offset + 1})
    with pytest.raises(ValueError, match="does not match"):
        check_layout(tok, wrong)


def test_thirty_thousand_items_take_seconds(tmp_path):
    vocab = Vocab.build([f"u{n}" for n in range(2_000)], [f"i{n}" for n in range(30_000)])
    base = gpt2_style_tokenizer(tmp_path / "base")
    t0 = time.perf_counter()
    tok, layout = extend_tokenizer(base, vocab)
    extend_s = time.perf_counter() - t0
    save_tokenizer(tok, layout, tmp_path / "saved")
    tok2, layout2 = load_tokenizer(tmp_path / "saved")
    round_trip_s = time.perf_counter() - t0 - extend_s
    t1 = time.perf_counter()
    local, _ = build_tokenizer(vocab)
    local_s = time.perf_counter() - t1
    print(f"extend 32k tokens: {extend_s:.2f}s, save+load: {round_trip_s:.2f}s, local build: {local_s:.2f}s")
    assert extend_s < 10 and round_trip_s < 20 and local_s < 10
    assert layout2.item_offset + 29_999 == tok2.convert_tokens_to_ids("<item_29999>")
    ids = PromptEncoder(tok2, layout2).encode_prompt(1999, [29_999, 0])
    assert tok2(render_prompt(1999, [29_999, 0]))["input_ids"] == ids
