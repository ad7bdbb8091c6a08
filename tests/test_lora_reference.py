"""Stage 3 under LoRA without a second copy of the base, on a tiny Llama, without Ray: the
functions the learner, rollout and reward actors call.

What must hold: the reference logprobs the rollout side computes (its adapter disabled)
are the SFT policy's own, after the fresh adapter has trained; the weights published to
rollout actors are adapter and token-row tensors only, and loading them reproduces the
learner's policy; a stage-3 checkpoint reloads through load_policy, and its merged export
(what <run>/ppo publishes) is the same policy as one full model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagellm.config import LoraConfig, ModelConfig
from pagellm.models.decoding import constrained_logprobs, generate_pages
from pagellm.models.page_prior import first_item_preferences
from pagellm.models.policy import (
    adapter_weights,
    build_policy,
    export_merged,
    load_policy,
    load_weights,
    reference_is_base,
    save_policy,
    stage3_policy,
)
from pagellm.rl.reference import reference_outputs
from pagellm.vocab import PromptEncoder, Vocab

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_MARKS = ("lora_A", "lora_B", "trainable_tokens")


def tiny_llama_cfg(tied: bool) -> ModelConfig:
    # Llama-3.2-1B ties its embeddings; the test's tiny Llama in test_lora_llama does not.
    init = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 128, "tie_word_embeddings": tied}
    return ModelConfig(name="config", arch="llama", init=init, dtype="float32",
                       lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=TARGETS))


@torch.no_grad()
def nudge_trainable(model, seed: int) -> None:
    """Stand-in for training: move every trainable tensor (LoRA B starts at 0, so an
    untouched adapter would hide a reference that ignores it)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def sft_dir(request, tmp_path_factory):
    """A trained-looking SFT LoRA checkpoint over a random-init tiny Llama."""
    cfg = tiny_llama_cfg(request.param)
    vocab = Vocab.build([f"u{n}" for n in range(6)], [f"i{n}" for n in range(12)])
    torch.manual_seed(0)  # peft draws LoRA's A matrices from the global RNG
    model, tokenizer, layout = build_policy(cfg, vocab, seed=0)
    nudge_trainable(model, seed=1)
    return cfg, save_policy(model, tokenizer, layout, tmp_path_factory.mktemp("sft") / "sft")


def sample(model, layout, seed: int = 0):
    encoder = PromptEncoder(None, layout)
    prompts = [encoder.encode_prompt(u, [u, u + 1, 2 * u]) for u in range(4)] * 2
    exclude = [[u, u + 1] for u in range(4)] * 2
    pages = generate_pages(model.eval(), layout, prompts, k=4, mode="sample",
                           exclude=[set(e) for e in exclude], generator=torch.Generator().manual_seed(seed))
    return prompts, exclude, pages


def test_reference_is_the_sft_policy_and_only_adapters_travel(sft_dir):
    cfg, path = sft_dir
    assert reference_is_base(path, cfg)
    learner, _, layout = stage3_policy(path, cfg, trainable=True, seed=0)
    trainable = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert trainable and all(any(m in n for m in ADAPTER_MARKS) for n in trainable), trainable
    nudge_trainable(learner, seed=2)  # a PPO update of the fresh adapter and token rows

    weights = adapter_weights(learner)
    assert set(weights) == set(trainable)
    n_base = sum(p.numel() for n, p in learner.named_parameters() if not p.requires_grad)
    assert sum(w.numel() for w in weights.values()) < n_base

    rollout, _, _ = stage3_policy(path, cfg, trainable=False, seed=0)
    load_weights(rollout, weights)
    prompts, exclude, pages = sample(rollout, layout)
    ref = reference_outputs(rollout, layout, prompts, pages.response_ids, exclude, temperature=1.0, preferences=True)

    sft, _, _ = load_policy(path, trainable=False)
    sft.eval()
    with torch.inference_mode():
        want, _, mask = constrained_logprobs(sft, layout, prompts, pages.response_ids,
                                             exclude=[set(e) for e in exclude])
        learner_lp, _, _ = constrained_logprobs(learner.eval(), layout, prompts, pages.response_ids,
                                                exclude=[set(e) for e in exclude])
    # Equal up to float32 rounding: the reference runs on merged weights (W + BA summed
    # once), the SFT policy adds BA per forward; measured differences stay below 3e-5.
    torch.testing.assert_close(ref["ref_logprobs"] * mask, want * mask, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(ref["preferences"], first_item_preferences(sft, layout, prompts), atol=1e-4)
    # The rollout actor samples with the learner's weights: the behaviour logprobs are the
    # learner's, and the trained adapter really moved them off the reference.
    torch.testing.assert_close(pages.logprobs * mask, learner_lp * mask, atol=1e-5, rtol=1e-5)
    assert ((learner_lp - want) * mask).abs().max() > 1e-3


def test_stage3_checkpoint_reloads_and_publishes_merged(sft_dir, tmp_path):
    cfg, path = sft_dir
    learner, tokenizer, layout = stage3_policy(path, cfg, trainable=True, seed=0)
    nudge_trainable(learner, seed=3)
    ckpt = save_policy(learner, tokenizer, layout, tmp_path / "step_000001" / "policy")
    meta = json.loads((ckpt / "pagellm_policy.json").read_text())
    assert meta["adapter"] and meta["base_policy"] == str(path.resolve())
    assert not (ckpt / "base").exists(), "the merged SFT base must not be written per checkpoint"

    published = export_merged(ckpt, tmp_path / "ppo", dtype="float32")
    assert json.loads((published / "pagellm_policy.json").read_text())["adapter"] is False
    prompt = torch.tensor([[layout.user_offset, layout.item_offset, layout.item_offset + 1]])
    with torch.no_grad():
        want = learner.eval()(prompt).logits
        # The checkpoint recomputes the learner's exact arithmetic; the export merges the
        # PPO adapter too, so it agrees up to float32 rounding.
        for directory, atol in ((ckpt, 1e-6), (published, 1e-4)):
            model, _, _ = load_policy(directory, trainable=False)
            torch.testing.assert_close(model.eval()(prompt).logits, want, atol=atol, rtol=1e-5)


def test_full_fine_tuning_keeps_its_reference_copy(tmp_path):
    """GPT-2 without LoRA: stage 3 trains every weight, so no adapter can be switched off;
    the reward actor keeps its own reference copy, as before."""
    cfg = ModelConfig(init={"n_layer": 1, "n_embd": 32, "n_head": 2}, dtype="float32")
    model, tokenizer, layout = build_policy(cfg, Vocab.build(["u0"], ["i0", "i1"]), seed=0)
    path = save_policy(model, tokenizer, layout, tmp_path / "sft")
    assert not reference_is_base(path, cfg)
    policy, _, _ = stage3_policy(path, cfg, trainable=True)
    assert not hasattr(policy, "disable_adapter")
    assert set(adapter_weights(policy)) == {n for n, _ in policy.named_parameters()}
