"""The Llama + LoRA path end to end on CPU: configs/llama-3.2-1b-lora.yaml with only the
model size, the data size and the hardware shrunk, through data → SFT (Ray Train +
DeepSpeed ZeRO-2, two workers) → evaluation. What must hold: the SFT checkpoint is a LoRA
adapter that carries the new token rows (not a full model), it reloads with only those
trainable, what it learned survives the save (the adapter changes the base model's
logits and pages), and the evaluation scored the pages of that adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from pagellm.config import load_config, save_config
from pagellm.data.pipeline import run_data_stage
from pagellm.eval.metrics import tail_items_from_counts
from pagellm.eval.runner import PER_USER_FILE, load_eval_set, policy_output, run_eval_stage, score_model
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import load_policy
from pagellm.train.sft import run_sft_stage
from pagellm.vocab import PromptEncoder

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CONFIG = ROOT / "configs" / "llama-3.2-1b-lora.yaml"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Everything the real config keeps: arch, LoRA (r, alpha, targets), ZeRO-2. What changes:
# a random-init Llama of a few thousand weights instead of the hub's 1B, CPU instead of
# GPU, a small simulator, one epoch.
SHRINK = [
    "model.name=config",
    "model.init={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 256}",
    "data.simulator.users=60", "data.simulator.items=50", "data.simulator.categories=5",
    "data.simulator.interactions_per_user=20", "data.history_len=10", "data.sft_windows=1",
    "sft.meta_epochs=0", "sft.epochs=1", "sft.lr=1e-2", "sft.batch_size=16", "sft.workers=2", "sft.use_gpu=false",
    "eval.list_len=20", "eval.max_users=20", "eval.baselines=[popularity]",
]


@pytest.fixture(scope="module")
def lora_run(ray_local, tmp_path_factory):
    cfg = load_config(LLAMA_CONFIG, SHRINK)
    run_dir = tmp_path_factory.mktemp("lora_llama") / "run"
    save_config(cfg, run_dir / "config.yaml")
    quiet = lambda *_: None  # noqa: E731
    stats = run_data_stage(cfg, run_dir / "data", log=quiet)
    sft = run_sft_stage(cfg, run_dir, log=quiet)
    metrics = run_eval_stage(cfg, run_dir, log=quiet)
    return cfg, run_dir, stats, sft, metrics


def test_sft_writes_a_lora_adapter_with_the_new_token_rows(lora_run):
    cfg, run_dir, _, sft, _ = lora_run
    sft_dir = run_dir / "sft"
    policy_meta = json.loads((sft_dir / "pagellm_policy.json").read_text())
    assert policy_meta["adapter"] is True
    adapter = json.loads((sft_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LLAMA_TARGETS) and adapter["r"] == 16
    assert adapter["trainable_token_indices"], "the <user_n>/<item_n> rows must train with the adapter"
    assert (sft_dir / "adapter_model.safetensors").exists()
    # A random-init base has no hub name to reload from, so it travels with the adapter.
    assert (sft_dir / "base" / "config.json").exists()
    assert json.loads((sft_dir / "base" / "config.json").read_text())["model_type"] == "llama"
    assert sft["final"]["epoch"] == 1 and math.isfinite(sft["final"]["train_loss"])


def test_adapter_reloads_with_only_adapters_and_token_rows_trainable(lora_run):
    cfg, run_dir, *_ = lora_run
    model, _, layout = load_policy(run_dir / "sft", cfg.model, trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable), trainable[:5]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable < sum(p.numel() for p in model.parameters())
    # What training learned survived save and reload: the adapter moves the base model's
    # logits (a lost adapter or lost token rows would leave them as the base's).
    prompt = torch.tensor([[layout.user_offset, layout.item_offset, layout.item_offset + 1]])
    with torch.no_grad():
        logits = model(prompt).logits
        with model.disable_adapter():
            base_logits = model(prompt).logits
    assert logits.shape[-1] >= layout.vocab_size and torch.isfinite(logits).all()
    items = slice(layout.item_offset, layout.item_offset + layout.n_items)
    assert (logits[0, -1, items] - base_logits[0, -1, items]).abs().max() > 1e-3


def test_eval_scored_the_trained_adapter(lora_run):
    """The evaluation's SFT numbers are those of the saved adapter's pages (recomputed here),
    and those pages are not the base model's: eval did not score the base or another policy."""
    cfg, run_dir, _, _, metrics = lora_run
    assert set(metrics["models"]) == {"popularity", "sft"}
    es = load_eval_set(run_dir / "data", "test", cfg.eval.max_users)
    out = policy_output(run_dir / "sft", es, cfg.eval.list_len, cfg.eval.batch_size, cfg.eval.exclude_history)
    again = score_model(out, es, cfg, tail_items_from_counts(es.popularity), sim_ctx=None)
    reported = metrics["models"]["sft"]
    assert reported["users"] == len(es.prompts) == 20
    for key in ("ndcg@10", "hr@10", "ndcg@100", "recall@20", "coverage@10", "full/ndcg@100"):
        assert reported[key] == pytest.approx(again[key], abs=1e-9), key
    model, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    with torch.no_grad(), model.disable_adapter():
        base = generate_pages(model.eval(), layout, prompts, k=cfg.eval.list_len, exclude=es.exclude).items
    assert base != out.lists
    # eval/per_user.parquet: every model's page per user, whose hits average to the reported means.
    rows = pd.read_parquet(run_dir / "eval" / PER_USER_FILE)
    assert sorted(rows["model"].unique()) == ["popularity", "sft"]
    sft_rows = rows[rows["model"] == "sft"]
    assert sft_rows["user_index"].tolist() == list(es.user_index)
    assert [list(p) for p in sft_rows["page"]] == [lst[: cfg.data.page_len] for lst in out.lists]
    for model_name, model_rows in rows.groupby("model"):
        for key in ("hr@10", "ndcg@10"):
            assert model_rows[key].mean() == pytest.approx(metrics["models"][model_name][key], abs=1e-9)
