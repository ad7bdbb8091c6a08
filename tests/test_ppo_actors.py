"""Asynchronous PPO through real Ray actors: fault tolerance, resume, bounded staleness."""

import json
import math
import threading
import time

import pytest
import torch

from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.policy import build_policy, save_policy
from pagellm.models.reward import reward_model_from_policy, save_reward_model
from actors.orchestrator import PPORun, run_ppo_stage
from pagellm.vocab import Vocab

SETTINGS = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
            "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
            "ppo.steps=4", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.epochs=1", "ppo.checkpoint_every=2",
            "stage3.algorithm=ppo"]


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    """A run folder with data, an (untrained) SFT policy and a reward model built from it."""
    root = tmp_path_factory.mktemp("ppo") / "run"
    cfg = load_config(None, SETTINGS)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    torch.manual_seed(0)
    model, tok, layout = build_policy(cfg.model, Vocab.from_parquet(root / "data" / "vocab.parquet"), seed=0)
    save_policy(model, tok, layout, root / "sft")
    reward, tok, layout = reward_model_from_policy(root / "sft", ["coarse", "fine"])
    save_reward_model(reward, tok, layout, root / "reward")
    return root


def fresh_copy(template, tmp_path):
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(template, dest)
    return dest


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


def test_killed_actors_are_survived_and_staleness_is_bounded(run_template, tmp_path):
    import ray

    run_dir = fresh_copy(run_template, tmp_path)
    cfg = load_config(None, SETTINGS + ["ppo.max_staleness=1", "ppo.steps=5"])
    run = PPORun(cfg, run_dir, log=lambda *_: None)
    killed = []

    def killer():
        path = run_dir / "ppo" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (path.exists() and path.read_text().strip()):
            time.sleep(0.2)
        ray.kill(run.rollouts[0], no_restart=False)  # Ray restarts it; its task is retried
        ray.kill(run.rewarders[0], no_restart=False)
        killed.append(True)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = run.train()
    finally:
        run.shutdown()
    t.join(timeout=5)
    assert killed, "the actors were never killed: the test did not test anything"
    rows = metric_rows(run_dir)
    assert summary["step"] == 5 and [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    ids = [r["batch_id"] for r in rows]
    assert len(set(ids)) == len(ids)  # nothing trained twice
    assert all(r["staleness"] <= 1 for r in rows)  # no trained sample older than max_staleness
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["policy_loss"]) for r in rows)


def test_synchronous_mode_trains_only_fresh_batches(run_template, tmp_path):
    run_dir = fresh_copy(run_template, tmp_path)
    cfg = load_config(None, SETTINGS + ["ppo.max_staleness=0", "ppo.steps=3"])
    run_ppo_stage(cfg, run_dir, log=lambda *_: None)
    rows = metric_rows(run_dir)
    assert [r["staleness"] for r in rows] == [0, 0, 0]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert (run_dir / "ppo" / "DONE").exists() and (run_dir / "ppo" / "pagellm_policy.json").exists()


def test_interrupted_run_resumes_from_its_checkpoint(run_template, tmp_path):
    run_dir = fresh_copy(run_template, tmp_path)
    cfg = load_config(None, SETTINGS + ["ppo.max_staleness=1"])
    first = run_ppo_stage(cfg, run_dir, log=lambda *_: None, stop_after=3)  # "killed" after step 3
    assert first["step"] == 3 and not (run_dir / "ppo" / "DONE").exists()
    logs = []
    second = run_ppo_stage(cfg, run_dir, log=logs.append)
    assert any("resumed from step_000002" in line for line in logs)  # the last checkpoint before the kill
    rows = metric_rows(run_dir)
    assert second["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    assert (run_dir / "ppo" / "DONE").exists()


def test_group_sampled_run_on_verifiable_and_prior_rewards_publishes_its_best_validation_checkpoint(
        run_template, tmp_path):
    """GRPO over 4 pages per prompt, rewarded by the verifiable hits and the page prior only
    (the learned heads are not loaded: their weights are gone), beta adapting toward a KL
    target, and the published policy being the best validation checkpoint, byte for byte."""
    import pandas as pd

    from pagellm.models.page_prior import PagePrior

    run_dir = fresh_copy(run_template, tmp_path)
    (run_dir / "reward" / "reward_heads.safetensors").unlink()  # would fail to load if anything tried
    n_items = len(pd.read_parquet(run_dir / "data" / "items.parquet"))
    PagePrior(1.0, 0.5, 0.5, [0.0] * n_items).save(run_dir / "reward")
    cfg = load_config(None, SETTINGS + ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.model_reward_weight=0",
                                        "ppo.hits_reward_weight=1", "ppo.prior_reward_weight=1", "ppo.prompts=cuts",
                                        "ppo.kl_target=0.01", "ppo.kl_horizon=16", "ppo.max_staleness=0"])
    run_ppo_stage(cfg, run_dir, log=lambda *_: None)
    rows = metric_rows(run_dir)
    assert all(0.0 <= r["hits"] <= 1.0 and math.isfinite(r["prior"]) for r in rows) and "r_c" not in rows[0]
    assert rows[0]["kl_beta"] == cfg.ppo.kl_beta and len({r["kl_beta"] for r in rows}) > 1  # beta moved
    selection = json.loads((run_dir / "ppo" / "selection.json").read_text())
    assert [h["step"] for h in selection["history"]] == [0, 2, 4]
    key = selection["metric"]
    best = max(selection["history"], key=lambda h: (h[key], -h["step"]))
    assert selection["published_step"] == best["step"]
    source = (run_dir / "sft" if best["step"] == 0
              else run_dir / "ppo" / "checkpoints" / f"step_{best['step']:06d}" / "policy")
    assert (source / "model.safetensors").read_bytes() == (run_dir / "ppo" / "model.safetensors").read_bytes()
