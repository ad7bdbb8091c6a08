"""The SFT stage: loss masks, and the real loop on 2 Ray Train workers under ZeRO-2 and ZeRO-3."""

import json

import pytest
import torch

from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import build_policy, load_policy
from pagellm.train.sft import IGNORE, history_rows, page_rows, run_sft_stage
from pagellm.vocab import PromptEncoder, Vocab

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "sft.batch_size=16", "sft.epochs=1", "sft.workers=2", "sft.log_every=1000"]


def encoder():
    vocab = Vocab.build([f"u{i}" for i in range(3)], [f"i{i}" for i in range(9)])
    _, tok, layout = build_policy(load_config(None, SMALL).model, vocab, seed=0)
    return PromptEncoder(tok, layout), layout


def test_page_rows_take_loss_on_the_page_only_and_add_user_free_copies():
    enc, layout = encoder()
    rows = page_rows(enc, [1, 2], [[0, 1], [2]], [[5, 6], [7]], user_dropout=1.0, seed=0)
    assert len(rows) == 4  # every row again without its user token
    ids, labels = rows[0]
    page = [layout.item_offset + 5, layout.item_offset + 6, layout.eos_id]
    assert ids[-3:] == page and labels[-3:] == page
    assert all(label == IGNORE for label in labels[:-3])
    assert layout.user_offset + 1 in rows[0][0] and layout.user_offset + 1 not in rows[1][0]


def test_history_rows_predict_every_item_but_the_first():
    enc, layout = encoder()
    (ids, labels), = history_rows(enc, [0], [[3, 4, 5]], max_items=50)
    targets = [t for t in labels if t != IGNORE]
    assert targets == [layout.item_offset + 4, layout.item_offset + 5]
    assert history_rows(enc, [0], [[3]], max_items=50) == []  # nothing to predict


@pytest.fixture(scope="module")
def data_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    cfg = load_config(None, SMALL)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    return root


def _check_policy(run_dir):
    model, tok, layout = load_policy(run_dir / "sft", trainable=False)
    vocab = Vocab.from_parquet(run_dir / "data" / "vocab.parquet")
    prompt = PromptEncoder(tok, layout).encode_prompt(0, [1, 2])
    pages = generate_pages(model, layout, [prompt], k=5).items[0]
    assert len(set(pages)) == 5 and all(0 <= i < vocab.n_items for i in pages)


@pytest.mark.parametrize("zero,meta", [(2, 1), (3, 0)])
def test_sft_on_two_workers(data_run, tmp_path, zero, meta):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(data_run, run_dir)
    cfg = load_config(None, SMALL + [f"sft.zero_stage={zero}", f"sft.meta_epochs={meta}"])
    metrics = run_sft_stage(cfg, run_dir, log=lambda *_: None)
    saved = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert saved["history"]["sft"][0]["epoch"] == 1 and "val_loss" in saved["history"]["sft"][0]
    assert ("meta" in saved["history"]) == bool(meta)
    assert torch.isfinite(torch.tensor(metrics["final"]["train_loss"]))
    assert (run_dir / "sft" / "model.safetensors").exists()
    _check_policy(run_dir)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_token_loss_equals_the_models_own_loss(arch):
    from pagellm.train.sft import collate, target_token_loss

    init = ({"n_layer": 1, "n_embd": 32, "n_head": 2} if arch == "gpt2" else
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1})
    cfg = load_config(None, [f"model.arch={arch}"]).model.model_copy(update={"init": init})
    vocab = Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)])
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    model.eval()
    rows = page_rows(PromptEncoder(tok, layout), [0, 1], [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]], 0.0, 0)
    batch = collate(rows, layout.pad_id)
    expected = model(**batch).loss
    assert torch.allclose(target_token_loss(model, batch), expected, atol=1e-5)
