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
            "ppo.steps=4", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.epochs=1", "ppo.checkpoint_every=2"]


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
