"""Policy factory: random init, pretrained GPT-2/Llama from a local dir (the same code path as
a hub name), new-token init, LoRA with trainable token rows, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from test_vocab import gpt2_style_tokenizer, llama_style_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pagellm.config import ModelConfig
from pagellm.models.policy import build_policy, layout_mismatches, load_policy, resolve_dtype, save_policy
from pagellm.vocab import PromptEncoder, Vocab

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    },
}
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}



def vocab(n_items=200) -> Vocab:
    return Vocab.build([f"u{n}" for n in range(6)], [f"i{n:03d}" for n in range(n_items)])


def pretrained_dir(arch: str, root):
    """A tiny "pretrained" model + tokenizer saved like a hub snapshot. The Llama one is
    untied with an lm_head on a different scale, so each matrix must use its own σ."""
    directory = root / f"pretrained-{arch}"
    if arch == "gpt2":
        tok = gpt2_style_tokenizer(directory)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **TINY["gpt2"]))
    else:
        tok = llama_style_tokenizer(directory)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **TINY["llama"]))
        with torch.no_grad():
            model.lm_head.weight.mul_(5.0)
    model.save_pretrained(str(directory))
    return directory, model


def logits(model, layout, user=1, items=(3, 0, 150)):
    ids = PromptEncoder(None, layout).encode_prompt(user, list(items)) + [layout.item_token(7)]
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_random_init_from_config_is_seeded_and_sized_to_the_tokenizer(arch):
    cfg = ModelConfig(name="config", arch=arch, init=TINY[arch])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model, tok, layout = build_policy(cfg, vocab(), seed=0)
    assert torch.rand(1) == before  # the caller's RNG stream is untouched
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == layout.vocab_size
    assert model.config.eos_token_id == layout.eos_id and model.config.pad_token_id == layout.pad_id
    assert model.dtype == torch.float32
    same, _, _ = build_policy(cfg, vocab(), seed=0)
    other, _, _ = build_policy(cfg, vocab(), seed=1)
    assert torch.equal(logits(model, layout), logits(same, layout))
    assert not torch.equal(logits(model, layout), logits(other, layout))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pretrained_dir_gets_new_rows_at_the_scale_of_the_old_ones(arch, tmp_path):
    directory, original = pretrained_dir(arch, tmp_path)
    n_old = original.get_input_embeddings().weight.shape[0]
    model, tok, layout = build_policy(ModelConfig(name=str(directory), arch=arch), vocab(), seed=0)
    assert layout.user_offset == n_old and len(tok) == n_old + 6 + 200
    pairs = [(model.get_input_embeddings().weight, original.get_input_embeddings().weight)]
    if arch == "llama":
        pairs.append((model.lm_head.weight, original.lm_head.weight))
    for new, old in pairs:
        assert new.shape[0] == len(tok)
        assert torch.equal(new[:n_old], old)  # pretrained rows untouched
        sigma, fresh = old.std().item(), new[n_old:]
        assert abs(fresh.std().item() / sigma - 1) < 0.1 and abs(fresh.mean().item()) < 0.1 * sigma
    if arch == "llama":
        assert model.lm_head.weight[n_old:].std() > 3 * model.get_input_embeddings().weight[n_old:].std()
    assert model.config.pad_token_id == layout.pad_id == layout.eos_id


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_trains_only_adapters_and_the_new_token_rows(arch, tmp_path):
    directory, original = pretrained_dir(arch, tmp_path)
    n_old = original.get_input_embeddings().weight.shape[0]
    cfg = ModelConfig(name=str(directory), arch=arch, lora=LORA)
    model, tok, layout = build_policy(cfg, vocab(), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    before = copy.deepcopy(model).merge_and_unload()

    # One step that uses old and new tokens, then compare effective (merged) weights.
    enc = PromptEncoder(tok, layout)
    ids = torch.tensor([enc.encode_prompt(2, [5, 9]) + enc.encode_page([1, 4])])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.merge_and_unload()
    for get in ("get_input_embeddings", "get_output_embeddings"):  # tied (gpt2) or not (llama)
        old_w, new_w = getattr(before, get)().weight, getattr(after, get)().weight
        assert torch.equal(new_w[:n_old], old_w[:n_old])  # pretrained rows frozen
        assert not torch.equal(new_w[layout.item_token(5)], old_w[layout.item_token(5)])  # new rows train
    assert torch.equal(after.get_output_embeddings().weight[:n_old], original.get_output_embeddings().weight)


def perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("arch,named_base", [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_lora_checkpoint_round_trip(arch, named_base, tmp_path):
    name = str(pretrained_dir(arch, tmp_path)[0]) if named_base else "config"
    cfg = ModelConfig(name=name, arch=arch, init=TINY[arch] if not named_base else {}, lora=LORA)
    model, tok, layout = build_policy(cfg, vocab(), seed=0)
    perturb(model)
    expected = logits(model, layout)
    out = save_policy(model, tok, layout, tmp_path / "ckpt", merged=True)
    assert (out / "adapter_config.json").exists() and (out / "base").exists() != named_base
    assert not (out / "model.safetensors").exists()  # the adapter only, not a full copy
    again, tok2, layout2 = load_policy(out, cfg, trainable=False)
    assert layout2 == layout and len(tok2) == len(tok)
    assert not any(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(logits(again, layout), expected, atol=1e-5, rtol=1e-5)
    full, _, _ = load_policy(out / "merged")
    assert not type(full).__name__.startswith("Peft")
    torch.testing.assert_close(logits(full, layout), expected, atol=1e-5, rtol=1e-5)


def test_full_checkpoint_reloads_through_model_name_and_gains_lora(tmp_path):
    cfg = ModelConfig(name="config", arch="gpt2", init=TINY["gpt2"])
    model, tok, layout = build_policy(cfg, vocab(), seed=0)
    save_policy(model, tok, layout, tmp_path / "sft")
    # The same path a run takes with --set model.name=<run>/sft.
    again, _, layout2 = build_policy(ModelConfig(name=str(tmp_path / "sft")), vocab(), seed=5)
    assert layout2 == layout
    torch.testing.assert_close(logits(again, layout), logits(model, layout))
    adapted, _, _ = build_policy(ModelConfig(name=str(tmp_path / "sft"), lora=LORA), vocab(), seed=5)
    assert type(adapted).__name__.startswith("Peft")
    torch.testing.assert_close(logits(adapted, layout), logits(model, layout))
    with pytest.raises(ValueError, match="built for 6 users / 200 items"):
        build_policy(ModelConfig(name=str(tmp_path / "sft")), vocab(n_items=50), seed=0)


def test_dtype_resolution_and_bad_init_fields():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match=r"\['n_layers'\] are not GPT2Config fields"):
        build_policy(ModelConfig(name="config", arch="gpt2", init={"n_layers": 2}), vocab(), seed=0)


def test_the_ranking_prior_is_saved_with_the_policy(tmp_path):
    """model.ranking_prior is part of what the policy is: every later reader (eval, serve,
    stage 3) decodes with the weight it was built and selected with."""
    cfg = ModelConfig(name="config", arch="gpt2", init=TINY["gpt2"], ranking_prior=2.0)
    model, tok, layout = build_policy(cfg, vocab(), seed=0)
    assert layout.ranking_prior == 2.0
    save_policy(model, tok, layout, tmp_path / "sft")
    assert load_policy(tmp_path / "sft", trainable=False)[2].ranking_prior == 2.0
    assert build_policy(ModelConfig(name=str(tmp_path / "sft")), vocab(), seed=0)[2].ranking_prior == 2.0
    assert build_policy(ModelConfig(name="config", arch="gpt2", init=TINY["gpt2"]), vocab(), seed=0)[2].ranking_prior == 0
    # A config that asks for another weight than the saved policy has is said so, field by field.
    saved = load_policy(tmp_path / "sft", trainable=False)[2]
    assert layout_mismatches(saved, cfg) == []
    asked = cfg.model_copy(update={"ranking_prior": 3.0, "prompt_tail": False})
    assert layout_mismatches(saved, asked) == [
        "model.ranking_prior is 3.0 in the config but 2.0 in the saved policy",
        "model.prompt_tail is False in the config but True in the saved policy"]
