"""PPO through the Ray actors with a LoRA SFT policy on a tiny Llama: the wiring of the
adapter-only reference (tests/test_lora_reference.py tests the functions themselves).

What must hold: the first batch, sampled before any update, has zero KL to the reference
(the fresh adapter starts as the SFT policy); after updates the KL is not zero (the
reference is the adapter disabled, not the current policy); learner checkpoints are the
adapter alone over the SFT checkpoint; <run>/ppo is one full model that reloads as the
same policy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from actors.orchestrator import run_ppo_stage
from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.policy import build_policy, is_adapter_model, load_policy, save_policy
from pagellm.models.reward import reward_model_from_policy, save_reward_model
from pagellm.vocab import Vocab

pytestmark = pytest.mark.ray

SETTINGS = [
    "data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
    "data.simulator.interactions_per_user=20",
    "model.arch=llama", "model.dtype=float32",
    "model.init={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 256}",
    "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
    "model.lora.target_modules=[q_proj, v_proj, down_proj]",
    # Synchronous, with a large step: the third batch is sampled by a policy that moved.
    "ppo.steps=3", "ppo.max_staleness=0", "ppo.lr=1e-2", "ppo.batch_size=8", "ppo.mini_batch_size=4",
    "ppo.epochs=1", "ppo.checkpoint_every=3", "ppo.rollout_actors=2", "stage3.publish=last", "stage3.algorithm=ppo",
]


@pytest.fixture(scope="module")
def lora_ppo_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ppo") / "run"
    cfg = load_config(None, SETTINGS)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    torch.manual_seed(0)
    model, tok, layout = build_policy(cfg.model, Vocab.from_parquet(root / "data" / "vocab.parquet"), seed=0)
    with torch.no_grad():  # an SFT adapter that differs from its base, as a trained one does
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    save_policy(model, tok, layout, root / "sft")
    reward, tok, layout = reward_model_from_policy(root / "sft", ["coarse", "fine"])
    save_reward_model(reward, tok, layout, root / "reward")
    summary = run_ppo_stage(cfg, root, log=lambda *_: None)
    return root, summary


def test_reference_is_the_sft_policy_in_the_actor_loop(lora_ppo_run):
    root, summary = lora_ppo_run
    assert summary["step"] == 3
    rows = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(rows[2]["kl"]) > 1e-4, "after two updates the policy must have moved off the reference"
    assert all(r["reference_s"] > 0 for r in rows), "the rollout actors computed the reference"


def test_checkpoints_hold_the_adapter_and_ppo_publishes_one_model(lora_ppo_run):
    root, _ = lora_ppo_run
    ckpt = root / "ppo" / "checkpoints" / "step_000003" / "policy"
    meta = json.loads((ckpt / "pagellm_policy.json").read_text())
    assert meta["adapter"] and meta["base_policy"] == str((root / "sft").resolve())
    assert not (ckpt / "base").exists()
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "trainable_tokens" in k for k in keys), keys[:5]

    assert json.loads((root / "ppo" / "pagellm_policy.json").read_text())["adapter"] is False
    published, _, layout = load_policy(root / "ppo", trainable=False)
    trained, _, _ = load_policy(ckpt, trainable=False)
    assert not is_adapter_model(published) and is_adapter_model(trained)
    prompt = torch.tensor([[layout.user_offset, layout.item_offset, layout.item_offset + 1]])
    with torch.no_grad():
        torch.testing.assert_close(published.eval()(prompt).logits, trained.eval()(prompt).logits,
                                   atol=1e-4, rtol=1e-5)
