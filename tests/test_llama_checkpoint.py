"""The Llama-3.2-1B stand-in (pagellm/models/llama.py): the real-size configuration is the
published one (checked without building it), and a checkpoint written at tiny size loads
through `model.name` as a downloaded one does, its new tokens after the last id."""

from __future__ import annotations

import json

import torch

from pagellm.config import LoraConfig, ModelConfig
from pagellm.models.llama import TINY, llama_config, n_parameters, write_llama_checkpoint
from pagellm.models.policy import build_policy, load_policy, save_policy
from pagellm.vocab import Vocab


def test_real_size_config_is_the_published_one():
    config = llama_config()
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (16, 2048, 8192)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.tie_word_embeddings
    rope = config.rope_parameters
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) == (1.0, 4.0, 8192)
    assert n_parameters(config) == 1_235_814_400  # the published model's count


def test_tiny_checkpoint_loads_through_model_name(tmp_path):
    directory = write_llama_checkpoint(tmp_path / "llama", seed=0, **TINY)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["tie_word_embeddings"] is True
    assert saved["rope_parameters"]["rope_type"] == "llama3"
    assert (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists()

    cfg = ModelConfig(name=str(directory), arch="llama", dtype="float32",
                      lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model, tokenizer, layout = build_policy(cfg, Vocab.build(["u0", "u1"], ["i0", "i1", "i2"]), seed=0)
    assert layout.user_offset == TINY["vocab_size"] and layout.vocab_size == TINY["vocab_size"] + 5
    assert layout.bos_id == TINY["bos_token_id"] and layout.eos_id == TINY["eos_token_id"]
    assert model.get_input_embeddings().weight.shape[0] == layout.vocab_size
    base = [p for n, p in model.named_parameters() if "lora_" not in n and "trainable_tokens" not in n]
    assert sum(p.numel() for p in base) == n_parameters(model.config)  # the config counts the new rows too
    saved_dir = save_policy(model, tokenizer, layout, tmp_path / "policy")
    assert json.loads((saved_dir / "pagellm_policy.json").read_text())["base"] == str(directory.resolve())
    again, _, _ = load_policy(saved_dir, trainable=False)
    prompt = torch.tensor([[layout.bos_id, layout.user_offset, layout.item_offset]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(prompt).logits, model.eval()(prompt).logits)
