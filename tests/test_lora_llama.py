"""The Llama + LoRA path end to end on CPU: configs/llama-3.2-1b-lora.yaml with only the
model size, the data size and the hardware shrunk, through data → SFT (Ray Train +
DeepSpeed ZeRO-2, two workers) → evaluation. What must hold: the SFT checkpoint is a LoRA
adapter that carries the new token rows (not a full model), it reloads, and the pages it
writes are valid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pagellm.config import load_config, save_config
from pagellm.data.pipeline import run_data_stage
from pagellm.eval.runner import run_eval_stage
from pagellm.models.policy import load_policy
from pagellm.train.sft import run_sft_stage

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


def test_shrunk_config_keeps_the_llama_lora_zero2_settings(lora_run):
    cfg = lora_run[0]
    assert cfg.model.arch == "llama" and cfg.model.lora.enabled
    assert cfg.model.lora.r == 16 and cfg.model.lora.target_modules == LLAMA_TARGETS
    assert cfg.sft.zero_stage == 2 and cfg.sft.workers == 2


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
    # The adapter changed the model: its LoRA B matrices left their zero init.
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        logits = model(torch.tensor([[layout.user_offset, layout.item_offset]])).logits
    assert logits.shape[-1] >= layout.vocab_size and torch.isfinite(logits).all()


def test_eval_scores_the_lora_policy_with_valid_pages(lora_run):
    _, run_dir, stats, _, metrics = lora_run
    assert (run_dir / "eval" / "metrics.json").exists()
    models = metrics["models"]
    assert set(models) == {"popularity", "sft"}
    sft = models["sft"]
    assert sft["invalid_rate"] == 0.0 and sft["duplicate_rate"] == 0.0
    assert sft["users"] == 20 and 0.0 <= sft["ndcg@10"] <= 1.0
    assert stats["users"] > 0 and stats["sft_rows"] > 0
